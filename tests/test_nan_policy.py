"""trainer.nan_policy: stop raises naming the module, skip_step drops the step and goes on, off checks nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_pipeline, small_config
from torch import nn

from fdg_dist.finite import NonFiniteError
from fdg_dist.stage import Stage


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


@pytest.mark.multiprocess
@pytest.mark.parametrize("policy", ["skip_step", "off"])
def test_a_diverging_run_finishes_unless_told_to_stop(policy: str, tmp_path: Path) -> None:
    # the same divergence stops a run under the default policy (test_faults)
    cfg = small_config(**{"pipeline.k": 2, "optim.lr": 1e9, "trainer.nan_policy": policy})
    run_pipeline(cfg, tmp_path)
    assert (tmp_path / "final_model.pt").exists()
    assert "NonFiniteError" not in (tmp_path / "train.log").read_text()
