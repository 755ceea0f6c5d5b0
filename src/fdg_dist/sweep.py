"""Hydra sweeps (``fdg-train -m``) that explain themselves: each job's directory is named by the values
it sweeps (``0_beta=0.5,k=2``: TensorBoard shows that name), each job starts with a header, and the
sweep ends with one line per job and the ``fdg-report`` command that compares them.

Hydra knows which keys a command line sweeps only before it expands the sweep, where the callback sees
it (``on_multirun_start``); the jobs learn them from the environment, which also reaches jobs that a
launcher runs in other processes (submitit, SLURM).

An entry point (Hydra's callbacks, layer 6): nothing in the package imports it.  Must not import torch or any
layer: Hydra's own process loads it before any job runs.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fdg_dist.run import split_trial

SWEPT_KEYS_ENV = "FDG_SWEPT_KEYS"


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys that command-line ``overrides`` sweep (``method.beta=0.2,0.5``, ``range(2,5)``, …), in order."""
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]


def job_name(overrides: list[str], swept: list[str]) -> str:
    """``beta=0.5,k=2``: the job's values of the swept keys, each key by its last part unless two share it."""
    short = {key: re.split(r"[./]", key)[-1] for key in swept}
    ambiguous = {s for s in short.values() if list(short.values()).count(s) > 1}
    parts = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.key_or_group in short:
            key = o.key_or_group if short[o.key_or_group] in ambiguous else short[o.key_or_group]
            parts.append(f"{key}={o.get_value_element_as_str()}")
    return re.sub(r"[/\\\s]", "_", ",".join(parts))  # one path component


def job_dir(num: int, overrides: Any) -> str:
    """``hydra.sweep.subdir``: the job number (unique, sorts in order) and its name (``3_beta=0.5,k=2``)."""
    swept = [k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k]
    name = job_name([str(o) for o in overrides], swept) if swept else ""
    return f"{num}_{name}" if name else str(num)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job directories in job order (``<num>`` or ``<num>_<name>``)."""
    jobs = [d for d in sweep_dir.iterdir() if d.is_dir() and re.match(r"\d+(_|$)", d.name)]
    return sorted(jobs, key=lambda d: int(re.match(r"\d+", d.name).group()))


def sweep_summary(sweep_dir: Path) -> str:
    """One line per job (final and best test error, the split it trained — where modules 1..K-1 start —, time,
    validation bits per character for a language model, or what went wrong), then the report command."""
    sweep_dir = sweep_dir.resolve()
    jobs = _job_dirs(sweep_dir)
    width = max([len(d.name) for d in jobs] + [3])
    lines = [f"sweep finished: {len(jobs)} job(s) in {sweep_dir}",
             f"  {'job':<{width}}  final err  best err  split{' ' * 12}training time"]
    for d in jobs:
        path = d / "result.json"
        if not path.is_file():
            lines.append(f"  {d.name:<{width}}  no result.json: see {d / 'train.log'}")
            continue
        r = json.loads(path.read_text())
        final, best = (f"{100 * r[k]:7.2f} %" if r.get(k) is not None else "      –  "
                       for k in ("final_test_error", "best_test_error"))
        split = str(r["split"][1:-1]) if r.get("split") else "–"
        bpc = f"  {r['final_test_bpc']:.3f} bits/{r.get('tokens', 'char')}" if r.get("final_test_bpc") is not None else ""
        lines.append(f"  {d.name:<{width}}  {final}  {best}  {split:<16} {r['wall_time_s']:.1f} s ({r['stop_reason']}){bpc}")
    lines.append(f"compare them: fdg-report {sweep_dir}")
    return "\n".join(lines)


class SweepCallback(Callback):
    """Configured in ``conf/train.yaml`` (``hydra.callbacks``); does nothing outside ``-m`` sweeps."""

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        params = config.hydra.sweeper.get("params") or {}  # sweeps written in a config file
        overrides = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(overrides))
        os.environ[split_trial.SWEEP_DIR] = str(self.sweep_dir.resolve())  # a measured split, measured once

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_dir is not None:
            print(f"\n=== sweep job {config.hydra.job.num}: {config.hydra.runtime.output_dir}",
                  file=sys.stderr, flush=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.sweep_dir is not None and job_return.status is JobStatus.FAILED:
            print(f"=== sweep job {config.hydra.job.num} failed; its log: {config.hydra.runtime.output_dir}/train.log",
                  file=sys.stderr, flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_dir is not None and self.sweep_dir.is_dir():
            print("\n" + sweep_summary(self.sweep_dir), file=sys.stderr, flush=True)
