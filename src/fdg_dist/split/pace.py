"""How fast a split runs: the steady-state time per batch of a schedule, predicted from measured costs.

Balancing the slowest module's compute (``partition.split_points``) ignores what a pipeline adds: the
time every message spends between two ranks, and, in the decoupled methods, the loop between
neighbours — module k's forward of batch b goes down the pipeline and its gradient comes back
2(K−1−k) ticks later — so module k idles whenever the modules after it and the messages take longer
than its own ticks.  Walking every rank's real program (``schedule.program``, the order the executor
uses) with measured forward, backward and step times and a time per message predicts both, for any
method and split: ``period`` ranks candidate splits by what the pipeline would do, not by balance.

Must not time anything, start processes or touch files: measured costs in, a predicted period out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from fdg_dist.engine import schedule
from fdg_dist.engine.schedule import Kind


@dataclass(frozen=True)
class BlockTime:
    """Seconds of one block at the training batch: its forward, its backward and its share of the optimizer step,
    and one copy of its output (a message of it costs about two: out of the sender's memory, into the receiver's)."""

    forward: float
    backward: float
    step: float
    copy_out: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.step

    @property
    def message(self) -> float:
        return 2 * self.copy_out


def module_times(blocks: Sequence[BlockTime], bounds: Sequence[int]) -> list[BlockTime]:
    """Each module's summed block times; its output is its last block's."""
    return [BlockTime(sum(b.forward for b in blocks[lo:hi]), sum(b.backward for b in blocks[lo:hi]),
                      sum(b.step for b in blocks[lo:hi]), blocks[hi - 1].copy_out) for lo, hi in pairwise(bounds)]


def split_period(method: str, blocks: Sequence[BlockTime], bounds: Sequence[int], *, recompute: bool = False) -> float:
    """``period`` of the split ``bounds`` of measured blocks, each message costed from its tensor's copy time."""
    modules = module_times(blocks, bounds)
    return period(method, modules, [m.message for m in modules[:-1]], recompute=recompute)


def start_times(method: str, modules: Sequence[BlockTime], message_s: Sequence[float], n_batches: int, *,
                recompute: bool = False, accum_steps: int = 1) -> list[float]:
    """When the last module starts its forward of each batch, walking every rank's program.

    ``message_s[k]``: seconds from the end of the schedule time at which module k (k+1) posts a message to
    module k+1 (k) until the receiver can use it.  Every action starts when its rank is free and its message
    has arrived; a time's messages leave when its actions are done (as the executor posts them).
    """
    K = len(modules)
    steps = {k: schedule.program(schedule.plan(method, k, K, n_batches, train=True, accum_steps=accum_steps), K)
             for k in range(K)}
    merged = sorted((step.time, k, step) for k, ranks in steps.items() for step in ranks)  # messages go forward in time
    free = [0.0] * K
    arrival: dict[tuple[str, int, int], float] = {}  # (kind, batch, receiver) -> seconds
    starts: dict[int, float] = {}
    for _, k, step in merged:
        for action, needs in step.actions:
            begin = free[k] if needs is None else max(free[k], arrival[(*needs, k)])
            if action.kind is Kind.FORWARD and k == K - 1:
                starts[action.batch] = begin
            free[k] = begin + _cost(action, modules[k], last=k == K - 1, recompute=recompute)
        for m in step.sends:
            arrival[(m.kind, m.batch, m.dst)] = free[k] + message_s[min(m.src, m.dst)]
    return [starts[b] for b in range(n_batches)]


def _cost(action: schedule.Action, module: BlockTime, *, last: bool, recompute: bool) -> float:
    if action.kind is Kind.STEP:
        return module.step
    if action.kind is Kind.BACKWARD:
        return module.backward + (module.forward if recompute else 0.0)
    return module.forward + (module.backward if last else 0.0)  # the last module back-propagates its loss at once


def period(method: str, modules: Sequence[BlockTime], message_s: Sequence[float], *, recompute: bool = False,
           accum_steps: int = 1, n_batches: int = 32) -> float:
    """Seconds per batch in the steady state: the last module's pace over the middle half of ``n_batches``."""
    starts = start_times(method, modules, message_s, n_batches, recompute=recompute, accum_steps=accum_steps)
    lo, hi = n_batches // 4, n_batches - n_batches // 4
    return (starts[hi] - starts[lo]) / (hi - lo)
