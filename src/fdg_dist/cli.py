"""``fdg-train``: compose the Hydra config once, validate it, claim the run directory, then run as one
worker or launch K.

Under torchrun every process arrives here and becomes one module.  Without torchrun the program is
its own launcher: it starts ``world_size`` local workers through torch's elastic launch API, passing
them the resolved config and the one run directory, so Hydra multirun sweeps (``-m``) work with each
job getting its own processes.

What the user sees of a run that cannot go on is one line: an invalid configuration or a refused run
directory (exit 2, before anything is written), a worker's root cause (exit 1; every traceback stays
in ``train.log``), or an interrupt (128 + signal number, saying how to resume).

An entry point (layer 6): nothing in the package imports it.  Must not train or hold a run's state: it
composes, validates, claims the directory and hands over to ``run.worker``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import secrets
import shlex
import signal
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from fdg_dist import data, sweep
from fdg_dist.config import Config, ConfigError, describe
from fdg_dist.run import checkpoint, rendezvous, rundir, warm, worker
from fdg_dist.run.preempt import Stopped
from fdg_dist.util import files
from fdg_dist.util.text import first_line
from fdg_dist.validation import check_devices, check_overrides, validate

CONF_DIR = os.environ.get("FDG_CONF_DIR", str(Path(__file__).resolve().parents[2] / "conf"))
log = logging.getLogger("fdg_dist")
# Failures that are the consequence of another rank's: the root cause is looked for elsewhere first.
_PEER_LOSS = ("lost module", "Connection closed by peer", "Connection reset by peer", "Timed out", "Broken pipe",
              "Signal 15 (SIGTERM)")


def _run_id() -> str:
    """One run directory name for all ranks: torchrun's run id (shared, stable across restarts) or a timestamp."""
    if warm.under_torchrun():
        return f"torchrun-{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}"
    return datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


HELP = """fdg-train: train a network cut into K modules, one process each, with FDG or another method.

Usage: fdg-train [GROUP=OPTION ...] [KEY=VALUE ...]    for example
  fdg-train experiment=quick_synthetic                              (small synthetic data)
  fdg-train model=resnet20 pipeline.k=3 method.beta=0.5 trainer.epochs=10
  fdg-train -m experiment=quick_synthetic method.beta=0.5,1        (a sweep: one job per value)

== Config groups (GROUP=OPTION) ==
$APP_CONFIG_GROUPS
== Keys (KEY=VALUE) ==
"""


def help_template() -> str:
    """``hydra.help.template``: the groups with their choices (Hydra fills in ``$APP_CONFIG_GROUPS``), every key
    with its description (from the schema: ``config.describe``), then the values this command would run with."""
    return (HELP + describe.help_text() + "\n\n== The values this command runs with ==\n$CONFIG\n"
            "== Flags ==\n$FLAGS_HELP")


OmegaConf.register_new_resolver("fdg_run_id", _run_id, replace=True)
OmegaConf.register_new_resolver("fdg_help", help_template, replace=True)
OmegaConf.register_new_resolver("fdg_job_dir", sweep.job_dir, replace=True)


def config_from_hydra(raw: DictConfig) -> Config:
    """Resolve everything but Hydra's own node (it only resolves inside a running Hydra job)."""
    ours = OmegaConf.masked_copy(raw, [key for key in raw if key != "hydra"])
    return Config.from_dict(OmegaConf.to_container(ours, resolve=True))


@contextmanager
def _agent_logs_to(path: Path) -> Iterator[None]:
    """torch's elastic agent logs (a failed worker's traceback, signal notices) go to ``train.log``, not
    the console, which gets the one line that matters from ``_launch``."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s [launcher] %(levelname)s %(message)s", "%H:%M:%S"))
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.distributed.launcher",
                                                    "torch.multiprocessing")]
    saved = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
    try:
        yield
    finally:
        for lg, propagate in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.propagate = propagate
        handler.close()


class WorkersFailed(ChildFailedError):
    """torch's report of a failed run (the first worker its agent saw exit) with ``reports``: each rank's own
    first error, as the rank reported it (global rank -> (time, "Type: message"))."""

    def __init__(self, failed: ChildFailedError, reports: dict[int, tuple[float, str]]) -> None:
        super().__init__(failed.name, failed.failures)
        self.reports = reports


def launch_local(cfg: Config, run_dir: Path) -> dict | None:
    """Start the run's workers on this machine with torch's elastic agent; its store listens on loopback only.

    Workers are forked from the warm server where ``fdg-train`` started one (``run.warm``), spawned otherwise.
    The run gets a secret of its own, which the agent and the workers take from the environment (a forked
    worker with its arguments: the server's environment predates it) and sign their stores' values with
    (``rendezvous.SignedStore``).  The agent's per-worker files (error reports,
    tracebacks) live in a private temporary folder removed afterwards; a failed run raises ``WorkersFailed``
    with every rank's own error.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rendezvous.register_backend()
    run_dir.mkdir(parents=True, exist_ok=True)
    with rendezvous.private_temp_dir("fdg-agent-") as agent_dir, _agent_logs_to(run_dir / "train.log"), \
            _environment({worker.FAILURES: agent_dir, rendezvous.SECRET: secrets.token_hex(32)}):
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.world_size, run_id=uuid.uuid4().hex,
                              rdzv_backend=rendezvous.BACKEND, rdzv_endpoint=f"{rendezvous.LOOPBACK}:0",
                              local_addr=rendezvous.LOOPBACK, max_restarts=cfg.dist.max_restarts,
                              monitor_interval=0.2, start_method=warm.start_method(),
                              logs_specs=DefaultLogsSpecs(log_dir=agent_dir))
        try:
            results = elastic_launch(config, worker.run)(cfg.to_dict(), str(run_dir), warm.environment_since())
        except ChildFailedError as e:  # the agent gives up after its last attempt: number max_restarts
            raise WorkersFailed(e, _reports(Path(agent_dir), cfg.dist.max_restarts, cfg.world_size)) from e
    return next((r for r in results.values() if r is not None), None)


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` (which the workers inherit) for the block only: a sweep launches again."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reports(folder: Path, attempt: int, world: int) -> dict[int, tuple[float, str]]:
    """The errors the ranks of ``attempt`` reported (``worker.report_failure``)."""
    found = {}
    for rank in range(world):
        with suppress(OSError, ValueError, KeyError):  # none: the rank was killed, or ended otherwise
            report = json.loads(worker.report_path(folder, attempt, rank).read_text())
            found[rank] = (float(report["time"]), str(report["error"]))
    return found


# ------------------------------------------------------------------------------------------ what the user sees
def _rank_label(cfg: Config, rank: int) -> str:
    stages = 1 if cfg.method.name == "dp" else cfg.pipeline.k
    return f"rank {rank} (module {rank % stages})"


def root_cause(failures: dict[int, Any], reports: dict[int, tuple[float, str]]) -> tuple[int, str]:
    """(global rank, message) of the failure that explains the others: the earliest of those that are not a
    lost peer (a rank that raised or was killed), else the earliest of all.  ``failures`` are torch's (what
    its agent saw), ``reports`` the ranks' own, which win for their rank."""
    def text(failure: Any) -> str:
        message = failure.message
        return str(message.get("message", "")) if isinstance(message, dict) else str(message)

    known = {rank: (failure.timestamp, text(failure)) for rank, failure in failures.items()} | reports
    rank, (_, message) = min(known.items(),
                             key=lambda item: (any(p in item[1][1] for p in _PEER_LOSS), item[1][0], item[0]))
    return rank, first_line(message)


def _stop(line: str, code: int) -> NoReturn:
    print(f"fdg-train: {line}", file=sys.stderr)
    sys.exit(code)


def resume_command(overrides: list[str], run_dir: Path) -> str:
    """The command that resumes the run in ``run_dir``: its own overrides (``resume=auto`` instead of another
    resume), pinned to that directory — the same command alone would start afresh in a new timestamped one."""
    kept = [o for o in overrides if not re.match(r"[+~]*resume=", o)]
    return shlex.join(["fdg-train", *kept, "resume=auto", f"hydra.run.dir={run_dir.resolve()}"])


def _stopped_by(sig: signal.Signals, cfg: Config, run_dir: Path, again: str) -> str:
    """The one line of an interrupted run: where it stands and the command (``again``) that continues it."""
    root = checkpoint.checkpoint_root(cfg, run_dir)
    newest = next((d for d in checkpoint.epoch_dirs(root) if (d / checkpoint.MANIFEST).exists()), None) \
        if root.is_dir() else None
    if newest is None:
        return f"stopped by {sig.name}, every worker ended; no checkpoint yet in {run_dir}: {again} starts it again"
    return f"stopped by {sig.name}, every worker ended; {run_dir} keeps checkpoint {newest.name}; resume with: {again}"


def _innermost(error: BaseException) -> BaseException:
    """The first error of a chain: torch wraps a store's error once or twice (``RendezvousConnectionError`` from
    ``RendezvousError``, depending on which call of its agent met it), and only the first one names the cause."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _launch(cfg: Config, run_dir: Path, again: str) -> dict | None:
    """``launch_local`` with its failures and interrupts turned into one line each; a line that promises a resume
    ends with the command that does it (``again``)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous import RendezvousError

    try:
        return launch_local(cfg, run_dir)
    except WorkersFailed as e:
        rank, message = root_cause(e.failures, e.reports)
        if message.startswith(f"{Stopped.__name__}: "):  # a signal to a worker: every rank stopped at a checkpoint
            by = re.search(r"stopped by (SIG[A-Z]+)", message)
            line = message.split(": ", 1)[1].replace(Stopped.SAME_COMMAND, f"resume with: {again}")
            _stop(line, 128 + (signal.Signals[by.group(1)] if by else signal.SIGTERM))
        _stop(f"{_rank_label(cfg, rank)} failed: {message} [every rank's traceback: {run_dir / 'train.log'}]", 1)
    except RendezvousError as e:  # e.g. a value in its store that the run did not write (rendezvous.SignedStore)
        cause = _innermost(e)
        _stop(f"the launcher's rendezvous failed, every worker was stopped: {type(cause).__name__}: "
              f"{first_line(str(cause))}", 1)
    except SignalException as e:
        _stop(_stopped_by(signal.Signals(e.sigval), cfg, run_dir, again), 128 + int(e.sigval))
    except KeyboardInterrupt:
        _stop(_stopped_by(signal.SIGINT, cfg, run_dir, again), 128 + signal.SIGINT)


def _work(cfg: Config, run_dir: Path) -> dict | None:
    """This torchrun process as one worker; its failure is one line here (torchrun adds its own summary)."""
    try:
        return worker.run(cfg.to_dict(), str(run_dir))
    except Stopped as e:
        _stop(str(e), 128 + e.signum)
    except Exception as e:
        _stop(f"{_rank_label(cfg, int(os.environ['RANK']))} failed: {type(e).__name__}: {first_line(str(e))} "
              f"[traceback: {run_dir / 'train.log'}]", 1)


# ------------------------------------------------------------------------------------------ the run directory
def _recorded_config(run_dir: Path) -> Config | None:
    """The configuration the directory's last accepted run wrote, if readable."""
    try:
        return Config.from_dict(OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"),
                                                       resolve=True))
    except Exception:  # absent, from an older version, or damaged: nothing to compare with
        return None


def _write_records(run_dir: Path, raw: DictConfig) -> None:
    """``.hydra/``: the composed config, Hydra's settings and the command-line overrides, written only once
    the run has been accepted (Hydra's own writer is off: it wrote them before any check)."""
    hc = HydraConfig.get()
    for name, node in (("config.yaml", raw), ("hydra.yaml", OmegaConf.create({"hydra": hc})),
                       ("overrides.yaml", hc.overrides.task)):
        files.atomic_write(OmegaConf.to_yaml(node).encode(), run_dir / ".hydra" / name)


def _refuse(line: str, run_dir: Path) -> NoReturn:
    """Exit 2 before anything was written; the directory Hydra created for this run goes if still empty."""
    with suppress(OSError):  # not empty: it belongs to an earlier run
        run_dir.rmdir()
    _stop(line, 2)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _main(raw: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    torchrun = warm.under_torchrun()
    try:
        cfg = config_from_hydra(raw)
        world = int(os.environ["WORLD_SIZE"]) if torchrun else None
        if torchrun:  # this process becomes a worker, which builds the model anyway
            validate(cfg, world_size=world)
        else:  # this process launches the workers and waits for them: it keeps nothing of the check
            warm.call(validate, cfg)
        check_devices(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", world)) if torchrun else cfg.world_size)
        data.check_available(cfg.data, download=not torchrun)
    except ConfigError as e:
        _refuse(f"invalid configuration: {e}", run_dir)
    except data.DataUnavailable as e:
        _refuse(str(e), run_dir)
    if torchrun and os.environ.get("RANK", "0") != "0":  # rank 0 owns the directory for the run
        result = _work(cfg, run_dir)
    else:
        with ExitStack() as held:
            try:
                held.enter_context(rundir.claim(run_dir))  # released when the run ends, however it ends
                rundir.check_start(cfg, run_dir, recorded=_recorded_config(run_dir),
                                   restarted=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0)
                rundir.record_holder(run_dir, list(hc.overrides.task))
                _write_records(run_dir, raw)
            except rundir.RunDirError as e:
                _refuse(str(e), run_dir)
            except OSError as e:  # a full disk, a directory made read-only since CheckRunDir looked
                _refuse(f"cannot write into the run directory {run_dir}: {e}", run_dir)
            result = _work(cfg, run_dir) if torchrun else _launch(cfg, run_dir, resume_command(list(hc.overrides.task), run_dir))
    return None if result is None else result.get("final_test_error")


class CheckRunDir(Callback):
    """Refuse a run or sweep directory that cannot be written, in one line, before Hydra creates it (its
    ``mkdir`` would fail with a traceback) and before anything else starts (conf/train.yaml registers it)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(path: str, key: str) -> None:
        try:
            rundir.check_writable(Path(path), key)
        except rundir.RunDirError as e:
            _stop(str(e), 2)


class ValidateSweep(Callback):
    """Validate every point of a ``-m`` sweep before its first job starts (conf/train.yaml registers it):
    an invalid point would otherwise end the sweep only when reached, after hours of earlier jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        sweeper = config.hydra.sweeper
        if sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
            return  # another sweeper chooses its points as it goes
        arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        arguments += list(config.hydra.overrides.task)
        points = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)[0]
        for job, overrides in enumerate(points):
            try:
                warm.call(validate, config_from_hydra(compose(kwargs.get("config_name") or "train", overrides=overrides)))
            except ConfigError as e:
                _stop(f"invalid configuration in sweep job {job} ({' '.join(overrides)}): {e}; no job was started", 2)


def main() -> None:
    # As under ``python -m fdg_dist.train``: modules in the working directory import (model._target_=my_model.fn);
    # the spawned workers inherit the path.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:  # a key that names nothing: one line with the closest valid one, before Hydra's own answer
        check_overrides(get_args_parser().parse_known_args()[0].overrides)
    except ConfigError as e:
        _stop(f"invalid configuration: {e}", 2)
    _main()
