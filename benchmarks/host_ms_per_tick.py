"""Host milliseconds per tick of the engine, with blocks that compute (almost) nothing: what the engine's own
host work costs per tick and rank, before and after the cuts of issue 32, side by side in one invocation.

    python benchmarks/host_ms_per_tick.py [--ks 2 4] [--batches 200] [--repeats 3]

Every rank is a real process on gloo (torch's elastic agent, one thread each) running the real stage,
executor, transport and preemption vote on an fdg pipeline whose modules are 24 one-scalar blocks each (a
multiply per block on a 4×10 activation): the wall time of an epoch is the host's work plus waiting for a
neighbour's host work.  Reported per tick (median of ``--repeats``): the slowest rank's wall milliseconds,
and the busiest rank's CPU milliseconds (all its threads: gloo's included; waiting costs none, so this one
stays meaningful on a loaded machine), for

- ``before``: one norm kernel per parameter for the gradient norm, and a preemption vote every tick;
- ``after``: the fused norm (``torch._foreach_norm``) and a vote every ``preempt.VOTE_EVERY`` ticks;

run alternately (before, after, before, …) so drifting load hits both alike, and ``after/before``.  CUDA
events (three per action under ``DeviceClock``) do not exist on the CPU and are not measured here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workers import launch  # noqa: E402

from fdg_dist.engine import schedule, stage  # noqa: E402
from fdg_dist.engine.executor import Boundary, Executor  # noqa: E402
from fdg_dist.engine.transport import TorchWire, Transport  # noqa: E402
from fdg_dist.run import distributed  # noqa: E402
from fdg_dist.run.preempt import VOTE_EVERY, Preemption  # noqa: E402

BLOCKS, WIDTH, BATCH = 24, 10, 4


class Scale(nn.Module):
    """A block with one weight and one multiply: compute ≈ 0, a parameter the step and its norm must visit."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def per_parameter_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The gradient norm before the cut: one kernel per parameter."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


def epoch_ms_per_tick(ctx: distributed.Context, variant: str, batches: int, epoch: int) -> tuple[float, float]:
    """(wall ms, this process's CPU ms) per tick of one epoch of ``variant``."""
    k, K = ctx.module, ctx.K
    torch.manual_seed(k)
    module = nn.Sequential(*[Scale() for _ in range(BLOCKS)])
    st = stage.Stage(module, k, K, torch.optim.SGD(module.parameters(), lr=1e-3), None)
    wire = TorchWire(ctx.pipeline_ranks, ctx.links, ctx.header_group, ctx.device, ctx.backend)
    executor = Executor(st, Transport(wire, k, ctx.device), Boundary((WIDTH,), (WIDTH,)))
    vote = Preemption(ctx.control_group, lag=K + 1, device=ctx.device, every=1 if variant == "before" else VOTE_EVERY)
    stage.grad_norm = per_parameter_norm if variant == "before" else FUSED
    plan = schedule.plan("fdg", k, K, batches, train=True)
    ticks = len({s.time[0] for s in schedule.program(plan, K)})
    data = iter([(torch.randn(BATCH, WIDTH), torch.zeros(BATCH, dtype=torch.int64))] * batches) if k == 0 else None
    dist.barrier(group=ctx.control_group)
    tic, cpu = time.perf_counter(), time.process_time()
    executor.run(plan, [BATCH] * batches, data, epoch=epoch, train=True, stop=vote)
    return 1e3 * (time.perf_counter() - tic) / ticks, 1e3 * (time.process_time() - cpu) / ticks


FUSED = stage.grad_norm


def rank_main(K: int, batches: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    torch.set_num_threads(1)
    ctx = distributed.init(K, backend="gloo", timeout_s=120)
    out: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    try:
        epoch_ms_per_tick(ctx, "after", batches // 4, 0)  # warm-up: first messages, allocator
        for r in range(repeats):
            for variant in ("before", "after"):
                out[variant].append(epoch_ms_per_tick(ctx, variant, batches, 1 + r))
    finally:
        distributed.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batches", type=int, default=200, help="batches per measured epoch")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load = os.getloadavg()
    print(f"host ms per tick, fdg, zero-compute blocks ({BLOCKS} one-scalar blocks per module, batch {BATCH}), "
          f"gloo, one thread per rank, {args.batches} batches, median of {args.repeats}; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at start")
    print("| K | wall ms/tick before | after | after/before | CPU ms/tick/rank before | after | after/before |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")
    for K in args.ks:
        ranks = launch(rank_main, K, K, args.batches, args.repeats)
        cells = []
        for i in (0, 1):  # wall of the slowest rank; CPU time of the busiest rank
            before, after = (statistics.median(max(r[v][n][i] for r in ranks) for n in range(args.repeats))
                             for v in ("before", "after"))
            cells.append(f"{before:.3f} | {after:.3f} | {after / before:.2f}")
        print(f"| {K} | {' | '.join(cells)} |", flush=True)
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
