"""trainer.nan_policy: stop raises naming the module, skip_step drops the step and goes on, off checks nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_pipeline, small_config
from torch import nn

from fdg_dist.engine.finite import LAG, FiniteWatch, NonFiniteError
from fdg_dist.engine.stage import Stage


def _last_stage(policy: str) -> tuple[Stage, nn.Linear]:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    return Stage(layer, 0, 1, opt, None, nan_policy=policy), layer


def _nan_batch(stage: Stage) -> None:
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    stage.forward(0, x, torch.zeros(8, dtype=torch.long), train=True, keep_for_backward=False)


def test_stop_raises_one_step_late_naming_module_and_the_step_where_it_happened() -> None:
    stage, _ = _last_stage("stop")
    _nan_batch(stage)
    stage.step()  # no host read here: the flag travels to the host while the next step runs
    _nan_batch(stage)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient in module 0 at its step 0\b"):
        stage.step()


def test_stop_reads_the_last_step_at_the_epoch_end() -> None:
    stage, _ = _last_stage("stop")
    _nan_batch(stage)
    stage.step()
    with pytest.raises(NonFiniteError, match=r"module 0 at its step 0\b"):
        stage.finite.flush()


def test_skip_step_leaves_weights_and_step_count_and_clears_the_gradient() -> None:
    stage, layer = _last_stage("skip_step")
    before = layer.weight.detach().clone()
    _nan_batch(stage)
    stage.step()
    assert torch.equal(layer.weight, before) and stage.steps == 0
    assert layer.weight.grad is None and stage.pending_backwards == 0


def test_off_applies_the_step_unchecked() -> None:
    stage, layer = _last_stage("off")
    _nan_batch(stage)
    stage.step()
    assert stage.steps == 1 and torch.isnan(layer.weight).any()


def _steps_and_finite_weights(run_dir: Path, k: int) -> tuple[int, bool]:
    """Module k's optimizer steps and whether its weights are all finite, from its last checkpoint."""
    state = torch.load(run_dir / "checkpoints" / "epoch0001" / f"module{k}-replica0.pt", weights_only=True)["stage"]
    finite = all(bool(torch.isfinite(w).all()) for n, w in state["module"].items() if w.is_floating_point()
                 and "running" not in n)  # BatchNorm statistics are not weights
    return state["steps"], finite


@pytest.mark.multiprocess
def test_a_diverging_run_finishes_skip_step_keeps_weights_finite_and_off_does_not(tmp_path: Path) -> None:
    """The same divergence (lr 1e9; it stops a run under the default policy, test_faults) under each
    policy: both finish; skip_step drops the non-finite steps (fewer steps, finite weights), off applies
    all 12 (2 epochs of 6 batches) and its weights go non-finite."""
    seen = {}
    for policy in ("skip_step", "off"):
        cfg = small_config(**{"pipeline.k": 2, "optim.lr": 1e9, "trainer.nan_policy": policy,
                              "checkpoint.enabled": True})
        run_pipeline(cfg, tmp_path / policy)
        assert (tmp_path / policy / "final_model.pt").exists()
        assert "NonFiniteError" not in (tmp_path / policy / "train.log").read_text()
        seen[policy] = [_steps_and_finite_weights(tmp_path / policy, k) for k in range(2)]
    assert seen["off"] == [(12, False), (12, False)]
    assert all(finite and steps < 12 for steps, finite in seen["skip_step"]), seen["skip_step"]


class _Copy:
    """A fake device-to-host copy: arrives when the test says so; counts the host's waits."""

    waits = 0

    def __init__(self) -> None:
        self.arrived = False

    def query(self) -> bool:
        return self.arrived

    def synchronize(self) -> None:
        _Copy.waits += 0 if self.arrived else 1
        self.arrived = True


class _SlowWatch(FiniteWatch):
    """A watch whose copies behave like a GPU's: in flight until ``arrive`` lands them."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.copies: list[_Copy] = []

    def _to_host(self, flags: torch.Tensor) -> tuple[torch.Tensor, _Copy]:
        self.copies.append(_Copy())
        return flags, self.copies[-1]


def _publish(watch: FiniteWatch, value: float, step: int) -> None:
    watch.watch(torch.tensor(value), f"non-finite gradient in module 0 at its step {step}")
    watch.publish()


def test_stop_polls_copies_in_flight_without_waiting_and_stops_within_lag_steps_naming_the_step() -> None:
    _Copy.waits = 0
    watch = _SlowWatch()
    _publish(watch, float("nan"), 0)
    for step in range(1, LAG):  # the copy of step 0 is still in flight: no read, no wait
        _publish(watch, 1.0, step)
    assert _Copy.waits == 0
    with pytest.raises(NonFiniteError, match=r"at its step 0\b"):  # LAG steps on: the host waits, and stops
        _publish(watch, 1.0, LAG)
    assert _Copy.waits == 1


def test_stop_reads_a_copy_as_soon_as_it_has_arrived() -> None:
    _Copy.waits = 0
    watch = _SlowWatch()
    _publish(watch, 1.0, 0)
    _publish(watch, float("inf"), 1)
    watch.copies[1].arrived = True  # step 1's copy lands before step 0's: read in order, step 0 first
    _publish(watch, 1.0, 2)
    watch.copies[0].arrived = True
    with pytest.raises(NonFiniteError, match=r"at its step 1\b"):
        _publish(watch, 1.0, 3)
    assert _Copy.waits == 0
