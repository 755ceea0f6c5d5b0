"""``pipeline.cost=time``: the split a run measures, predicts, tries in its own pipeline, and keeps.

A split that only balances per-block times measured once flips between neighbours from run to run
(a few % of timing noise moves a boundary by one block), and a pipeline is not the sum of its blocks:
messages take time, modules slow each other down, and in FDG module k idles whenever the modules after
it and two message times take longer than its own tick.  So every fresh run:

1. rank 0 times every block's forward, backward and optimizer step at the training batch on its device
   (``partition.measured_block_times``);
2. every rank ranks the same candidates — the balanced split and its neighbours, each boundary moved by
   up to ``choice.SPREAD`` blocks — by the steady-state time per batch ``pace.split_period`` predicts for
   them (every message costed as two copies of its tensor);
3. the best ``choice.TRIALS`` (those predicted within ``choice.PLAUSIBLE`` of the best: a noisy trial must
   not pick a poor split) run ``TRIAL_BATCHES`` synthetic batches each in the real pipeline (the run's own
   stages, messages and devices), in interleaved rounds; every batch after the first quarter (warm-up) is one
   sample of the seconds per batch (the last module's pace).  A candidate's time is the median of its
   samples (a spell of interference on a shared machine moves a mean, not a median), known to a standard
   error estimated from their spread.  After ``ROUNDS`` rounds of all, further rounds (up to
   ``MAX_ROUNDS``, within ``TRIAL_BUDGET_S``) go to the candidates still indistinguishable from the
   fastest, as long as the error is what keeps them so: more batches only where they can decide.  The
   fastest wins; among those the trial cannot tell from it (within ``choice.Z`` standard errors, or ``TIE``)
   the best predicted, because the prediction ranks near-equal splits the same way in every fresh run
   (ResNet-56 on a 2-core CPU: ten of ten) while a fresh pipeline's pace varies by several %;
4. rank 0 keeps the measurements, the trial and the choice in ``split_choice.json``: a restart in the run
   directory reuses the choice (its checkpoints hold that split's modules), the run log says what won.  In a
   Hydra sweep (``SWEEP_DIR``, set by ``fdg_dist.sweep``) the first job to choose also files it in the sweep
   directory under what decides it (``sweep_key``: model, K, replicas, batch shape, method, precision, memory
   format), and every later job with the same key takes it from there: a β sweep measures once and every job
   trains the same split.

The rule that ranks and decides is ``split.choice`` (pure); this module measures, runs the trial in the
pipeline's process groups and keeps the record.  Must not change the training that follows: trial batches are
synthetic and carry negative epochs, and the stages it builds are dropped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fdg_dist import data, models
from fdg_dist.config import Config
from fdg_dist.engine import schedule
from fdg_dist.engine.executor import Boundary, DeviceClock, Executor, HostClock
from fdg_dist.engine.schedule import Kind
from fdg_dist.engine.stage import Stage
from fdg_dist.engine.transport import Transport
from fdg_dist.run.distributed import Context
from fdg_dist.split import choice, pace, partition
from fdg_dist.util import files
from fdg_dist.util.files import damaged

log = logging.getLogger("fdg_dist")

FILE = "split_choice.json"
SWEEP_DIR = "FDG_SWEEP_DIR"  # environment: the sweep directory of a Hydra -m job, where jobs share their choices
SHARED = "split_choices"  # the folder of a sweep directory that holds them, one file per sweep_key
TRIAL_BATCHES = 16  # per candidate and round; the first quarter is warm-up, every later batch one sample
ROUNDS = 2  # every tried candidate runs this often (interleaved: a slow spell of the machine hits all alike) ...
MAX_ROUNDS = 6  # ... and the ones still indistinguishable from the fastest up to this often
TRIAL_BUDGET_S = 120.0  # at most this long (predicted) in trials: fewer rounds or candidates, or none, beyond it

BuildStage = Callable[[list[int]], tuple[Stage, Boundary]]


@dataclass
class Choice:
    bounds: list[int]
    block_seconds: list[float]  # measured forward + backward + step per block (the split table's column)
    how: str  # one line for the run log


def choose(cfg: Config, ctx: Context, run_dir: Path, transport: Transport, build: BuildStage) -> Choice:
    """The split of this run (a collective: every rank calls it and gets the same answer)."""
    kept = _on_rank0(ctx, lambda: _kept(cfg, run_dir))  # (where, record) of a choice made earlier
    if kept is not None:
        where, record = kept
        return Choice(record["bounds"], [pace.BlockTime(*t).total for t in record["block_times"]],
                      f"kept from {where} (chosen when that run started)")
    shared = _shared_path(cfg, ctx)
    taken = _on_rank0(ctx, lambda: _read(shared) if shared is not None and shared.is_file() else None)
    if taken is not None:  # the choice an earlier job of this sweep filed
        if ctx.rank == 0:
            files.atomic_write(json.dumps(taken).encode(), run_dir / FILE)
        return Choice(taken["bounds"], [pace.BlockTime(*t).total for t in taken["block_times"]],
                      f"taken from {shared} (measured by an earlier job of this sweep); kept in {FILE}")
    times = _measured(cfg, ctx)
    starts = partition.weighted_starts(models.build_blocks(cfg.model, cfg.data.num_classes, device="meta"))
    ranked = choice.rank_candidates(times, ctx.K, cfg.method.name,
                                    cfg.method.name == "fr" or cfg.method.stash == "recompute", starts)
    runs = int(TRIAL_BUDGET_S // (TRIAL_BATCHES * ranked[0][1]))  # trial runs that fit the budget
    tried = choice.worth_trying(ranked, runs)
    trial = _trial(cfg, ctx, transport, build, [b for b, _ in tried], runs)
    bounds = tried[choice.decide(trial)][0] if tried else ranked[0][0]
    estimates = [choice.median_se(t) for t in trial]
    if ctx.rank == 0:
        record = {"shape": _batch_shape(cfg, ctx), "block_times": [[t.forward, t.backward, t.step, t.copy_out] for t in times],
                  "tried": [{"bounds": b, "predicted_s": p, "median_s": m, "se_s": se, "trial_s": t}
                            for (b, p), t, (m, se) in zip(tried, trial, estimates, strict=True)],
                  "bounds": bounds}
        files.atomic_write(json.dumps(record).encode(), run_dir / FILE)
        if shared is not None:
            bounds = _publish(record, shared)
    if shared is not None:  # a job beside this one may have filed its choice first: every job trains that one
        agreed = [bounds]
        dist.broadcast_object_list(agreed, src=0, group=ctx.header_group)
        bounds = agreed[0]
    if runs < 2:
        how = f"the best predicted split (a trial in the pipeline would take more than {TRIAL_BUDGET_S:.0f} s)"
    elif not tried:
        how = f"the best predicted split (no other predicted within {100 * choice.PLAUSIBLE:.0f} % of it)"
    else:
        how = (f"the fastest in this pipeline of the {len(tried)} best predicted splits (median per batch: " + ", ".join(
            f"{b[1:-1]} {1e3 * m:.3g} ± {1e3 * se:.2g} ms over {len(t)}"
            for (b, _), t, (m, se) in zip(tried, trial, estimates, strict=True)) + ")")
    return Choice(bounds, [t.total for t in times], f"{how}; kept in {FILE}")


def _on_rank0(ctx: Context, read: Callable[[], Any]) -> Any:
    """What ``read`` returns on rank 0, on every rank; a ValueError it raises (a damaged file) is raised on every
    rank, so none waits for rank 0."""
    found: list = [None, None]
    if ctx.rank == 0:
        try:
            found[0] = read()
        except ValueError as e:
            found[1] = str(e)
    dist.broadcast_object_list(found, src=0, group=ctx.header_group)
    if found[1] is not None:
        raise ValueError(found[1])
    return found[0]


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
            record = _read(place / FILE)
            if len(record["bounds"]) == cfg.pipeline.k + 1:  # a checkpoint re-cut for another K chooses afresh
                return str(place / FILE), record
    return None


def sweep_key(cfg: Config, ctx: Context) -> dict:
    """What a measured choice depends on: jobs of a sweep that agree on all of it train the same split."""
    m, t = cfg.method, cfg.trainer
    return {"model": cfg.model.to_dict(), "classes": cfg.data.num_classes, "K": ctx.K, "replicas": ctx.R,
            "shape": _batch_shape(cfg, ctx), "dtype": str(data.sample_spec(cfg.data).dtype), "method": m.name,
            "stash": m.stash, "accum_steps": m.accum_steps, "precision": t.precision,
            "channels_last": t.channels_last, "device": ctx.device.type}


def _shared_path(cfg: Config, ctx: Context) -> Path | None:
    """Where this sweep keeps the choice for this job's ``sweep_key`` (None outside a sweep)."""
    sweep_dir = os.environ.get(SWEEP_DIR)
    if not sweep_dir:
        return None
    digest = hashlib.sha256(json.dumps(sweep_key(cfg, ctx), sort_keys=True, default=str).encode()).hexdigest()
    return Path(sweep_dir) / SHARED / f"{cfg.model.label.replace('/', '_').replace(':', '_')}_k{ctx.K}_{digest[:12]}.json"


def _publish(record: dict, shared: Path) -> list[int]:
    """File the choice for the sweep's later jobs and return the bounds every job trains: this one's, or those a
    job running beside it filed first (the first filed stays; ``os.link`` fails on an existing name)."""
    shared.parent.mkdir(parents=True, exist_ok=True)
    draft = shared.with_name(f".{shared.name}.{os.getpid()}")
    files.atomic_write(json.dumps(record).encode(), draft)
    try:
        os.link(draft, shared)
    except FileExistsError:
        return _read(shared)["bounds"]
    finally:
        draft.unlink()
    return record["bounds"]


def _read(path: Path) -> dict:
    """A kept choice, or a ValueError naming the file (cut short, edited, or not ours)."""
    try:
        record = json.loads(path.read_text())
        bounds, times = record["bounds"], record["block_times"]
        if not (all(isinstance(b, int) for b in bounds) and all(isinstance(t, list) and 3 <= len(t) <= 4 for t in times)):
            raise TypeError("bounds must be block indices and block_times rows of 3 or 4 numbers")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(damaged(path, e, "delete it, and the run measures and chooses its split again")) from None
    return record


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
           runs: int) -> list[list[float]]:
    """Seconds per batch of every candidate, pooled over its rounds, as the last module of replica 0 saw them:
    ``ROUNDS`` interleaved rounds of all (as far as ``runs`` allows), then rounds of the ones still contending.
    Every rank sees the same samples (broadcast), so every rank runs the same rounds."""
    samples: list[list[float]] = [[] for _ in candidates]
    running = list(range(len(candidates)))
    tag = 0
    for done in range(MAX_ROUNDS):
        if len(running) < 2 or len(running) > runs:
            break
        for i in running:
            tag -= 1  # trial messages carry negative epochs: never mistaken for training
            samples[i] += _trial_periods(cfg, ctx, transport, build, candidates[i], tag)
        runs -= len(running)
        if done + 1 >= ROUNDS:
            running = [] if choice.settled(samples) else choice.contenders(samples)
    return samples


def _trial_periods(cfg: Config, ctx: Context, transport: Transport, build: BuildStage, bounds: list[int],
                   tag: int) -> list[float]:
    """The time between consecutive forwards of the last module after the first quarter of the batches."""
    stage, boundary = build(bounds)
    clock = DeviceClock() if ctx.device.type == "cuda" else HostClock()
    executor = Executor(stage, transport, boundary, clock=clock, record=True)
    n = TRIAL_BATCHES
    plan = schedule.plan(cfg.method.name, ctx.module, ctx.K, n, train=True, accum_steps=cfg.method.accum_steps)
    shape = _batch_shape(cfg, ctx)
    batches = _synthetic(cfg, shape, ctx.device, n) if ctx.module == 0 else None
    result = executor.run(plan, [shape[0]] * n, batches, epoch=tag, train=True)
    periods: list[list[float] | None] = [None]
    reporter = ctx.K - 1  # the last module of replica 0
    if ctx.rank == reporter:
        starts = [e.start for e in result.events if e.action.kind is Kind.FORWARD][n // 4:]
        periods[0] = [b - a for a, b in itertools.pairwise(starts)]
    dist.broadcast_object_list(periods, src=reporter, group=ctx.header_group)
    return periods[0]


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
