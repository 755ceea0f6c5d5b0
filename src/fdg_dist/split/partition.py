"""Splitting a block list into K contiguous pipeline modules, and reporting the result.

Pure functions, no process group: every rank computes the same split from the same inputs.
Shapes and FLOPs are computed on the meta device so even wrn28_10 costs no real memory.  A model's
input is float images or, for language models, int64 tokens (``dtype``); every later boundary is what
the blocks make of it.

Must not start processes, create process groups or touch files.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from itertools import pairwise

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from fdg_dist import models
from fdg_dist.split import pace

_META = torch.device("meta")


@contextmanager
def _mode(module: nn.Module, train: bool) -> Iterator[None]:
    """Train or eval mode for a probe pass, restoring the old flags: eval for shapes and FLOPs (BatchNorm
    rejects 1-sample batches in training), train for what a stashed forward saves (batch statistics)."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(train)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _meta_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``block`` with all parameters and buffers swapped for meta tensors; the block is untouched."""
    state = {k: torch.empty_like(v, device=_META) for k, v in block.state_dict(keep_vars=True).items()}
    with torch.no_grad(), _mode(block, train=False):
        return functional_call(block, state, (x,))


def _probe(blocks: Sequence[nn.Module], input_shape: Sequence[int], dtype: torch.dtype = torch.float32
           ) -> tuple[list[torch.Size], list[int], list[torch.dtype]]:
    """Boundary shapes, counted forward FLOPs of each block and boundary dtypes for one meta pass."""
    x = torch.empty(tuple(input_shape), dtype=dtype, device=_META)
    shapes, flops, dtypes = [x.shape], [], [x.dtype]
    for block in blocks:
        with FlopCounterMode(display=False) as counter:
            x = _meta_forward(block, x)
        shapes.append(x.shape)
        flops.append(counter.get_total_flops())
        dtypes.append(x.dtype)
    return shapes, flops, dtypes


def boundary_shapes(blocks: Sequence[nn.Module], input_shape: Sequence[int],
                    dtype: torch.dtype = torch.float32) -> list[torch.Size]:
    """Input shape of every block followed by the model output shape (``len(blocks) + 1`` entries)."""
    return _probe(blocks, input_shape, dtype)[0]


def block_costs(blocks: Sequence[nn.Module], input_shape: Sequence[int],
                dtype: torch.dtype = torch.float32) -> list[float]:
    """Per-block forward FLOPs for ``input_shape``.

    Blocks without counted FLOPs (only element-wise ops) are charged their output element count so
    no block is free and the partitioner still spreads them.
    """
    return _charged(*_probe(blocks, input_shape, dtype)[:2])


def _charged(shapes: Sequence[torch.Size], flops: Sequence[int]) -> list[float]:
    return [
        float(f) if f > 0 else float(max(math.prod(s), 1)) for f, s in zip(flops, shapes[1:], strict=True)
    ]


def measured_block_times(blocks: Sequence[nn.Module], input_shape: Sequence[int], device: torch.device,
                         *, precision: str = "fp32", channels_last: bool = False, repeats: int = 5,
                         warmup: int = 2, dtype: torch.dtype = torch.float32) -> list[pace.BlockTime]:
    """Per-block seconds of one training forward, its backward, an SGD step of the block's parameters and a copy
    of its output at ``input_shape`` (of ``dtype``: int64 tokens for a language model): the fastest of
    ``repeats`` rounds after ``warmup`` rounds, each part on its own.

    Counted FLOPs miss what makes real stages unequal (memory-bound BatchNorm/ReLU on large early
    activations, kernel efficiency per layer shape), so this times the real thing.  Each block runs
    alone on its own input (computed once), a round visits every block, and the minimum over rounds
    is kept: timing the whole model's forward then backward instead let allocator effects of the
    growing graph inflate some blocks by 50 %, and a median kept more of that noise.  It works on a
    copy: the model's weights, statistics and gradients stay untouched.
    """
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fmt = models.memory_format(channels_last)
    probes = [copy.deepcopy(b).to(device, memory_format=fmt).train() for b in blocks]
    # momentum and weight decay as in training; lr 0 so the copies do not drift between rounds
    optimizers = [torch.optim.SGD(p.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
                  if any(True for _ in p.parameters()) else None for p in probes]
    inputs = []
    x = (torch.randn(tuple(input_shape), device=device) if dtype.is_floating_point
         else torch.zeros(tuple(input_shape), dtype=dtype, device=device))  # token 0 is valid in any vocabulary
    with torch.no_grad(), autocast:
        for probe in probes:
            inputs.append(models.to_layout(x, fmt))
            x = probe(inputs[-1])
    rounds: list[list[tuple[float, float, float, float]]] = []
    for _ in range(warmup + repeats):
        seconds = []
        for i, (probe, optimizer) in enumerate(zip(probes, optimizers, strict=True)):
            inp = inputs[i].detach().requires_grad_(i > 0 and inputs[i].is_floating_point())
            sync()
            tic = time.perf_counter()
            with autocast:
                out = probe(inp)
            sync()
            mid = time.perf_counter()
            if out.requires_grad:  # a first block without weights (e.g. Flatten) has no backward to time
                out.backward(torch.ones_like(out))
            sync()
            end = time.perf_counter()
            stepped = end
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync()
                stepped = time.perf_counter()
            out.detach().clone()
            sync()
            seconds.append((mid - tic, end - mid, stepped - end, time.perf_counter() - stepped))
            del inp, out  # free before the next block allocates, as a pipeline stage would
        rounds.append(seconds)
    return [pace.BlockTime(*(min(r[i][part] for r in rounds[warmup:]) for part in range(4)))
            for i in range(len(probes))]


def measured_block_costs(blocks: Sequence[nn.Module], input_shape: Sequence[int], device: torch.device,
                         **kwargs: object) -> list[float]:
    """Per-block seconds of a training forward + backward + step (``measured_block_times`` summed): what a
    balanced split by measured time balances."""
    return [t.total for t in measured_block_times(blocks, input_shape, device, **kwargs)]


def stash_bytes(blocks: Sequence[nn.Module], input_shape: Sequence[int], mode: str = "weights",
                dtype: torch.dtype = torch.float32) -> int:
    """Bytes one stashed forward of ``blocks`` holds at ``input_shape`` (batch included), measured.

    ``weights``: the input, every tensor autograd saves for the backward (seen through saved-tensor
    hooks, storages counted once) and the output, plus the weight snapshot; ``recompute``: the input
    only.  Measured on the meta device: the real graph, no memory.  Counting only the input and the
    weights, as an estimate would, misses the saved activations — several times larger on module 0.
    """
    x = torch.empty(tuple(input_shape), dtype=dtype, device=_META)
    if mode == "recompute":
        return x.untyped_storage().nbytes()
    module = nn.Sequential(*blocks)
    state = {k: torch.empty_like(v, device=_META).requires_grad_(isinstance(v, nn.Parameter))
             for k, v in module.state_dict(keep_vars=True).items()}
    live = {t.untyped_storage()._cdata for t in state.values()}  # weights and buffers: not activations
    held: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        held[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    x.requires_grad_(x.is_floating_point())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _mode(module, train=True):
        out = functional_call(module, state, (x,))
    for t in (x, out):
        held[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    return sum(n for s, n in held.items() if s not in live) + weights


def _module_costs(costs: Sequence[float], bounds: Sequence[int]) -> list[float]:
    return [float(sum(costs[a:b])) for a, b in pairwise(bounds)]


def _balanced_bounds(costs: Sequence[float], k: int) -> list[int]:
    """Exact linear partition minimising the largest module cost (DP over prefix sums).

    Ties go to the largest last split point, a fixed rule so every rank agrees.
    """
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[j][i]: minimal bottleneck putting blocks [0, i) into j modules; cut[j][i]: start of module j.
    best = [[math.inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(i - 1, j - 2, -1):
                seg = prefix[i] - prefix[s]
                if seg >= best[j][i]:
                    break  # segments only grow as s decreases
                cand = max(best[j - 1][s], seg)
                if cand < best[j][i]:
                    best[j][i], cut[j][i] = cand, s
    bounds = [n]
    for j in range(k, 0, -1):
        bounds.append(cut[j][bounds[-1]])
    return bounds[::-1]


def weighted_starts(blocks: Sequence[nn.Module]) -> list[int]:
    """Where an automatic split may start a module: after a block with weights, if weights follow.  A module
    without any (a lone Flatten, ReLU or pooling block) would have nothing to train."""
    weighted = [any(True for _ in b.parameters()) for b in blocks]
    return [j for j in range(1, len(blocks)) if weighted[j - 1] and any(weighted[j:])]


def split_points(costs: Sequence[float], k: int, split: str | Sequence[int],
                 starts: Sequence[int] | None = None) -> list[int]:
    """Bounds ``[0, s1, ..., s_{K-1}, n]``; module i holds blocks ``bounds[i]:bounds[i+1]``.

    ``split="auto"`` balances by cost, starting modules only at ``starts`` (default: any block; see
    ``weighted_starts``); a list of K-1 block indices is used as given.
    """
    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(f"pipeline.k={k} must be between 1 and the number of blocks ({n})")
    if isinstance(split, str):
        if split != "auto":
            raise ValueError(f"pipeline.split={split!r} must be 'auto' or a list of {k - 1} block indices")
        if starts is None:
            return _balanced_bounds(costs, k)
        groups = [0, *starts, n]  # blocks [groups[i], groups[i+1]) always stay together
        if k > len(groups) - 1:
            raise ValueError(f"pipeline.k={k}: an automatic split has only {len(groups) - 1} places to put modules "
                             f"(a module starts after a block with weights); use pipeline.k ≤ {len(groups) - 1}")
        return [groups[i] for i in _balanced_bounds(_module_costs(costs, groups), k)]
    points = list(split)
    bounds = [0, *points, n]
    if (
        len(points) != k - 1
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in points)
        or any(a >= b for a, b in pairwise(bounds))
    ):
        raise ValueError(
            f"pipeline.split={points} must be {k - 1} strictly increasing block indices in 1..{n - 1}"
        )
    return bounds


def balance_ratio(costs: Sequence[float], bounds: Sequence[int]) -> float:
    """Slowest module cost over mean module cost: 1.0 is a perfectly balanced pipeline."""
    per_module = _module_costs(costs, bounds)
    return max(per_module) / (sum(per_module) / len(per_module))


def describe(
    blocks: Sequence[nn.Module],
    bounds: Sequence[int],
    input_shape: Sequence[int],
    batch_size: int,
    stash_depths: Sequence[int],
    dtype_bytes: int = 4,
    seconds: Sequence[float] | None = None,
    stash: str = "weights",
    dtype: torch.dtype = torch.float32,
    names: Sequence[str] | None = None,
) -> str:
    """Printable per-module table: blocks, parameters, GFLOPs per sample, activation sent downstream
    (at ``batch_size``), stash memory (depth x ``stash_bytes`` in fp32, measured) and, given measured
    per-block ``seconds``, the module's training time (forward, backward, step); then the balance of what
    split it. ``dtype`` is the model input's (int64 tokens for a language model); ``names`` (the blocks' names
    in the model) add each module's first and last block.
    """
    k = len(bounds) - 1
    if len(stash_depths) != k:
        raise ValueError(f"describe needs {k} stash depths, got {len(stash_depths)}")
    sample_shape = tuple(input_shape[1:])
    shapes, flops, dtypes = _probe(blocks, (1, *sample_shape), dtype)
    batch_shapes = [torch.Size((batch_size, *s[1:])) for s in shapes]
    mib = 2.0**20
    rows = [
        f"{'module':>6} {'blocks':>9} {'params':>11} {'GFLOP/sample':>12} "
        f"{'sends (batch ' + str(batch_size) + ')':>24} {'MiB':>8} {'stash MiB':>10}"
        + (f" {'train ms':>10}" if seconds is not None else "")
        + ("  first .. last block" if names is not None else "")
    ]
    for i, (a, b) in enumerate(pairwise(bounds)):
        params = sum(p.numel() for blk in blocks[a:b] for p in blk.parameters())
        act_out = math.prod(batch_shapes[b]) * dtype_bytes
        held = stash_depths[i] * stash_bytes(blocks[a:b], batch_shapes[a], stash, dtypes[a]) if stash_depths[i] else 0
        rows.append(
            f"{i:>6} {f'[{a},{b})':>9} {params:>11,} {sum(flops[a:b]) / 1e9:>12.4f} "
            f"{str(tuple(batch_shapes[b])):>24} {act_out / mib:>8.2f} {held / mib:>10.2f}"
            + (f" {sum(seconds[a:b]) * 1e3:>10.1f}" if seconds is not None else "")
            + (f"  {names[a]} .. {names[b - 1]}" if names is not None else "")
        )
    if seconds is None:
        rows.append(f"balance ratio (slowest / mean module FLOPs): "
                    f"{balance_ratio(_charged(shapes, flops), bounds):.3f}")
    else:
        rows.append(f"balance ratio (slowest / mean module measured time): {balance_ratio(seconds, bounds):.3f}")
    return "\n".join(rows)
