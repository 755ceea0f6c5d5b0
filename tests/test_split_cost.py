"""``pipeline.cost=counted`` (the default, issue 29): a split from counted FLOPs and bytes, the same in every run."""

from __future__ import annotations

import pytest
from conftest import small_config
from torch import nn

from fdg_dist import models
from fdg_dist.run.trainer import automatic_bounds, build_module
from fdg_dist.split import choice, counted, partition


def test_a_block_is_counted_as_flops_and_the_bytes_its_operations_read_and_write() -> None:
    """Linear(8, 4) at batch 2: 2·2·8·4 FLOPs forward; backward twice that behind another block (input gradient
    and weight gradient), only the weight gradient as the first block.  A ReLU does no FLOPs but moves its
    input and output; the step moves the weights five times (SGD with momentum)."""
    blocks = [nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4)]
    first, relu, last = counted.block_work(blocks, (2, 8))
    assert (first.forward_flops, first.backward_flops) == (128, 128)
    assert (last.forward_flops, last.backward_flops) == (64, 128)
    assert relu.forward_flops == 0 and relu.forward_bytes >= 2 * (2 * 4 * 4)
    assert first.forward_bytes >= 4 * (2 * 8 + 8 * 4 + 4 + 2 * 4)  # input, weight, bias, output in float32
    assert (first.weight_bytes, relu.weight_bytes, first.output_bytes) == (4 * 36, 0, 4 * 8)
    step = counted.priced([first], counted.Rates(flop_s=0.0, byte_s=1.0))[0].step
    assert step == counted.STEP_BYTES_PER_WEIGHT_BYTE * 4 * 36


def test_the_fit_recovers_the_rates_that_made_the_times() -> None:
    work = counted.block_work(models.build_blocks("tiny", 10), (4, 3, 32, 32))
    rates = counted.Rates(flop_s=2e-11, byte_s=3e-10)
    seconds = [(rates.seconds(w.forward_flops, w.forward_bytes), rates.seconds(w.backward_flops, w.backward_bytes))
               for w in work]
    fitted = counted.fit(work, seconds)
    assert fitted.flop_s == pytest.approx(rates.flop_s, rel=1e-9) and fitted.byte_s == pytest.approx(rates.byte_s, rel=1e-9)


def test_the_split_is_the_best_predicted_of_the_priced_blocks_and_the_same_in_every_run() -> None:
    """Counted on the meta device: no clock anywhere, so two runs (or two machines) get one answer; it is the
    predictor's favourite among the balanced split's neighbours, and only the ratio of the rates matters."""
    blocks = models.build_blocks("resnet20", 10)
    shape = (128, 3, 32, 32)
    got = [counted.bounds(blocks, shape, 3, "fdg", recompute=False, device_type="cpu") for _ in range(2)]
    times = counted.block_times(blocks, shape, "cpu")
    assert got[0] == got[1] == choice.rank_candidates(times, 3, "fdg", False, partition.weighted_starts(blocks))[0][0]
    rates = counted.RATES["cpu"]
    doubled = counted.priced(counted.block_work(blocks, shape), counted.Rates(2 * rates.flop_s, 2 * rates.byte_s))
    assert choice.rank_candidates(doubled, 3, "fdg", False, partition.weighted_starts(blocks))[0][0] == got[0]
    assert counted.bounds(blocks, shape, 1, "fdg", recompute=False, device_type="cpu") == [0, len(blocks)]


def test_every_rank_builds_its_module_on_the_counted_split_by_default() -> None:
    """``pipeline.cost=auto`` (and ``counted``) in ``build_module``, at the training batch per replica; ``flops``
    balances counted FLOPs as before; a split by hand wins over both."""
    cfg = small_config(**{"pipeline.k": 3, "pipeline.cost": "auto", "trainer.batch_size": 32, "model.name": "resnet20"})
    blocks = models.build_blocks(cfg.model, cfg.data.num_classes)
    want = counted.bounds(blocks, (32, 3, 32, 32), 3, "fdg", recompute=False, device_type="cpu")
    assert automatic_bounds(cfg, 3, blocks, "cpu") == want
    assert [build_module(cfg, 3, k).bounds for k in range(3)] == [want] * 3
    cfg.pipeline.cost = "flops"
    flops = partition.split_points(partition.block_costs(blocks, (1, 3, 32, 32)), 3, "auto",
                                   partition.weighted_starts(blocks))
    assert automatic_bounds(cfg, 3, blocks, "cpu") == flops != want  # ResNet-20: BatchNorm's bytes move the split
    cfg.pipeline.cost, cfg.pipeline.split = "counted", [1, 2]
    assert automatic_bounds(cfg, 3, blocks, "cpu") == [0, 1, 2, len(blocks)]
