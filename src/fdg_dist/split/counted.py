"""``pipeline.cost=counted``: a split from counted work, the same on every machine and in every run.

A split changes which blocks share a module, and so FDG's arithmetic, not only its speed: a split chosen by a
stopwatch made a sweep's points differ in more than the swept values.  Counted FLOPs alone miss what makes real
stages unequal (memory-bound BatchNorm and ReLU on the large early activations), so every block's forward and
backward are counted on the meta device as FLOPs *and* bytes moved (every tensor each operation reads and
writes), its optimizer step as the bytes of its weights, gradients and momentum, its message as the bytes of its
output; ``RATES`` prices them in seconds per device type (fitted once to measured block times, shipped).  The
priced blocks go through the same predictor the measured trial ranks its candidates with (``pace``, via
``choice.rank_candidates``) and the best predicted split wins: numbers in, the same split out.  Must not time
anything, start processes or touch files: a clock here would make the split depend on the machine's load again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from fdg_dist.split import choice, pace, partition

_META = torch.device("meta")


@dataclass(frozen=True)
class Rates:
    """Seconds per counted FLOP and per byte moved, and per byte of weights an optimizer step moves."""

    flop_s: float
    byte_s: float

    def seconds(self, flops: float, nbytes: float) -> float:
        return flops * self.flop_s + nbytes * self.byte_s


# Only the ratio of the two rates changes which split wins.  CPU: 33.4 GFLOP/s is the least-squares fit to the
# measured forward and backward of ResNet-20's blocks (batch 128, one thread, fp32, NHWC, an AMD EPYC core;
# ``benchmarks/split_cost.py --fit``); the fit's byte rate moved between 3.6 and 5 GB/s with the machine's load
# (6-8 FLOP per byte), and 10 FLOP per byte ranked ResNet-20 and ResNet-56 at K = 2..4 best against their measured
# favourites (within 4 % of the favourite's predicted time: benchmarks/split_cost.py).  CUDA: nothing measured yet;
# an H100's dense fp32 rate over its memory bandwidth (~60 TFLOP/s, ~3 TB/s) stands in.
RATES: dict[str, Rates] = {
    "cpu": Rates(flop_s=1.0 / 33.4e9, byte_s=10.0 / 33.4e9),
    "cuda": Rates(flop_s=1.0 / 60e12, byte_s=1.0 / 3e12),
}
STEP_BYTES_PER_WEIGHT_BYTE = 5  # SGD with momentum: read weight, gradient, momentum; write weight, momentum


@dataclass(frozen=True)
class Work:
    """What one block does at the training batch: FLOPs and bytes of its forward and backward, the bytes of its
    weights and of its output."""

    forward_flops: float
    forward_bytes: float
    backward_flops: float
    backward_bytes: float
    weight_bytes: float
    output_bytes: float


class _Bytes(TorchDispatchMode):
    """Bytes every operation reads and writes (its tensor arguments and results), summed."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        leaves = tree_flatten((args, kwargs or {}))[0] + tree_flatten(out)[0]
        self.total += sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
        return out


def block_work(blocks: Sequence[nn.Module], input_shape: Sequence[int], dtype: torch.dtype = torch.float32
               ) -> list[Work]:
    """Counted work of every block at ``input_shape`` (the batch included), on the meta device: no weights, no
    memory, the same numbers on every machine.  Each block runs in training mode (BatchNorm on batch statistics,
    as in training) and back-propagates a gradient of ones, as ``partition.measured_block_times`` times it."""
    x = torch.empty(tuple(input_shape), dtype=dtype, device=_META)
    work = []
    for i, block in enumerate(blocks):
        state = {k: torch.empty_like(v, device=_META).requires_grad_(isinstance(v, nn.Parameter))
                 for k, v in block.state_dict(keep_vars=True).items()}
        inp = x.detach().requires_grad_(i > 0 and x.is_floating_point())
        with partition._mode(block, train=True):
            with FlopCounterMode(display=False) as fwd_flops, _Bytes() as fwd_bytes:
                out = functional_call(block, state, (inp,))
            with FlopCounterMode(display=False) as bwd_flops, _Bytes() as bwd_bytes:
                if out.requires_grad:
                    out.backward(torch.ones_like(out))
        weights = sum(v.numel() * v.element_size() for v in state.values() if v.requires_grad)
        work.append(Work(fwd_flops.get_total_flops(), fwd_bytes.total, bwd_flops.get_total_flops(), bwd_bytes.total,
                         weights, out.numel() * out.element_size()))
        x = out.detach()
    return work


def priced(work: Sequence[Work], rates: Rates) -> list[pace.BlockTime]:
    """The blocks' predicted seconds (forward, backward, step, one copy of the output) at ``rates``."""
    return [pace.BlockTime(rates.seconds(w.forward_flops, w.forward_bytes),
                           rates.seconds(w.backward_flops, w.backward_bytes),
                           rates.seconds(0, STEP_BYTES_PER_WEIGHT_BYTE * w.weight_bytes),
                           rates.seconds(0, 2 * w.output_bytes)) for w in work]


def block_times(blocks: Sequence[nn.Module], input_shape: Sequence[int], device_type: str,
                dtype: torch.dtype = torch.float32) -> list[pace.BlockTime]:
    """Counted work priced for ``device_type`` ("cpu", "cuda"; another takes the CPU's rates)."""
    return priced(block_work(blocks, input_shape, dtype), RATES.get(device_type, RATES["cpu"]))


def bounds(blocks: Sequence[nn.Module], input_shape: Sequence[int], K: int, method: str, *, recompute: bool,
           device_type: str, dtype: torch.dtype = torch.float32) -> list[int]:
    """The split ``pipeline.cost=counted`` gives: the best predicted of the balanced split and its neighbours
    (ties: the smaller bounds), modules starting only after a block with weights."""
    if K == 1:
        return [0, len(blocks)]
    times = block_times(blocks, input_shape, device_type, dtype)
    return choice.rank_candidates(times, K, method, recompute, partition.weighted_starts(blocks))[0][0]


def fit(work: Sequence[Work], seconds: Sequence[tuple[float, float]]) -> Rates:
    """Least-squares rates (through the origin) that price ``work``'s forwards and backwards as the measured
    ``seconds`` (forward, backward per block): how ``RATES`` was made."""
    rows = [(w.forward_flops, w.forward_bytes) for w in work] + [(w.backward_flops, w.backward_bytes) for w in work]
    ys = [s[0] for s in seconds] + [s[1] for s in seconds]
    sff = sum(f * f for f, _ in rows)
    sbb = sum(b * b for _, b in rows)
    sfb = sum(f * b for f, b in rows)
    sfy = sum(f * y for (f, _), y in zip(rows, ys, strict=True))
    sby = sum(b * y for (_, b), y in zip(rows, ys, strict=True))
    det = sff * sbb - sfb * sfb
    flop_s, byte_s = (sbb * sfy - sfb * sby) / det, (sff * sby - sfb * sfy) / det
    if not (flop_s > 0 and byte_s > 0 and math.isfinite(det)):
        raise ValueError(f"the fit gives non-positive rates ({flop_s:g} s/FLOP, {byte_s:g} s/byte): measure again")
    return Rates(flop_s, byte_s)
