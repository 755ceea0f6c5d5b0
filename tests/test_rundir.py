"""Run directories and what ``fdg-train`` says when a run cannot go on (issue 15).

One run owns its directory (a lock for its life; a second run is refused at once, naming the holder);
a refused or invalid run writes nothing into an existing run's directory; ``resume=never`` never
overwrites or mixes with an earlier run; a sweep is validated whole before its first job; a worker's
error is one line on the console (tracebacks in ``train.log``); an interrupt is one line saying how to
resume; the launcher leaves no temporary directory behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN

from fdg_dist import cli
from fdg_dist.config import Config
from fdg_dist.run import rundir

pytestmark = pytest.mark.multiprocess

RUN = [*TINY_RUN, "checkpoint.enabled=true"]


def fdg_train(run_dir: Path, *overrides: str, multirun: bool = False, base: list[str] = RUN,
              timeout: float = 150) -> subprocess.CompletedProcess:
    """``python -m fdg_dist.train BASE OVERRIDES hydra.run.dir=run_dir``; any exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fdg_dist.train", *(["-m"] if multirun else []), *base, *overrides,
           f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=timeout)


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with its content hash: what 'writes nothing' compares."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run (checkpoint, metrics, result, .hydra/), copied by each test that changes it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = fdg_train(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture
def earlier(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------------------- one run per directory
def test_the_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    with rundir.claim(tmp_path):
        rundir.record_holder(tmp_path, ["model=tiny", "pipeline.k=3"])
        with pytest.raises(rundir.RunDirError, match=rf"in use by another run \(pid {os.getpid()} on .*"
                                                     r"fdg-train model=tiny pipeline.k=3\)"), rundir.claim(tmp_path):
            pass
    with rundir.claim(tmp_path):  # released with its holder
        ended = subprocess.Popen(["true"])
        ended.wait()
        (tmp_path / rundir.LOCK).write_text(json.dumps({"pid": ended.pid, "host": socket.gethostname(),
                                                        "since": "earlier", "overrides": []}))
        with pytest.raises(rundir.RunDirError, match=r"in use by another run \(a run that is still starting\)"), \
                rundir.claim(tmp_path):  # the record of an ended run is not passed off as the holder
            pass


@pytest.mark.timeout(120)
def test_a_running_run_owns_its_directory_and_sigterm_ends_it_in_one_line(tmp_path: Path) -> None:
    """The run holds its directory while it trains; SIGTERM to fdg-train stops every worker, prints one
    line naming the checkpoint and the command that resumes, and leaves no temporary directory."""
    run_dir, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "fdg_dist.train", *RUN, "trainer.epochs=200",
                             f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "checkpoints" / "epoch0000" / "manifest.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach its first checkpoint"
            time.sleep(0.1)
        with pytest.raises(rundir.RunDirError, match=f"in use by another run \\(pid {proc.pid} "), \
                rundir.claim(run_dir):
            pass
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("fdg-train: stopped by SIGTERM, every worker ended;"), err[-3000:]
    assert f"{run_dir} keeps checkpoint epoch" in last
    assert last.endswith(f"; resume with: fdg-train {' '.join(shlex.quote(o) for o in RUN)} trainer.epochs=200 "
                         f"resume=auto hydra.run.dir={run_dir.resolve()}")  # issue 29: the command, its directory
    assert "Traceback" not in err and "death signal" not in err, err[-3000:]
    assert not [p.name for p in tmp.iterdir() if p.name.startswith(("torchelastic_", "fdg-agent-"))]


@pytest.mark.timeout(120)
def test_a_run_refused_by_a_busy_directory_writes_nothing(earlier: Path) -> None:
    before = snapshot(earlier)
    with rundir.claim(earlier):
        rundir.record_holder(earlier, ["trainer.epochs=9"])
        held = snapshot(earlier)
        proc = fdg_train(earlier, "trainer.epochs=2")
    assert proc.returncode == 2
    line = one_line(proc)
    assert line.startswith(f"fdg-train: {earlier} is in use by another run (pid {os.getpid()} on "), line
    assert snapshot(earlier) == held
    assert {k: v for k, v in held.items() if k != rundir.LOCK} == {k: v for k, v in before.items() if k != rundir.LOCK}


# ---------------------------------------------------------------------------------- nothing lost, nothing mixed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("overrides,says", [
    (["resume=never"], "resume=never: {run} holds an earlier run (metrics.jsonl, result.json, final_model.pt, "
                       "checkpoints/epoch0000); continue it with resume=auto"),
    (["optim.lr=abc"], "invalid configuration: optim.lr: 'abc' is not a number"),
    (["optim.lr=0.01"], "checkpoint {run}/checkpoints/epoch0000 was written by a different configuration "
                        "(optim.lr: checkpoint 0.1, this run 0.01)"),
])
def test_a_refused_run_leaves_the_earlier_run_as_it_was(earlier: Path, overrides: list[str], says: str) -> None:
    """resume=never, an invalid value, another configuration: refused in one line, exit 2, and not one byte
    of the earlier run changes (its .hydra/ still says how to resume it)."""
    before = snapshot(earlier)
    proc = fdg_train(earlier, *overrides)
    assert proc.returncode == 2
    assert one_line(proc).startswith("fdg-train: " + says.format(run=earlier)), proc.stderr
    assert snapshot(earlier) == before


@pytest.mark.timeout(120)
def test_resume_auto_does_not_start_over_a_run_of_another_configuration(earlier: Path) -> None:
    """Without a checkpoint to resume, resume=auto would truncate the earlier run's metrics: refused when the
    earlier run (its .hydra/config.yaml) had another configuration."""
    shutil.rmtree(earlier / "checkpoints")
    before = snapshot(earlier)
    proc = fdg_train(earlier, "optim.lr=0.01")
    assert proc.returncode == 2
    assert one_line(proc).startswith(f"fdg-train: {earlier} holds an earlier run of another configuration "
                                     "(optim.lr differ)"), proc.stderr
    assert snapshot(earlier) == before


def test_the_same_configuration_may_start_over_without_a_checkpoint(finished: Path, tmp_path: Path) -> None:
    """The same command again (e.g. after a crash before the first checkpoint) is not refused."""
    shutil.copytree(finished, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    recorded = Config.from_dict({"model": {"name": "tiny"}})  # what check_start compares: the fingerprint
    cfg = Config.from_dict({"model": {"name": "tiny"}})
    rundir.check_start(cfg, tmp_path / "run", recorded=recorded, restarted=False)
    cfg.optim.lr = 0.01
    with pytest.raises(rundir.RunDirError, match="optim.lr differ"):
        rundir.check_start(cfg, tmp_path / "run", recorded=recorded, restarted=False)
    rundir.check_start(cfg, tmp_path / "run", recorded=recorded, restarted=True)  # torchrun's next attempt


@pytest.mark.timeout(120)
def test_a_finished_run_records_its_configuration_once_accepted(finished: Path) -> None:
    assert {p.name for p in (finished / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert "optim.lr=abc" not in (finished / ".hydra" / "overrides.yaml").read_text()
    assert "checkpoint.enabled=true" in (finished / ".hydra" / "overrides.yaml").read_text()


# -------------------------------------------------------------------------------------------- one clean line
@pytest.mark.timeout(60)
def test_an_invalid_sweep_point_stops_the_sweep_before_its_first_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = fdg_train(tmp_path / "unused", "method.beta=0.2,1.5", f"hydra.sweep.dir={sweep}", multirun=True)
    assert proc.returncode == 2
    line = one_line(proc)
    assert line.startswith("fdg-train: invalid configuration in sweep job 1 (") and "method.beta=1.5" in line
    assert line.endswith("method.beta: 1.5 is outside (0, 1]; β = 1 means no shrinking; no job was started")
    assert not sweep.exists()


def _read_only(folder: Path) -> list[str]:
    """A command prefix under which ``folder`` (empty) cannot be written: for an ordinary user its mode, for
    root (whom modes do not stop) a read-only mount over it in a mount namespace of the command's own."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("root without unshare --mount: no folder can be made read-only here")
    return ["unshare", "--mount", "sh", "-c", f'mount -t tmpfs -o ro tmpfs "{folder}" && exec "$0" "$@"']


@pytest.mark.timeout(60)
@pytest.mark.parametrize("inside", [False, True], ids=["the-run-dir", "its-parent"])
def test_a_read_only_run_directory_is_one_line(tmp_path: Path, inside: bool) -> None:
    """Issue 27: it ended in Hydra's traceback, ``OSError: [Errno 30] Read-only file system``."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    run_dir = folder / "run" if inside else folder
    cmd = [*_read_only(folder), sys.executable, "-m", "fdg_dist.train", *RUN, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc)
    assert line.startswith(f"fdg-train: hydra.run.dir: cannot write into {run_dir} ({'it' if not inside else folder} "
                           "is ") and line.endswith("; give the run a writable directory (hydra.run.dir=...)"), line


def test_the_root_cause_is_the_failure_that_is_not_a_lost_peer() -> None:
    """Error reports carry whole seconds: a neighbour's 'lost module' can look as early as the error that
    caused it, or earlier; the rank that raised (or was killed) is the one named."""
    @dataclass
    class Failure:
        message: object
        timestamp: int

    failures = {
        0: Failure({"message": "TransportError: lost module 1 (rank 1) while waiting for activation of batch 2: "
                               "[pair.cc:534] Connection closed by peer", "extraInfo": {}}, 100),
        1: Failure({"message": "ValueError: data.root: cannot decode x.jpg\nmore detail", "extraInfo": {}}, 101),
        2: Failure("Signal 15 (SIGTERM) received by PID 7", 100),
    }
    assert cli.root_cause(failures, {}) == (1, "ValueError: data.root: cannot decode x.jpg")
    failures[1] = Failure("Signal 9 (SIGKILL) received by PID 8", 102)  # killed: no error file
    assert cli.root_cause(failures, {}) == (1, "Signal 9 (SIGKILL) received by PID 8")
    del failures[1]  # only lost peers: the earliest
    assert cli.root_cause(failures, {})[0] == 0


def test_the_root_cause_is_a_ranks_own_report_when_torch_saw_only_its_neighbour() -> None:
    """Issue 27: torch's agent reports one failure, the first process it saw exit; 2 runs in 3 that was the
    neighbour that lost the rank which raised.  That rank's own report names the cause."""
    @dataclass
    class Failure:
        message: object
        timestamp: int

    torch_saw = {0: Failure({"message": "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read "
                                        "error [127.0.0.1]:4242: Connection reset by peer", "extraInfo": {}}, 100)}
    reports = {0: (100.2, "TransportError: lost module 1 (rank 1) while waiting for gradient of batch 0: "
                          "[pair.cc:545] Read error: Connection reset by peer"),
               1: (100.4, "CheckpointError: /run/metrics.jsonl: line 1 is damaged (JSONDecodeError: x); repair")}
    assert cli.root_cause(torch_saw, reports) == (1, reports[1][1])
    assert cli.root_cause(torch_saw, {0: reports[0]}) == (0, reports[0][1])  # only lost peers: the earliest


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_a_bad_image_is_one_line_naming_the_file_and_the_traceback_stays_in_train_log(tmp_path: Path) -> None:
    from torchvision.io import write_jpeg

    root = tmp_path / "images"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                write_jpeg(torch.full((3, 8, 8), 40 * i, dtype=torch.uint8), str(root / split / cls / f"{i}.jpg"))
    (root / "train" / "dog" / "empty.jpg").write_bytes(b"")
    run_dir = tmp_path / "run"
    base = [o for o in RUN if not o.startswith("data")]
    proc = fdg_train(run_dir, "data=imagefolder", f"data.root={root}", "data.num_classes=2", "data.image_size=8",
                     "trainer.batch_size=4", base=base)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "empty.jpg" in line]
    assert errors == [f"fdg-train: rank 0 (module 0) failed: ValueError: data.root: cannot decode "
                      f"{root / 'train' / 'dog' / 'empty.jpg'} (class folder 'dog'): the file is empty; replace or "
                      f"remove it [every rank's traceback: {run_dir / 'train.log'}]"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" in (run_dir / "train.log").read_text()
