"""Sweep jobs named by what they sweep, and the end-of-sweep summary (issue 16); the real sweep through
``fdg-train -m`` is in test_launch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fdg_dist import sweep
from fdg_dist.run import split_trial


def test_swept_keys_are_the_keys_with_several_values() -> None:
    overrides = ["model=tiny", "method.beta=0.2,0.5", "pipeline.k=range(2,5)", "data.root=/data/cifar",
                 "trainer.seed=choice(0,1)", "hydra/launcher=slurm"]
    assert sweep.swept_keys(overrides) == ["method.beta", "pipeline.k", "trainer.seed"]


def test_job_directory_is_the_number_and_the_swept_values(monkeypatch: pytest.MonkeyPatch) -> None:
    job = ["model=tiny", "method.beta=0.5", "data.root=/data/cifar", "pipeline.k=2", "optim.lr=0.1"]
    monkeypatch.setenv(sweep.SWEPT_KEYS_ENV, "method.beta,pipeline.k")
    assert sweep.job_dir(3, job) == "3_beta=0.5,k=2"
    monkeypatch.setenv(sweep.SWEPT_KEYS_ENV, "data.root,optim.lr,model")
    assert sweep.job_dir(0, job) == "0_model=tiny,root=_data_cifar,lr=0.1"  # never a nested path
    monkeypatch.setenv(sweep.SWEPT_KEYS_ENV, "optim.lr,sched.lr")  # same last part: full keys
    assert sweep.job_name(["optim.lr=0.1", "sched.lr=2"], ["optim.lr", "sched.lr"]) == "optim.lr=0.1,sched.lr=2"
    monkeypatch.delenv(sweep.SWEPT_KEYS_ENV)
    assert sweep.job_dir(7, job) == "7"


def test_sweep_summary_has_a_line_per_job_and_the_report_command(tmp_path: Path) -> None:
    for name, error in (("0_beta=0.5", 0.25), ("1_beta=1.0", None), ("10_beta=0.2", 0.5)):
        (tmp_path / name).mkdir()
        if error is not None:
            (tmp_path / name / "result.json").write_text(json.dumps(
                {"final_test_error": error, "best_test_error": error, "wall_time_s": 12.34,
                 "stop_reason": "trainer.epochs=2 reached", "split": [0, 3, 7]}))
    (tmp_path / "report").mkdir()
    lines = sweep.sweep_summary(tmp_path).splitlines()
    assert lines[0] == f"sweep finished: 3 job(s) in {tmp_path.resolve()}"
    assert [line.split()[0] for line in lines[2:-1]] == ["0_beta=0.5", "1_beta=1.0", "10_beta=0.2"]
    assert "25.00 %" in lines[2] and "[3]" in lines[2] and "12.3 s (trainer.epochs=2 reached)" in lines[2]
    assert "no result.json: see" in lines[3]
    assert lines[-1] == f"compare them: fdg-report {tmp_path.resolve()}"


def test_callback_finds_the_keys_swept_on_the_command_line_and_in_the_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the jobs' directory names are built from, passed on through the environment."""
    monkeypatch.setenv(sweep.SWEPT_KEYS_ENV, "")  # restored after the test
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)},
                                         "sweeper": {"params": {"trainer.seed": "0,1"}},
                                         "overrides": {"task": ["method.beta=0.5,1", "model=tiny"]}}})
    monkeypatch.setenv(split_trial.SWEEP_DIR, "")
    sweep.SweepCallback().on_multirun_start(config)
    assert os.environ[sweep.SWEPT_KEYS_ENV] == "trainer.seed,method.beta"
    assert os.environ[split_trial.SWEEP_DIR] == str(tmp_path.resolve())  # where jobs share a measured split
