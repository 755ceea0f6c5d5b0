"""Partitioning: boundary shapes, FLOP costs, optimal contiguous splits and exact recomposition."""

from __future__ import annotations

import random
from itertools import combinations, pairwise

import pytest
import torch
from torch import nn

from fdg_dist import models
from fdg_dist.split.partition import (
    balance_ratio,
    block_costs,
    boundary_shapes,
    describe,
    measured_block_costs,
    measured_block_times,
    split_points,
)

# Hand-written splits of the original FDG code (github.com/ZHUANGHP/FDG, DG_models.py), translated to
# our block indices: stem=0, layer1=1..9, layer2=10..18, layer3=19..27, head=28.
PAPER_RESNET56_BOUNDS = {
    2: [0, 14, 29],  # stem+layer1+layer2[:4] | rest
    3: [0, 10, 19, 29],  # stem+layer1 | layer2 | layer3+head
    4: [0, 7, 14, 21, 29],  # stem+layer1[:6] | layer1[6:]+layer2[:4] | layer2[4:]+layer3[:2] | rest
}


def _brute_force_bottleneck(costs: list[float], k: int) -> float:
    n = len(costs)
    return min(
        max(sum(costs[a:b]) for a, b in pairwise((0, *cut, n))) for cut in combinations(range(1, n), k - 1)
    )


def test_auto_split_is_optimal_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        costs = [float(rng.choice([1, 2, 3, 5, 8, 13])) for _ in range(n)]
        for k in range(1, n + 1):
            bounds = split_points(costs, k, "auto")
            assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == k + 1
            assert all(a < b for a, b in pairwise(bounds))
            bottleneck = max(sum(costs[a:b]) for a, b in pairwise(bounds))
            assert bottleneck == _brute_force_bottleneck(costs, k)
            assert split_points(list(costs), k, "auto") == bounds  # deterministic


def test_auto_split_hand_made() -> None:
    assert split_points([1.0, 1.0, 1.0, 1.0], 2, "auto") == [0, 2, 4]
    assert split_points([5.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2, "auto") == [0, 1, 6]
    assert split_points([1.0, 2.0, 3.0], 3, "auto") == [0, 1, 2, 3]


def test_manual_split_passthrough_and_validation() -> None:
    assert split_points([1.0] * 10, 3, [2, 7]) == [0, 2, 7, 10]
    for bad in ([7, 2], [0, 5], [5, 10], [3], [2, 2], [1.5, 3]):
        with pytest.raises(ValueError, match=r"pipeline\.split"):
            split_points([1.0] * 10, 3, bad)
    with pytest.raises(ValueError, match=r"pipeline\.split"):
        split_points([1.0] * 10, 3, "even")
    with pytest.raises(ValueError, match=r"pipeline\.k"):
        split_points([1.0] * 3, 4, "auto")


def test_boundary_shapes_resnet20() -> None:
    blocks = models.build_blocks("resnet20", 10)
    shapes = boundary_shapes(blocks, (1, 3, 32, 32))
    expected = (
        [(1, 3, 32, 32)] + [(1, 16, 32, 32)] * 4 + [(1, 32, 16, 16)] * 3 + [(1, 64, 8, 8)] * 3 + [(1, 10)]
    )
    assert [tuple(s) for s in shapes] == expected
    assert all(isinstance(s, torch.Size) for s in shapes)


def test_probe_leaves_blocks_untouched() -> None:
    blocks = models.build_blocks("tiny", 10)
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    boundary_shapes(blocks, (1, 3, 32, 32))
    assert all(b.training for b in blocks)
    for b, sd in zip(blocks, before, strict=True):
        assert all(torch.equal(v, sd[k]) and v.device.type == "cpu" for k, v in b.state_dict().items())


def test_block_costs_positive_on_meta_for_huge_model() -> None:
    blocks = models.build_blocks("wrn28_10", 10, device="meta")
    costs = block_costs(blocks, (1, 3, 32, 32))
    assert len(costs) == len(blocks) and min(costs) > 0
    assert boundary_shapes(blocks, (2, 3, 32, 32))[-1] == (2, 10)


def test_zero_flop_block_gets_nonzero_cost() -> None:
    costs = block_costs([nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()], (1, 3, 8, 8))
    assert costs[0] == 2 * 4 * 3 * 9 * 64
    assert costs[1] == 4 * 64


@pytest.mark.parametrize("name", ["resnet20", "tiny"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_split_composes_to_unsplit_model_exactly(name: str, k: int) -> None:
    torch.manual_seed(k)
    model = models.build(name, 10)
    # Non-trivial BN statistics so eval mode actually uses them.
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32))
    model.eval()
    bounds = split_points(block_costs(list(model), (1, 3, 32, 32)), k, "auto")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        out = x
        for a, b in pairwise(bounds):
            out = nn.Sequential(*model[a:b])(out)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_resnet56_balanced_split(k: int) -> None:
    costs = block_costs(models.build_blocks("resnet56", 10, device="meta"), (1, 3, 32, 32))
    auto = split_points(costs, k, "auto")
    ratio = balance_ratio(costs, auto)
    paper = balance_ratio(costs, PAPER_RESNET56_BOUNDS[k])
    n = len(costs)
    naive = balance_ratio(costs, [i * n // k for i in range(k + 1)])
    print(f"resnet56 K={k}: auto {auto} ratio {ratio:.4f}; paper {paper:.4f}; equal-blocks {naive:.4f}")
    assert ratio <= 1.10
    assert ratio <= min(paper, naive) + 1e-12


def test_describe_table() -> None:
    blocks = models.build_blocks("resnet20", 10, device="meta")
    bounds = [0, 4, 11]
    text = describe(blocks, bounds, (1, 3, 32, 32), batch_size=128, stash_depths=[2, 0])
    lines = text.splitlines()
    assert len(lines) == 1 + 2 + 1
    assert "(128, 16, 32, 32)" in lines[1] and "[0,4)" in lines[1]
    flops = block_costs(blocks, (1, 3, 32, 32))
    assert lines[-1] == f"balance ratio (slowest / mean module FLOPs): {balance_ratio(flops, bounds):.3f}"
    with pytest.raises(ValueError):
        describe(blocks, bounds, (1, 3, 32, 32), 128, [1])


def test_describe_with_measured_seconds() -> None:
    blocks = models.build_blocks("resnet20", 10, device="meta")
    seconds = [0.01] * 4 + [0.002] * 7
    text = describe(blocks, [0, 4, 11], (1, 3, 32, 32), 128, [2, 0], seconds=seconds)
    lines = text.splitlines()
    assert "train ms" in lines[0] and lines[1].endswith(" 40.0") and lines[2].endswith(" 14.0")
    assert lines[-1] == f"balance ratio (slowest / mean module measured time): {40 / 27:.3f}"


def test_measured_costs_time_the_real_blocks_on_a_copy() -> None:
    torch.set_num_threads(1)
    heavy = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(6)], nn.BatchNorm2d(8))
    blocks = [heavy, nn.Conv2d(8, 8, 1), nn.ReLU()]  # 54x the FLOPs of the second block; no parameters in the third
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    times = measured_block_times(blocks, (8, 8, 16, 16), torch.device("cpu"), repeats=3)
    assert len(times) == 3 and times[0].forward > times[1].forward > 0 and times[0].backward > times[1].backward > 0
    assert times[0].step > 0 and times[2].step == 0  # an SGD step of the block's parameters, if it has any
    seconds = measured_block_costs(blocks, (8, 8, 16, 16), torch.device("cpu"), repeats=3)
    assert len(seconds) == 3 and seconds[0] > seconds[1] > 0
    for b, sd in zip(blocks, before, strict=True):  # weights, BN statistics and gradients untouched
        assert all(torch.equal(v, sd[k]) for k, v in b.state_dict().items())
        assert all(p.grad is None for p in b.parameters())




def test_a_first_block_without_weights_is_timed_without_a_backward() -> None:
    """Nothing upstream needs its gradient and it has none of its own (README's own-model example starts with
    Flatten): timing it must not call backward on a tensor without a graph."""
    blocks = [nn.Flatten(), nn.Linear(48, 8)]
    times = measured_block_times(blocks, (4, 3, 4, 4), torch.device("cpu"), repeats=1, warmup=0)
    assert times[0].step == 0 and times[1].backward > 0
