"""Memory does not grow with the epoch (SPEC §7): real gloo pipelines over hundreds of batches of one epoch.

Every rank's resident memory, read by that rank from its own ``/proc/self/statm`` and shown by the reporting
rank's progress lines (brought by the preemption vote), is fitted against the batch count after warm-up.  A
rank that kept what one batch makes would grow by at least the bytes it sends per batch (the old ``reap``,
which waited for gloo's ``is_completed()``, kept every payload of the epoch until the drain:
``tests/mutations/sends_kept_until_drain.patch`` restores it); the slope allowed is a sixteenth of that.
Measured here (2 cores, load ~10): the old reap 715 (K=2) and 1402 (K=4) KiB per batch on module 0; torch's
flight recorder left on (``worker.no_flight_recorder``) 17 and 62; a healthy run at most 5, the resolution of
RSS in whole MB over 300 batches.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_pipeline, small_config
from emulated import run_emulated

from fdg_dist.engine import schedule
from fdg_dist.engine.executor import DeviceClock, Event
from fdg_dist.engine.schedule import Action, Kind
from fdg_dist.engine.stage import StepInfo
from fdg_dist.observe import memory
from fdg_dist.observe.metrics import EpochRecord, ProgressLines
from fdg_dist.run import worker
from fdg_dist.run.trainer import build_module

BATCH, BATCHES, WARM_UP = 32, 400, 100
_BATCH = re.compile(r" batch (\d+)/\d+ ")


def rss_by_batch(train_log: Path) -> dict[str, list[tuple[int, float]]]:
    """Per rank (``module{k}``), (batches done, resident MB) from every progress line of ``train_log``."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in train_log.read_text().splitlines():
        if (usages := memory.parse(line)) is None:
            continue
        batch = int(_BATCH.search(line).group(1))
        for name, usage in usages.items():
            out.setdefault(name, []).append((batch, usage.rss_mb))
    return out


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def sent_per_batch(cfg, K: int) -> list[int]:
    """Bytes each module sends per training batch: its activations and labels down, its gradient up."""
    shapes = [build_module(cfg, K, k).shapes for k in range(K)]
    out = []
    for k, (inp, outp) in enumerate(shapes):
        act = BATCH * (outp[1:].numel() * 4 + 8) if k < K - 1 else 0
        grad = BATCH * inp[1:].numel() * 4 if k > 0 else 0
        out.append(act + grad)
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
@pytest.mark.parametrize("K", [pytest.param(2, marks=pytest.mark.long), 4])
def test_resident_memory_is_flat_over_an_epoch_of_hundreds_of_batches(K: int, tmp_path: Path) -> None:
    cfg = small_config(**{"pipeline.k": K, "trainer.epochs": 1, "data.train_size": BATCH * BATCHES,
                          "data.test_size": BATCH, "data.augment": False, "trainer.batch_size": BATCH,
                          "trainer.eval_batch_size": BATCH, "logging.progress": "lines",
                          "logging.progress_every_s": 0.0})
    run_pipeline(cfg, tmp_path / "run")
    series = rss_by_batch(tmp_path / "run" / "train.log")
    assert sorted(series) == [f"module{k}" for k in range(K)]
    sent = sent_per_batch(cfg, K)
    for k in range(K):
        points = [(b, mb) for b, mb in series[f"module{k}"] if b >= WARM_UP]
        assert len(points) > (BATCHES - WARM_UP) // 2, f"module {k}: too few progress lines"
        grows = slope(points) * 2**20
        assert grows < sent[k] / 16, (f"module {k} grows {grows / 1024:.1f} KiB per batch after warm-up (it sends "
                                     f"{sent[k] / 1024:.0f} KiB per batch): {points[::40]}")
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert sorted(metrics["memory"]) == [f"module{k}" for k in range(K)]  # every rank's, at the epoch's end
    for k in range(K):
        usage = metrics["memory"][f"module{k}"]
        assert usage["peak_rss_mb"] >= usage["rss_mb"] >= series[f"module{k}"][-1][1] - 64


# ------------------------------------------------------------------------------------------ unit level
def test_usage_is_this_process_resident_memory_and_its_peak() -> None:
    before = memory.Usage.now(torch.device("cpu"))
    held = torch.ones(16 * 2**20)  # 64 MiB, every page written
    after = memory.Usage.now(torch.device("cpu"))
    assert after.rss_mb - before.rss_mb > 60 and after.peak_rss_mb >= after.rss_mb and after.cuda_peak_mb is None
    del held


def test_the_vote_carries_every_ranks_memory_through_a_max_over_zeros() -> None:
    """Each rank fills its own slots of the vote and leaves the others 0; MAX over the ranks gives them all."""
    usages = [memory.Usage(1923.5, 2010.25), memory.Usage(12.0, 13.0, 500.5), memory.Usage(7.0, 8.0, 0.0)]
    votes = torch.zeros(len(usages), memory.FIELDS * len(usages), dtype=torch.int64)
    for r, u in enumerate(usages):
        votes[r, memory.FIELDS * r:memory.FIELDS * (r + 1)] = torch.tensor(u.to_ints())
    merged = votes.max(dim=0).values.tolist()
    got = [memory.Usage.from_ints(merged[i:i + memory.FIELDS]) for i in range(0, len(merged), memory.FIELDS)]
    assert got == usages


def test_a_progress_line_shows_every_ranks_memory_and_reads_back(caplog: pytest.LogCaptureFixture) -> None:
    usages = {"module0": memory.Usage(1923.0, 2010.0), "module1": memory.Usage(701.0, 702.0)}
    lines = ProgressLines(0, 1, 10, 0.0, memory=lambda: usages)
    with caplog.at_level(logging.INFO, logger="fdg_dist"):
        for b in range(3):
            lines(Event(Action((b, 2, 0, 0), 0, Kind.FORWARD, b), 0.0, 0.0, 0.0, 0))
    assert len(caplog.records) == 3
    assert "memory MB now/peak module0 1923/2010 module1 701/702" in caplog.records[-1].getMessage()
    assert memory.parse(caplog.records[-1].getMessage()) == usages


def test_the_record_of_an_epoch_keeps_nothing_per_batch() -> None:
    """Module 0 of FDG at K=3 over 1000 batches: the record's only per-batch state, the forward ticks awaiting
    their step, never holds more than the stash depth; its step buffer has the size given at the start;
    staleness is the schedule's 2(K-1) ticks and every step's gradient norm reads back."""
    K, n = 3, 1000
    record = EpochRecord(n, torch.device("cpu"))
    held = 0
    for a in schedule.train_actions("fdg", 0, K, n):
        step = StepInfo(torch.tensor(float(a.batch)), None) if a.kind is Kind.STEP else None
        record.add(Event(a, 0.0, 0.0, 1e-3, 0, (a.batch,) if step else (), step))
        held = max(held, len(record._forward_tick))
    assert held == 2 * (K - 1) and record.values.shape == (n, 5)
    assert record.staleness_ticks == 2 * (K - 1) and record.timing.compute_s == pytest.approx(3 * n * 1e-3)
    assert record.step_values()["module/grad_norm"] == {b: float(b) for b in range(n)}


class _LaggingEvent:
    """A fake CUDA event on a device that finishes each mark ``LAG`` marks after the host recorded it."""

    LAG = 7
    recorded = 0

    def __init__(self) -> None:
        self.n = None

    def record(self) -> None:
        _LaggingEvent.recorded += 1
        self.n = _LaggingEvent.recorded

    def query(self) -> bool:
        return _LaggingEvent.recorded - self.n >= self.LAG

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, other: _LaggingEvent) -> float:
        return float(other.n - self.n)


def test_an_action_is_handed_over_once_the_device_has_passed_it_and_then_let_go() -> None:
    """On a device clock an action's event waits only until the device passed its last mark (``query``), then
    reaches ``on_timed`` in order; the executor holds no more than the device's lag of them, and with
    ``record`` off a pass's result keeps none."""
    cfg = small_config(**{"pipeline.k": 2, "trainer.epochs": 1})
    seen: dict[int, list[tuple[str, int]]] = {0: [], 1: []}
    timed: dict[int, list[tuple[str, int]]] = {0: [], 1: []}
    behind: dict[int, int] = {0: 0, 1: 0}

    def setup(k: int, run) -> None:
        run.executor.clock = DeviceClock(event=_LaggingEvent)
        run.executor.record = False

        def acted(e: Event) -> None:
            seen[k].append((e.action.kind.value, e.action.batch))

        def resolved(e: Event) -> None:
            timed[k].append((e.action.kind.value, e.action.batch))
            behind[k] = max(behind[k], len(seen[k]) - len(timed[k]))

        run.executor.run = functools.partial(run.executor.run, on_action=acted, on_timed=resolved)

    runs = run_emulated(cfg, setup=setup, evaluate=False)
    for k in (0, 1):
        assert timed[k] == seen[k] and len(seen[k]) == len(schedule.train_actions("fdg", k, 2, 6))
        assert 0 < behind[k] <= _LaggingEvent.LAG and runs[k].train[0].events == []


def test_the_flight_recorder_is_off_unless_the_user_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert worker.no_flight_recorder() and os.environ["TORCH_FR_BUFFER_SIZE"] == "0"
    monkeypatch.delenv("TORCH_FR_BUFFER_SIZE")
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")  # debugging a hang: left alone
    assert not worker.no_flight_recorder() and "TORCH_FR_BUFFER_SIZE" not in os.environ


_LAUNCHER_CHECK = """
import sys
from fdg_dist.run import warm
from fdg_dist.train import PRELOAD
from fdg_dist.config import Config, ConfigError
from fdg_dist.validation import validate

def config(k):
    cfg = Config()
    cfg.model.name, cfg.data.name, cfg.pipeline.k = "tiny", "synthetic", k
    return cfg

warm.start(PRELOAD)
warm.call(validate, config(2))
try:
    warm.call(validate, config(50))
except ConfigError as e:
    print("refused:", e)
print("kept:", sorted(m for m in ("torch._dynamo", "torch._inductor", "sympy") if m in sys.modules))
"""


def test_the_launcher_checks_the_model_in_a_child_and_keeps_nothing_of_it() -> None:
    """What the meta-device model check imports (torch._dynamo, torch._inductor, sympy: ~80 MB) stays in the
    process forked from the warm server; its refusal still reaches the launcher as the ConfigError it was."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER_CHECK], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: pipeline.k: K=50 modules but model 'tiny' has only" in proc.stdout
    assert "kept: []" in proc.stdout
