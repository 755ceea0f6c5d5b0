"""``pipeline.cost=time``: the split a run measures, predicts, tries in its own pipeline, and keeps.

A split that only balances per-block times measured once flips between neighbours from run to run
(a few % of timing noise moves a boundary by one block), and a pipeline is not the sum of its blocks:
messages take time, modules slow each other down, and in FDG module k idles whenever the modules after
it and two message times take longer than its own tick.  So every fresh run:

1. rank 0 times every block's forward, backward and optimizer step at the training batch on its device
   (``partition.measured_block_times``);
2. every rank ranks the same candidates — the balanced split and its neighbours, each boundary moved by
   up to ``SPREAD`` blocks — by the steady-state time per batch ``pace.split_period`` predicts for them
   (every message costed as two copies of its tensor);
3. the best ``TRIALS`` (those predicted within ``PLAUSIBLE`` of the best: a noisy trial must not pick a
   poor split) run ``TRIAL_BATCHES`` synthetic batches each in the real pipeline (the run's own
   stages, messages and devices), in ``ROUNDS`` interleaved rounds, timed like the benchmark (the last
   module's pace over the middle half of the batches); the fastest measured wins, and among candidates
   within ``TIE`` of it (equal within the noise) a fixed rule, so fresh runs agree;
4. rank 0 keeps the measurements, the trial and the choice in ``split_choice.json``: a restart in the run
   directory reuses the choice (its checkpoints hold that split's modules), the run log says what won.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fdg_dist import checkpoint, data, models, pace, partition, schedule
from fdg_dist.config import Config
from fdg_dist.distributed import Context
from fdg_dist.executor import Boundary, DeviceClock, Executor, HostClock
from fdg_dist.schedule import Kind
from fdg_dist.stage import Stage
from fdg_dist.transport import Transport

log = logging.getLogger("fdg_dist")

FILE = "split_choice.json"
SPREAD = 2  # blocks each boundary of the balanced split may move
TRIALS = 3  # candidates tried in the pipeline
TRIAL_BATCHES = 16  # per candidate and round; the middle half is timed
ROUNDS = 2
PLAUSIBLE = 0.10  # only candidates predicted within this of the best are tried: noise cannot pick a poor one
TIE = 0.02  # candidates this close (relative seconds per batch) count as equally fast
TRIAL_BUDGET_S = 60.0  # at most this long (predicted) in trials: fewer rounds or candidates, or none, beyond it

BuildStage = Callable[[list[int]], tuple[Stage, Boundary]]


@dataclass
class Choice:
    bounds: list[int]
    block_seconds: list[float]  # measured forward + backward + step per block (the split table's column)
    how: str  # one line for the run log


def choose(cfg: Config, ctx: Context, run_dir: Path, transport: Transport, build: BuildStage) -> Choice:
    """The split of this run (a collective: every rank calls it and gets the same answer)."""
    kept: list[tuple[str, dict] | None] = [_kept(cfg, run_dir) if ctx.rank == 0 else None]
    dist.broadcast_object_list(kept, src=0, group=ctx.header_group)
    if kept[0] is not None:
        where, record = kept[0]
        return Choice(record["bounds"], [pace.BlockTime(*t).total for t in record["block_times"]],
                      f"kept from {where} (chosen when that run started)")
    times = _measured(cfg, ctx)
    starts = partition.weighted_starts(models.build_blocks(cfg.model, cfg.data.num_classes, device="meta"))
    ranked = rank_candidates(times, ctx.K, cfg.method.name, cfg.method.name == "fr" or cfg.method.stash == "recompute",
                             starts)
    runs = int(TRIAL_BUDGET_S // (TRIAL_BATCHES * ranked[0][1]))  # trial runs that fit the budget
    tried = worth_trying(ranked, runs)
    rounds = min(ROUNDS, runs // len(tried)) if tried else 0
    trial = _trial(cfg, ctx, transport, build, [b for b, _ in tried], rounds)
    bounds = tried[decide([b for b, _ in tried], trial)][0] if tried else ranked[0][0]
    if ctx.rank == 0:
        record = {"shape": _batch_shape(cfg, ctx), "block_times": [[t.forward, t.backward, t.step, t.copy_out] for t in times],
                  "tried": [{"bounds": b, "predicted_s": p, "trial_s": t} for (b, p), t in zip(tried, trial, strict=True)],
                  "bounds": bounds}
        checkpoint.atomic_write(json.dumps(record).encode(), run_dir / FILE)
    if runs < 2:
        how = f"the best predicted split (a trial in the pipeline would take more than {TRIAL_BUDGET_S:.0f} s)"
    elif not tried:
        how = f"the best predicted split (no other predicted within {100 * PLAUSIBLE:.0f} % of it)"
    else:
        how = (f"the fastest in this pipeline of the {len(tried)} best predicted splits (per batch: " + ", ".join(
            f"{b[1:-1]} {1e3 * min(t):.0f} ms" for (b, _), t in zip(tried, trial, strict=True)) + ")")
    return Choice(bounds, [t.total for t in times], f"{how}; kept in {FILE}")


def worth_trying(ranked: list[tuple[list[int], float]], runs: int) -> list[tuple[list[int], float]]:
    """The candidates a trial compares: the best ``TRIALS`` (fewer if only ``runs`` trial runs fit the budget)
    predicted within ``PLAUSIBLE`` of the best; none if that leaves fewer than two."""
    plausible = [c for c in ranked[:min(TRIALS, runs)] if c[1] <= ranked[0][1] * (1 + PLAUSIBLE)]
    return plausible if len(plausible) >= 2 else []


def decide(candidates: list[list[int]], trial: list[list[float]]) -> int:
    """Which tried candidate wins: among those whose seconds per batch (the best of its rounds: interference
    and the first run's warm-up only ever slow a round down) are within ``TIE`` of the fastest, the one with
    the fewest blocks on the first modules (lexicographically smallest bounds).

    Candidates that close are equally fast within the trial's noise; a fixed rule among them (rather than
    the noise) decides, so fresh runs agree, and it favours the early modules, which stash the most forwards.
    """
    best = [min(rounds) for rounds in trial]
    fastest = min(best)
    return min((i for i, b in enumerate(best) if b <= fastest * (1 + TIE)), key=lambda i: candidates[i])


def _kept(cfg: Config, run_dir: Path) -> tuple[str, dict] | None:
    """A choice made earlier: in this run directory (a restart), else in the run directory of the checkpoint
    ``resume`` names (a run directory, its checkpoint directory or one ``epochNNNN/``), whose modules have it,
    if it cut the model into as many modules as this run does."""
    if cfg.resume == "never":  # a fresh start chooses afresh
        return None
    places = [run_dir]
    if cfg.resume != "auto":
        resume = Path(cfg.resume)
        places += [resume, resume.parent, resume.parent.parent]
    for place in places:
        if (place / FILE).is_file():
            record = json.loads((place / FILE).read_text())
            if len(record["bounds"]) == cfg.pipeline.k + 1:  # a checkpoint re-cut for another K chooses afresh
                return str(place / FILE), record
    return None


def rank_candidates(times: list[pace.BlockTime], K: int, method: str, recompute: bool,
                    starts: list[int] | None = None) -> list[tuple[list[int], float]]:
    """Every split within ``SPREAD`` blocks of the balanced one, fastest predicted first (ties: smaller bounds);
    modules start only at ``starts`` (default: any block; see ``partition.weighted_starts``)."""
    n = len(times)
    base = partition.split_points([t.total for t in times], K, "auto", starts)
    allowed = set(range(1, n) if starts is None else starts)
    options = set()
    for shift in itertools.product(range(-SPREAD, SPREAD + 1), repeat=K - 1):
        bounds = [0, *(b + s for b, s in zip(base[1:-1], shift, strict=True)), n]
        if all(a < b for a, b in itertools.pairwise(bounds)) and allowed.issuperset(bounds[1:-1]):
            options.add(tuple(bounds))
    scored = [(list(b), pace.split_period(method, times, b, recompute=recompute)) for b in options]
    return sorted(scored, key=lambda c: (c[1], c[0]))


def _batch_shape(cfg: Config, ctx: Context) -> list[int]:
    return [cfg.trainer.batch_size // ctx.R, *data.sample_spec(cfg.data).shape]


def _measured(cfg: Config, ctx: Context) -> list[pace.BlockTime]:
    """Rank 0 times the blocks on its device; every rank gets the same numbers."""
    times: list[list[pace.BlockTime] | None] = [None]
    if ctx.rank == 0:
        blocks = models.build_blocks(cfg.model, cfg.data.num_classes)
        times[0] = partition.measured_block_times(blocks, _batch_shape(cfg, ctx), ctx.device,
                                                  precision=cfg.trainer.precision,
                                                  channels_last=cfg.trainer.channels_last,
                                                  dtype=data.sample_spec(cfg.data).dtype)
    dist.broadcast_object_list(times, src=0, group=ctx.header_group)
    return times[0]


def _trial(cfg: Config, ctx: Context, transport: Transport, build: BuildStage, candidates: list[list[int]],
           rounds: int) -> list[list[float]]:
    """Seconds per batch of every candidate in every round, as the last module of replica 0 saw them."""
    runs: list[list[float]] = [[] for _ in candidates]
    tag = 0
    for _ in range(rounds):
        for i, bounds in enumerate(candidates):
            tag -= 1  # trial messages carry negative epochs: never mistaken for training
            runs[i].append(_trial_period(cfg, ctx, transport, build, bounds, tag))
    return runs


def _trial_period(cfg: Config, ctx: Context, transport: Transport, build: BuildStage, bounds: list[int],
                  tag: int) -> float:
    stage, boundary = build(bounds)
    clock = DeviceClock() if ctx.device.type == "cuda" else HostClock()
    executor = Executor(stage, transport, boundary, clock=clock)
    n = TRIAL_BATCHES
    plan = schedule.plan(cfg.method.name, ctx.module, ctx.K, n, train=True, accum_steps=cfg.method.accum_steps)
    shape = _batch_shape(cfg, ctx)
    batches = _synthetic(cfg, shape, ctx.device, n) if ctx.module == 0 else None
    result = executor.run(plan, [shape[0]] * n, batches, epoch=tag, train=True)
    period: list[float | None] = [None]
    reporter = ctx.K - 1  # the last module of replica 0
    if ctx.rank == reporter:
        starts = [e.start for e in result.events if e.action.kind is Kind.FORWARD]
        lo, hi = n // 4, n - n // 4
        period[0] = (starts[hi] - starts[lo]) / (hi - lo)
    dist.broadcast_object_list(period, src=reporter, group=ctx.header_group)
    return period[0]


def _synthetic(cfg: Config, shape: list[int], device: torch.device, n: int
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same random batch n times (images, or tokens with a label per token): what the trial measures is
    the pipeline, not the data."""
    g = torch.Generator().manual_seed(0)
    spec, classes = data.sample_spec(cfg.data), cfg.data.num_classes
    x = (torch.randn(shape, generator=g) if spec.dtype.is_floating_point
         else torch.randint(0, classes, shape, generator=g, dtype=spec.dtype))
    y = torch.randint(0, classes, (shape[0], *spec.label_shape), generator=g)
    return itertools.repeat((x.to(device), y.to(device)), n)
