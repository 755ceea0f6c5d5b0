"""TensorBoard output read back with TensorBoard's own reader, the HParams row, the progress-bar rule.

One short K=2 run (2 epochs of 6 batches) is trained once per session and shared with test_report.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_delays_measured,
    assert_staleness_is_the_traces,
    run_pipeline,
    small_config,
    train_spans,
)
from emulated import fake_timeline, record_of, run_emulated
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fdg_dist.engine import schedule
from fdg_dist.engine.executor import HostClock
from fdg_dist.engine.fabric import Endpoint
from fdg_dist.observe.metrics import EpochRecord, Timing, chain, progress_style

EPOCHS, BATCHES, LOG_EVERY = 2, 6, 4
EPOCH_TAGS = ["module/lr", "module/staleness_ticks", "module/stash_max", "time/compute_s", "time/wait_input_s",
              "time/wait_grad_s", "time/other_s", "perf/samples_per_s", "memory/rss_mb", "memory/peak_rss_mb"]
REPORTER_TAGS = ["train/loss", "train/error", "test/loss", "test/error"]


def trained_run(base: Path, beta: float) -> Path:
    """A short K=2 FDG run with TensorBoard on, trained at most once per β per test session."""
    run_dir = base / "runs" / f"beta{beta:g}"
    if not (run_dir / "result.json").exists():
        cfg = small_config(**{"pipeline.k": 2, "trainer.epochs": EPOCHS, "method.beta": beta,
                              "logging.tensorboard": True, "logging.log_every_steps": LOG_EVERY,
                              "logging.trace": True})
        run_pipeline(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory.getbasetemp(), 1.0)


def _events(run_dir: Path, name: str) -> EventAccumulator:
    ea = EventAccumulator(str(run_dir / "tb" / name))
    ea.Reload()
    return ea


def _points(ea: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(s.step, s.value) for s in ea.Scalars(tag)]


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
@pytest.mark.parametrize("module", [0, 1])
def test_every_tag_has_one_point_per_epoch_or_step(run: Path, module: int) -> None:
    ea = _events(run, f"module{module}")
    tags = set(ea.Tags()["scalars"])
    wanted = EPOCH_TAGS + (REPORTER_TAGS if module == 1 else [])
    assert set(wanted) <= tags
    for tag in wanted:
        assert [step for step, _ in _points(ea, tag)] == [(e + 1) * BATCHES for e in range(EPOCHS)], tag
    steps = EPOCHS * BATCHES
    assert [s for s, _ in _points(ea, "module/grad_norm")] == list(range(1, steps + 1))
    # the ratio is measured when the stage's step count (before the step) is a multiple of LOG_EVERY
    assert [s for s, _ in _points(ea, "module/update_ratio")] == list(range(1, steps + 1, LOG_EVERY))
    assert all(v > 0 for _, v in _points(ea, "module/grad_norm") + _points(ea, "module/update_ratio"))
    # staleness as the trace recorded it, whose timeline shows module k's update from batch b first used by
    # its forward of b + 2(K-1-k) (b + 1 at the last module)
    assert_delays_measured(run, module, max(2 * (1 - module), 1), [BATCHES] * EPOCHS)
    assert_staleness_is_the_traces(run, module)
    assert {v for _, v in _points(ea, "module/stash_max")} == {2.0 * (1 - module)}
    # this rank's own memory: a torch process holds hundreds of MB; its peak is at least what it holds
    rss, peak = (_points(ea, f"memory/{tag}") for tag in ("rss_mb", "peak_rss_mb"))
    assert all(100 < r <= p for (_, r), (_, p) in zip(rss, peak, strict=True))
    assert "memory/cuda_peak_mb" not in tags  # CUDA only
    if module == 1:
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [v for _, v in _points(ea, "test/error")] == pytest.approx([m["test_error"] for m in metrics])
        for m in metrics:  # every rank's memory at the epoch's end, gathered by the reporting rank
            assert sorted(m["memory"]) == ["module0", "module1"]
            assert all(100 < u["rss_mb"] <= u["peak_rss_mb"] and "cuda_peak_mb" not in u for u in m["memory"].values())


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_hparams_row_holds_config_and_final_error(run: Path) -> None:
    ea = _events(run, "module1")
    content = ea.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    params = session.session_start_info.hparams
    assert params["method"].string_value == "fdg"
    assert params["beta"].number_value == 1.0 and params["k"].number_value == 2
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"hparams/final_test_error", "hparams/best_test_error"}
    result = json.loads((run / "result.json").read_text())
    assert _points(ea, "hparams/final_test_error") == [(EPOCHS * BATCHES, pytest.approx(result["final_test_error"]))]
    assert "hparams/final_test_error" not in _events(run, "module0").Tags()["scalars"]


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_timing_files_sum_the_traced_spans(run: Path) -> None:
    """compute and waits are the trace's spans summed (the same actions, recorded independently of the
    totals); the spans follow each other, so they fit in the training time and other_s is what is left,
    not a clamp hiding an overrun."""
    for module in (0, 1):
        t = json.loads((run / "timing" / f"module{module}.json").read_text())
        spans = train_spans(run, module, waits=True)
        seconds = {key: sum(s["dur"] for s in spans if pick(s)) / 1e6 for key, pick in (
            ("compute_s", lambda s: s["cat"] != "wait"),
            ("wait_input_s", lambda s: s["cat"] == "wait" and s["name"].startswith("wait forward")),
            ("wait_grad_s", lambda s: s["cat"] == "wait" and s["name"].startswith("wait backward")))}
        assert {key: t[key] for key in seconds} == pytest.approx(seconds, rel=1e-6, abs=1e-9), module
        assert all(s["dur"] > 0 for s in spans if s["cat"] in ("forward", "backward")), "an action took no time"
        assert t["train_s"] - sum(seconds.values()) == pytest.approx(t["other_s"]) and t["other_s"] > 0
        assert t["samples"] == EPOCHS * 96


class _FakeHostClock(HostClock):
    """The host clock reading a fake timeline instead of ``time.perf_counter``."""

    def __init__(self, now: list[float]) -> None:
        self.now = now

    def mark(self) -> float:
        return self.now[0]


def test_the_host_clock_splits_training_time_into_compute_waits_and_the_rest() -> None:
    """On a fake timeline (10 ms per forward, 20 per backward, 1 per step, 5 waiting for each message, 3
    posting each time's messages) each rank's Timing holds every part exactly: compute, both waits, and
    in other_s the posting, the one part no action span covers."""
    cfg = small_config(**{"pipeline.k": 2, "trainer.epochs": 1})
    cost, wait, post = {"forward": 0.010, "backward": 0.020, "step": 0.001}, 0.005, 0.003
    nows: dict[int, list[float]] = {}
    runs = run_emulated(cfg, setup=fake_timeline(cost, wait, _FakeHostClock, nows, post_s=post), evaluate=False)
    for k, run in enumerate(runs):
        events = run.train[0].events
        n = Counter(e.action.kind.value for e in events)
        t = record_of(events).timing
        t.train_s = nows[k][0]
        assert t.compute_s == pytest.approx(sum(cost[kind] * n[kind] for kind in cost)), k
        assert (t.wait_input_s, t.wait_grad_s) == pytest.approx((wait * n["forward"] if k else 0.0, wait * n["backward"]))
        program = schedule.program(schedule.plan("fdg", k, 2, 6, train=True), 2, ordered=Endpoint.ordered)
        posts = sum(1 + bool(step.ahead) for step in program)  # a step posting ahead posts twice
        assert t.other_s == pytest.approx(post * posts) and posts > 0


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_resumed_run_hides_what_the_crashed_attempt_logged_past_its_checkpoint(tmp_path: Path) -> None:
    """A crash after epoch 2 was logged but before its checkpoint: the restart redoes epoch 2, and
    TensorBoard shows every step once, with the values of the attempt that finished."""
    cfg = small_config(**{"pipeline.k": 2, "trainer.epochs": 3, "logging.tensorboard": True,
                          "checkpoint.enabled": True, "checkpoint.keep": 3})
    cfg.resume = "auto"
    run_dir = tmp_path / "run"
    run_pipeline(cfg, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "epoch0002")  # as if the crash came before this checkpoint
    # event files are named by the whole second they were opened in: the restart's must sort after the
    # crashed attempt's (that second is usually long past: the attempt trained two more epochs after it)
    opened = max(int(p.name.split(".")[3]) for p in (run_dir / "tb").rglob("events.out.tfevents.*"))
    while time.time() < opened + 1:
        time.sleep(0.01)
    run_pipeline(cfg, run_dir)
    ea = _events(run_dir, "module1")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert [s for s, _ in _points(ea, "test/error")] == [6, 12, 18]
    assert [v for _, v in _points(ea, "test/error")] == pytest.approx([m["test_error"] for m in metrics])
    assert [s for s, _ in _points(ea, "module/grad_norm")] == list(range(1, 19))
    assert len(list((run_dir / "tb" / "module1").glob("events.*"))) == 2  # both attempts wrote


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("mode,tty,style", [("auto", True, "bar"), ("auto", False, "lines"), ("always", False, "bar"),
                                            ("lines", True, "lines"), ("never", True, "none"), ("never", False, "none")])
def test_progress_bar_on_a_terminal_plain_lines_elsewhere(mode: str, tty: bool, style: str) -> None:
    assert progress_style(mode, _Stream(tty)) == style


def test_chain_calls_each_hook_and_drops_missing_ones() -> None:
    calls: list[str] = []
    assert chain(None, None) is None
    one = calls.append
    assert chain(None, one) is one
    chain(lambda e: calls.append("a"), lambda e: calls.append("b"))(None)  # type: ignore[arg-type]
    assert calls == ["a", "b"]


def test_timing_totals_keep_the_largest_stash() -> None:
    total = Timing(train_s=1.0, compute_s=0.5, stash_max=2)
    total += Timing(train_s=2.0, wait_grad_s=0.5, stash_max=1)
    assert (total.train_s, total.other_s, total.stash_max) == (3.0, 2.0, 2)
    assert EpochRecord(0, torch.device("cpu")).staleness_ticks == 0.0
