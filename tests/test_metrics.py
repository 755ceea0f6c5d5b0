"""TensorBoard output read back with TensorBoard's own reader, the HParams row, the progress-bar rule.

One short K=2 run (2 epochs of 6 batches) is trained once per session and shared with test_report.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import run_pipeline, small_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fdg_dist.metrics import Timing, chain, progress_style, staleness

EPOCHS, BATCHES, LOG_EVERY = 2, 6, 4
EPOCH_TAGS = ["module/lr", "module/staleness_ticks", "module/stash_max", "time/compute_s", "time/wait_input_s",
              "time/wait_grad_s", "time/other_s", "perf/samples_per_s", "memory/peak_mb"]
REPORTER_TAGS = ["train/loss", "train/error", "test/loss", "test/error"]


def trained_run(base: Path, beta: float) -> Path:
    """A short K=2 FDG run with TensorBoard on, trained at most once per β per test session."""
    run_dir = base / "runs" / f"beta{beta:g}"
    if not (run_dir / "result.json").exists():
        cfg = small_config(**{"pipeline.k": 2, "trainer.epochs": EPOCHS, "method.beta": beta,
                              "logging.tensorboard": True, "logging.log_every_steps": LOG_EVERY})
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
    # FDG: module k applies batch b's gradient 2(K-1-k) ticks after its forward and stashes as many
    assert {v for _, v in _points(ea, "module/staleness_ticks")} == {2.0 * (1 - module)}
    assert {v for _, v in _points(ea, "module/stash_max")} == {2.0 * (1 - module)}
    if module == 1:
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [v for _, v in _points(ea, "test/error")] == pytest.approx([m["test_error"] for m in metrics])


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
def test_timing_files_add_up(run: Path) -> None:
    for module in (0, 1):
        t = json.loads((run / "timing" / f"module{module}.json").read_text())
        parts = t["compute_s"] + t["wait_input_s"] + t["wait_grad_s"] + t["other_s"]
        assert parts == pytest.approx(t["train_s"]) and t["samples"] == EPOCHS * 96


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
    time.sleep(1.1)  # event file names carry whole seconds
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
    assert staleness([]) == []
