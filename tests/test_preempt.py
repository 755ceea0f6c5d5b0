"""Preemption loses nothing: SIGTERM to one worker or to the launcher cuts the epoch at the same tick on
every rank, writes a checkpoint there (stashes and messages in flight included), ends within 30 s with
one line naming the command that resumes it (hydra.run.dir included), and that command resumes to the
uninterrupted run's weights, bit for bit.

(The cut itself, for every method, is shown in-process in tests/test_fabric.py.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_same_weights, final_state, reference_state
from hydra import compose, initialize_config_dir

from fdg_dist.cli import CONF_DIR, config_from_hydra
from fdg_dist.engine import schedule
from fdg_dist.run import preempt

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(480)]  # two runs and a resume each

K = 3
BATCHES = 30  # an epoch: 480 samples in batches of 16
# 30 batches an epoch: a signal in epoch 2 is voted on and cut mid-epoch (the vote lags K+1 ticks)
OVERRIDES = ["model=tiny", "data=synthetic", "data.train_size=480", "data.test_size=32", "trainer.batch_size=16",
             "trainer.eval_batch_size=32", "trainer.epochs=3", "trainer.threads=1", "optim.lr=0.05",
             "sched.milestones=[1]", f"pipeline.k={K}", "dist.timeout_s=60", "logging.tensorboard=false",
             "logging.progress=never", "checkpoint.enabled=true", "resume=auto",
             "trainer.channels_last=false"]  # the reference computes in NCHW; the split stays the default (auto)


def _fdg_train(run_dir: Path | None, *args: str, cwd: Path = REPO, session: bool = False,
               **env: str) -> subprocess.Popen:
    """``fdg-train`` with ``args`` (OVERRIDES by default) in ``run_dir`` (None: Hydra's default, under ``cwd``);
    ``session``: in a process group of its own, which ``os.killpg`` signals whole."""
    where = [] if run_dir is None else [f"hydra.run.dir={run_dir}"]
    return subprocess.Popen([sys.executable, "-m", "fdg_dist.train", *(args or OVERRIDES), *where],
                            cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=session)


def _uninterrupted(bounds: list[int]) -> dict[str, torch.Tensor]:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        split = f"pipeline.split=[{','.join(map(str, bounds[1:-1]))}]"
        return reference_state(config_from_hydra(compose("train", overrides=[*OVERRIDES, split])))


def _stopped_then_resumed(run_dir: Path, proc: subprocess.Popen, signalled: float, *, mid_epoch: bool) -> str:
    """Check the stopped run and its resume; returns what the stopped run printed on stderr."""
    _, err = proc.communicate(timeout=120)
    stopped = err
    assert time.monotonic() - signalled < 30, "the run took more than 30 s to stop"
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("fdg-train:")]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], err[-3000:]
    command = shlex.split(lines[0].split("; resume with: ", 1)[1])  # what the line says, run as it says
    assert command[0] == "fdg-train" and command[-1] == f"hydra.run.dir={run_dir.resolve()}", lines[0]
    cuts = sorted((run_dir / "checkpoints").glob("epoch*-tick*"))
    if mid_epoch:
        assert cuts and (cuts[-1] / "manifest.json").exists(), sorted((run_dir / "checkpoints").iterdir())
    again = _fdg_train(None, *command[1:], cwd=Path.cwd())  # from elsewhere: the command names the directory
    _, err = again.communicate(timeout=200)
    assert again.returncode == 0, err[-3000:]
    resumed = re.search(r"resumed from .*(epoch\d{4}(-tick\d{6})?) \(next epoch \d/3(, after its tick \d+)?\)",
                        (run_dir / "train.log").read_text())
    assert resumed and bool(resumed.group(2)) == bool(cuts), resumed
    if resumed.group(3):  # the resumed epoch's rate counts only the batches trained since (issue 29)
        tick = int(resumed.group(3).rsplit(" ", 1)[1])
        first = schedule.first_forward_after(schedule.plan("fdg", K - 1, K, BATCHES, train=True), tick)
        row = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1]
        assert 0 < first < BATCHES and row["epoch"] == 1
        assert row["samples_per_s"] * row["epoch_time_s"] == pytest.approx((BATCHES - first) * 16, rel=1e-9)
    # the split (pipeline.cost=auto: counted, the same in every run) is the one the uninterrupted run trains
    bounds = json.loads((run_dir / "split.json").read_text())["bounds"]
    assert json.loads((run_dir / "result.json").read_text())["split"] == bounds
    assert_same_weights(final_state(run_dir), _uninterrupted(bounds))
    return stopped


def test_sigterm_to_one_worker_cuts_the_epoch_and_the_same_command_resumes_bitwise(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _fdg_train(run_dir, FDG_TEST_KILL="module=1,epoch=1,batch=3,signal=TERM")
    marker = run_dir / ".fdg_test_killed-module1"
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    _stopped_then_resumed(run_dir, proc, time.monotonic(), mid_epoch=True)


def test_sigterm_to_the_launcher_of_a_default_directory_run_prints_the_command_that_resumes_it(tmp_path: Path) -> None:
    """Issue 29: a run in Hydra's default timestamped directory said "the same command resumes", which started
    afresh in a new directory; the line now names the command with hydra.run.dir, and running it resumes."""
    proc = _fdg_train(None, cwd=tmp_path)
    while not (logs := list(tmp_path.glob("outputs/*/*/train.log"))) or "epoch0000 written" not in logs[0].read_text():
        assert proc.poll() is None, proc.communicate()[1][-3000:]  # into the second epoch, usually mid-way
        time.sleep(0.05)
    run_dir = logs[0].parent
    proc.send_signal(signal.SIGTERM)  # the agent passes it on to every worker, and waits 30 s for them
    _stopped_then_resumed(run_dir, proc, time.monotonic(), mid_epoch=False)  # a cut, or the end of an epoch


def test_sigterm_to_every_process_of_the_run_stops_it_the_same_way(tmp_path: Path) -> None:
    """SLURM's preemption and ``scancel`` signal every process of a job: the launcher, the warm fork server and
    the workers at once.  The server must outlive it (it reports its workers' exit to the launcher), so the run
    stops as when only the launcher is signalled, at a checkpoint, with the command that resumes it."""
    run_dir = tmp_path / "run"
    proc = _fdg_train(run_dir, session=True)
    while not (run_dir / "train.log").exists() or "epoch0000 written" not in (run_dir / "train.log").read_text():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    signalled = time.monotonic()
    proc.wait(timeout=120)  # the launcher leaves only once every worker has: its line names their checkpoint
    newest = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / "manifest.json").exists())[-1]
    err = _stopped_then_resumed(run_dir, proc, signalled, mid_epoch=False)
    assert f"keeps checkpoint {newest};" in err and "Traceback" not in err, err[-3000:]


class _Done:
    def wait(self) -> bool:
        return True


def test_the_vote_runs_every_vote_every_ticks_and_a_stop_lands_within_its_bound(monkeypatch) -> None:
    """One all-reduce per ``VOTE_EVERY`` ticks (not per tick); a signal at any tick stops the run at most
    ``VOTE_EVERY · (⌈lag / VOTE_EVERY⌉ + 1)`` ticks later, at a vote tick every rank reads alike."""
    posted: list[int] = []
    monkeypatch.setattr(preempt.dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(preempt.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(preempt.dist, "all_reduce", lambda flag, op, group=None, async_op=False:
                        posted.append(int(flag[0])) or _Done())
    lag, every, bound = 4, 8, 16  # K = 3; the documented cadence and delay (16 ticks for K ≤ 7)
    for signalled in (0, 1, 7, 8, 9):
        posted.clear()
        vote = preempt.Preemption(None, lag=lag, device=torch.device("cpu"))
        stopped = None
        for tick in range(64):
            if tick == signalled:
                vote._handle(signal.SIGTERM, None)
            if vote.at(tick):
                stopped = tick
                break
        assert stopped is not None and stopped % every == 0 and 0 < stopped - signalled <= bound
        assert len(posted) == stopped // every + 1  # one vote per 8 ticks, not one per tick
