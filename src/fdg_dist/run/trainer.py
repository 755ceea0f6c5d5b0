"""The training loop of one rank, top-down: build → (resume) → epochs of train, drain, eval, log, save.

Everything here is per rank; the cross-rank choreography lives in ``schedule`` and ``executor``.

Must not know a checkpoint's files or manifest (``checkpoint`` files the ``state_dict()`` and ``Layout`` it is
handed, and hands back what it found) nor a method's tick rule (``engine.schedule``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fdg_dist import data, models
from fdg_dist.config import Config
from fdg_dist.engine import correctors, schedule
from fdg_dist.engine.autotune import autotune, shapes_of_a_run
from fdg_dist.engine.executor import Boundary, Cut, DeviceClock, EpochResult, Executor, HostClock
from fdg_dist.engine.optim import DelayedUpdate, build_optimizer, build_scheduler
from fdg_dist.engine.stage import Stage
from fdg_dist.engine.transport import TorchWire, Transport
from fdg_dist.observe.memory import Usage
from fdg_dist.observe.metrics import EpochRecord, RunLog, Stop, chain, rank_name
from fdg_dist.observe.trace import TraceWriter
from fdg_dist.run import checkpoint, final_model, split_trial, unsplit
from fdg_dist.run.distributed import Context, allreduce_mean, check_agreement
from fdg_dist.run.preempt import Preemption, Stopped
from fdg_dist.split import counted, partition
from fdg_dist.util import files

log = logging.getLogger("fdg_dist")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators as tensors and plain types (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next],
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss_next))


@dataclass
class BuiltModule:
    module: nn.Module  # blocks bounds[k]:bounds[k+1], keyed like the unsplit model
    aux_head: nn.Module | None  # DGL's local classifier (modules k < K-1 only)
    bounds: list[int]
    shapes: list[torch.Size]  # input and output activation shape of module k (batch 1)


def build_module(cfg: Config, K: int, k: int, bounds: list[int] | None = None, device_type: str = "cpu"
                 ) -> BuiltModule:
    """Module k of the split model, from the same seed on every rank.

    Every rank builds the whole model and keeps its blocks, so the split is deterministic and the
    weights equal those of the unsplit model built with that seed.  ``bounds`` (a split chosen by
    ``split_trial``, identical on every rank) replaces ``pipeline.split``; without it ``split=auto`` is
    ``pipeline.cost``'s: counted work priced for ``device_type`` (``auto``, ``counted``) or counted FLOPs balanced.
    """
    seed_everything(cfg.trainer.seed)
    blocks = models.build_blocks(cfg.model, cfg.data.num_classes)
    spec = data.sample_spec(cfg.data)
    sample = (1, *spec.shape)
    if bounds is None:
        bounds = automatic_bounds(cfg, K, blocks, device_type)
    shapes = partition.boundary_shapes(blocks, sample, spec.dtype)
    module = nn.Sequential(OrderedDict((str(i), blocks[i]) for i in range(bounds[k], bounds[k + 1])))
    aux = None
    if cfg.method.name == "dgl" and k < K - 1:
        torch.manual_seed(cfg.trainer.seed + 1 + k)
        aux = models.aux_head(shapes[bounds[k + 1]], cfg.data.num_classes, cfg.method.aux_channels,
                              per_token=bool(spec.label_shape))
    return BuiltModule(module, aux, bounds, [shapes[bounds[k]], shapes[bounds[k + 1]]])


def automatic_bounds(cfg: Config, K: int, blocks: list[nn.Module], device_type: str) -> list[int]:
    """The split of ``pipeline.split`` (by hand, or ``auto`` by ``pipeline.cost`` other than ``time``)."""
    spec = data.sample_spec(cfg.data)
    split = cfg.pipeline.split if K > 1 else "auto"
    if split == "auto" and cfg.pipeline.cost in ("auto", "counted"):
        batch = (max(cfg.trainer.batch_size // cfg.pipeline.replicas, 1), *spec.shape)
        return counted.bounds(blocks, batch, K, cfg.method.name, device_type=device_type, dtype=spec.dtype,
                              recompute=cfg.method.name == "fr" or cfg.method.stash == "recompute")
    return partition.split_points(partition.block_costs(blocks, (1, *spec.shape), spec.dtype), K, split,
                                  partition.weighted_starts(blocks))


def split_table(cfg: Config, bounds: list[int], seconds: list[float] | None = None) -> str:
    """The split table printed at start (built on the meta device: no weights, no memory)."""
    K = len(bounds) - 1
    model = models.build_model(cfg.model, cfg.data.num_classes, device="meta")
    depths = [stash_depth(cfg.method.name, j, K) for j in range(K)]
    stash = "recompute" if cfg.method.name == "fr" else cfg.method.stash
    spec = data.sample_spec(cfg.data)
    return partition.describe(model.blocks, bounds, (1, *spec.shape), cfg.trainer.batch_size, depths, seconds=seconds,
                              stash=stash, dtype=spec.dtype, names=model.block_names())


def build_stage(cfg: Config, K: int, k: int, device: torch.device, *, bounds: list[int] | None = None,
                grad_sync: Callable[[list[torch.Tensor]], None] | None = None,
                total_batches: int | None = None) -> tuple[Stage, Boundary, BuiltModule]:
    """Module k as a stage on ``device`` (weights, optimizer, LR schedule, method settings) and its boundary.

    The one place a config becomes a stage: the trainer, the emulated-NCCL tests and the benchmarks use it.
    ``total_batches`` (see ``run_batches``) sizes a per-batch LR schedule and ``corrector.anneal_fraction``.
    """
    t, m = cfg.trainer, cfg.method
    built = build_module(cfg, K, k, bounds, device.type)
    fmt = models.memory_format(t.channels_last)
    module = built.module.to(device, memory_format=fmt)
    aux = built.aux_head.to(device, memory_format=fmt) if built.aux_head is not None else None
    params = list(module.parameters()) + (list(aux.parameters()) if aux is not None else [])
    if not params:
        a, b = built.bounds[k], built.bounds[k + 1]
        raise ValueError(f"pipeline.split: module {k} (blocks [{a}, {b}) of the split {built.bounds}) has no weights to "
                         "train; choose split points (pipeline.split) or a smaller pipeline.k so that every module "
                         "holds a layer with weights")
    optimizer = build_optimizer(cfg.optim, params)
    scheduler = build_scheduler(cfg.sched, optimizer, t.epochs, total_batches)
    delay = correctors.weight_delay(m.name, k, K, m.accum_steps)
    corrector = correctors.build(cfg.corrector, delay, optimizer=cfg.optim.name, batches=total_batches or 0,
                                 accum_steps=m.accum_steps, warmup=m.sync_warmup_steps)
    update = DelayedUpdate(cfg.optim, delay, correctors.weight_delay(m.name, 0, K, m.accum_steps))
    stage = Stage(module, k, K, optimizer, scheduler, beta=m.beta, stash="recompute" if m.name == "fr" else m.stash,
                  accum_steps=m.accum_steps, aux_head=aux, sends_grad=m.name != "dgl", precision=t.precision,
                  device=device, grad_sync=grad_sync, nan_policy=t.nan_policy, memory_format=fmt,
                  corrector=corrector, update=update, clip_norm=cfg.optim.clip_norm)
    wire_dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    boundary = Boundary(tuple(built.shapes[0][1:]), tuple(built.shapes[1][1:]), wire_dtype,
                        data.sample_spec(cfg.data).label_shape)
    return stage, boundary, built


def run_batches(cfg: Config, batches_per_epoch: int) -> int:
    """Training batches the whole run draws: every epoch's, capped by ``trainer.max_steps``."""
    total = cfg.trainer.epochs * batches_per_epoch
    return total if cfg.trainer.max_steps is None else min(total, cfg.trainer.max_steps)


def stash_depth(method: str, k: int, K: int) -> int:
    """How many forwards module k holds at most: 2(K-1-k) for FDG, K-1-k for DDG/FR, 0 otherwise."""
    return {"fdg": 2, "adl": 2, "ddg": 1, "fr": 1}.get(method, 0) * (K - 1 - k)


class Trainer:
    def __init__(self, cfg: Config, ctx: Context, run_dir: Path) -> None:
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        m = cfg.method
        self.k, self.K = ctx.module, ctx.K
        check_agreement(json.dumps(cfg.to_dict(), sort_keys=True, default=str), "configuration", ctx.header_group)
        self.train_data, self.test_data = self._load_data()
        sync = (lambda ps: allreduce_mean(ps, ctx.replica_group)) if ctx.R > 1 else None
        wire = TorchWire(ctx.pipeline_ranks, ctx.links, ctx.header_group, ctx.device, ctx.backend)
        transport = Transport(wire, self.k, ctx.device, memory_format=models.memory_format(cfg.trainer.channels_last))
        transport.open(ctx.K)  # every link's first message now, in one order on every rank: none lazily mid-run
        measured = cfg.pipeline.cost == "time" and cfg.pipeline.split == "auto" and self.K > 1
        choice = self._choose_split(transport, sync) if measured else None
        self.stage, boundary, built = build_stage(cfg, self.K, self.k, ctx.device,
                                                  bounds=choice.bounds if choice else None, grad_sync=sync,
                                                  total_batches=run_batches(cfg, len(self._train_sizes())))
        self.bounds = built.bounds
        if ctx.rank == 0:
            if choice is not None:
                log.info("split %s by measured time: %s", self.bounds, choice.how)
            log.info("split of %s into K=%d modules (%s):\n%s", cfg.model.label, self.K,
                     {"weights": "stashed weights", "mixed": "stored activations, live weights"}.get(m.stash, m.stash),
                     split_table(cfg, self.bounds, choice.block_seconds if choice else None))
        if ctx.device.type == "cuda":  # cuDNN's autotuner syncs the device: let it meet every shape now
            autotune(self.stage, boundary.in_shape, data.sample_spec(cfg.data).dtype if self.k == 0 else boundary.dtype,
                     shapes_of_a_run(self._train_sizes(), data.batch_sizes(self.n_test, cfg.trainer.eval_batch_size)))
        clock = DeviceClock() if ctx.device.type == "cuda" else HostClock()
        self.executor = Executor(self.stage, transport, boundary, measure_every=cfg.logging.log_every_steps,
                                 clock=clock,  # staleness probes feed TensorBoard only: none without it
                                 probe_every=cfg.logging.staleness_every_steps if cfg.logging.tensorboard else 0)
        self.is_reporter = self.k == self.K - 1 and ctx.replica == 0
        self.log = RunLog(cfg, run_dir, module=self.k, replica=ctx.replica, reporter=self.is_reporter,
                          device=ctx.device)
        self.global_step = 0
        self.start_epoch = 0
        self.cut: Cut | None = None  # where a resumed epoch was cut, until it continues
        # the worker installs its signal handlers; the vote also brings every rank's memory to the progress lines
        self.preemption = Preemption(ctx.control_group, lag=self.K + 1, device=ctx.device)
        self.trace = TraceWriter(run_dir, ctx.rank, self.k, time.perf_counter()) if cfg.logging.trace else None

    def _choose_split(self, transport: Transport, sync: Callable[[list[torch.Tensor]], None] | None
                      ) -> split_trial.Choice:
        """``pipeline.cost=time``: measured, ranked, tried in this pipeline, kept in the run directory."""
        def trial_stage(bounds: list[int]) -> tuple[Stage, Boundary]:
            return build_stage(self.cfg, self.K, self.k, self.ctx.device, bounds=bounds, grad_sync=sync)[:2]

        return split_trial.choose(self.cfg, self.ctx, self.run_dir, transport, trial_stage)

    # -------------------------------------------------------------------- data
    def _load_data(self) -> tuple[data.Batches | None, data.Batches | None]:
        """Module 0 reads the data; every rank learns the set sizes (for the schedule) by broadcast."""
        cfg, ctx = self.cfg, self.ctx
        sizes = torch.zeros(2, dtype=torch.int64)
        train = test = None
        if self.k == 0:
            train_set, test_set = data.load(cfg.data, cfg.trainer.seed)
            sizes = torch.tensor([len(train_set), len(test_set)])
            shard = (ctx.replica, ctx.R)
            train = data.Batches(train_set, cfg.trainer.batch_size, train=True, augment=cfg.data.augment,
                                 seed=cfg.trainer.seed, device=ctx.device, shard=shard)
            test = data.Batches(test_set, cfg.trainer.eval_batch_size, train=False, augment=False,
                                seed=cfg.trainer.seed, device=ctx.device)
            if ctx.rank == 0:
                log.info("data: train %s; test %s", data.describe(train_set), data.describe(test_set))
                if isinstance(train_set, data.TextSet):
                    files.atomic_write(json.dumps(final_model.tokenizer(cfg, train_set, test_set)).encode(),
                                       self.run_dir / final_model.TOKENIZER)
        dist.broadcast(sizes, src=0, group=ctx.header_group)
        self.n_train, self.n_test = int(sizes[0]), int(sizes[1])
        return train, test

    def _train_sizes(self) -> list[int]:
        per_replica = self.cfg.trainer.batch_size // self.ctx.R
        full = data.batch_sizes(self.n_train, self.cfg.trainer.batch_size)
        if full and full[-1] < self.ctx.R:  # a last batch smaller than R leaves a replica no sample (NaN loss): drop it
            full = full[:-1]
        return [data.shard_size(n, per_replica, self.ctx.replica, self.ctx.R) for n in full]

    # -------------------------------------------------------------------- loop
    def fit(self) -> dict | None:
        cfg = self.cfg
        resumed = self.restore()  # also cuts metrics.jsonl back to the epochs kept
        self.log.first_step = self.stage.steps + 1
        if resumed is not None:
            log.info("resumed from %s (next epoch %d/%d%s)", resumed, self.start_epoch + 1, cfg.trainer.epochs,
                     "" if self.cut is None else f", after its tick {self.cut.tick}")
        best = self.log.best_error()
        if self.is_reporter:
            log.info("run directory %s (train.log, metrics.jsonl, tb/)", self.run_dir.resolve())
        started = time.perf_counter()
        stop = f"trainer.epochs={cfg.trainer.epochs} reached"
        for epoch in range(self.start_epoch, cfg.trainer.epochs):
            sizes = self._train_sizes()
            left = math.inf if cfg.trainer.max_steps is None else cfg.trainer.max_steps - self.global_step
            if left <= 0:
                stop = f"trainer.max_steps={cfg.trainer.max_steps} reached at the end of epoch {epoch}"
                break
            cut = left < len(sizes)
            if cut:
                stop = (f"trainer.max_steps={cfg.trainer.max_steps} reached after {left} of the {len(sizes)} "
                        f"batches of epoch {epoch + 1}")
                sizes = sizes[:left]
            tic = time.perf_counter()
            train, record, first = self.train_epoch(epoch, sizes)
            if train.stopped is not None:
                self._stop(epoch, train.stopped)
            train_time = time.perf_counter() - tic
            self.stage.scheduler.step()
            self.global_step += len(sizes)
            test = self.evaluate(epoch)
            if self.trace is not None:
                self.trace.flush()
            if self.is_reporter:
                best = min(best, test.error)
            self.log.epoch(epoch, lr=self.stage.optimizer.param_groups[0]["lr"], train=train, test=test,
                           seconds=train_time, samples=sum(sizes[first:]) * self.ctx.R, record=record,
                           steps=self.stage.steps, memory=self.memory_of_every_rank())
            self.start_epoch = epoch + 1
            saved = cfg.checkpoint.enabled and (epoch + 1) % cfg.checkpoint.every_epochs == 0
            if saved:
                self.save_checkpoint(epoch)
            if self.preemption.agree():
                self._stop(epoch, None, saved=saved)
            if cut:
                break
        if self.is_reporter and stop.startswith("trainer.max_steps"):
            log.info("%s: the run stopped there", stop)
        self.export_final_model()
        if self.trace is not None:
            self.trace.close()
        return self.log.finish(wall_s=time.perf_counter() - started, best_error=best, steps=self.stage.steps,
                               stop=Stop(self.start_epoch, self.global_step, stop), bounds=self.bounds)

    def train_epoch(self, epoch: int, sizes: list[int]) -> tuple[EpochResult, EpochRecord, int]:
        """One epoch, or what is left of it after the cut a resumed checkpoint holds; a signal may cut it.
        Returns what the module saw, the record of its actions and the first batch it forwarded (0 unless resumed:
        the epoch's rate counts only the samples trained since)."""
        m = self.cfg.method
        plan = schedule.plan(m.name, self.k, self.K, len(sizes), train=True, accum_steps=m.accum_steps,
                             sync=schedule.sync_batches(m.sync_warmup_steps, self.global_step, len(sizes)))
        cut, self.cut = self.cut, None
        first = 0 if cut is None else schedule.first_forward_after(plan, cut.tick)
        batches = self.train_data.epoch(epoch, start_batch=first) if self.k == 0 else None
        record = EpochRecord(sum(a.kind is schedule.Kind.STEP for a in plan.actions), self.ctx.device)
        trace = self.trace.hook(epoch, "train") if self.trace is not None else None
        result = self.executor.run(plan, sizes, batches, epoch=epoch, train=True, resume=cut, stop=self.preemption,
                                   on_action=chain(self.log.progress(epoch, len(sizes), self._memory_so_far),
                                                   checkpoint.kill_hook(self.run_dir, self.k, epoch)),
                                   on_timed=chain(record.add, trace))
        return result, record, first

    def _memory_so_far(self) -> dict[str, Usage] | None:
        """Every rank's memory as the last preemption vote brought it (None before the first)."""
        usages = self.preemption.memory
        if usages is None:
            return None
        return {rank_name(r % self.K, r // self.K): u for r, u in enumerate(usages)}

    def memory_of_every_rank(self) -> dict[str, Usage] | None:
        """Every rank's memory now, gathered once at an epoch's end on the reporting rank (None elsewhere)."""
        reporter = self.K - 1  # the last module of replica 0
        usages: list[Usage] | None = [None] * self.ctx.world_size if self.ctx.rank == reporter else None
        dist.gather_object(Usage.now(self.ctx.device), usages, dst=reporter, group=self.ctx.header_group)
        if usages is None:
            return None
        return {rank_name(r % self.K, r // self.K): u for r, u in enumerate(usages)}

    def _stop(self, epoch: int, cut: Cut | None, *, saved: bool = False) -> NoReturn:
        """After a signal (on any rank): checkpoint where every rank stands — the cut, or the epoch end — and
        end the run; the same command resumes it bit for bit."""
        signum = self.preemption.agreed or signal.SIGTERM
        by = signum.name
        where = f"after tick {cut.tick} of epoch {epoch + 1}" if cut else f"at the end of epoch {epoch + 1}"
        if not self.cfg.checkpoint.enabled:
            raise Stopped(f"stopped by {by} {where}; nothing saved (checkpoint.enabled=false): the same command "
                          "starts over", signum)
        self.cut = cut
        directory = checkpoint.checkpoint_root(self.cfg, self.run_dir) / checkpoint.directory_name(
            epoch, cut.tick if cut else None)
        if not saved:
            self.save_checkpoint(epoch, cut.tick if cut else None)
        raise Stopped(f"stopped by {by} {where}; checkpoint {directory} written; {Stopped.SAME_COMMAND}", signum)

    # ------------------------------------------------------------------- state
    def layout(self) -> checkpoint.Layout:
        """Where this rank stands, as its checkpoint names its file and records it in the manifest."""
        return checkpoint.Layout(self.k, self.ctx.replica, self.K, self.ctx.R, self.bounds, self.cfg.method.name,
                                 self.start_epoch, self.global_step)

    def save_checkpoint(self, epoch: int, tick: int | None = None) -> Path:
        """Hand ``state_dict()`` to ``checkpoint.save``, which files it for every rank (a collective)."""
        return checkpoint.save(self.cfg, self.run_dir, self.state_dict(), self.layout(), self.ctx.header_group,
                               epoch, tick)

    def restore(self) -> Path | None:
        """Load what ``checkpoint.restore`` found for ``cfg.resume`` (this rank's own state, or its part of an
        unsplit one) and cut ``metrics.jsonl`` back to the epoch the run goes on with; the directory, or None."""
        found = checkpoint.restore(self.cfg, self.run_dir, self.layout(), self.ctx.header_group)
        if found is not None and found.recut:
            try:
                self.load_unsplit(found.state)
            except unsplit.UnsplitError as e:
                raise checkpoint.CheckpointError(f"checkpoint {found.directory} cannot be re-cut for module "
                                                 f"{self.k}: {e}") from e
            if self.ctx.rank == 0:
                checkpoint.log_recut(found, self.layout(), self.cfg.method.aux_channels)
        elif found is not None:
            self.load_state_dict(found.state)
        if self.is_reporter:  # a run resumed after its last epoch still reports that epoch's numbers
            kept = checkpoint.truncate_metrics(self.log.metrics_path, self.start_epoch)
            self.log.last = kept[-1] if kept else None
        return None if found is None else found.directory

    def state_dict(self) -> dict[str, Any]:
        """This rank's state, enough to go on bit for bit: its stage (stash included at a cut), where the run
        stands (next epoch, batches done, the cut with its messages in flight) and its random generators."""
        return {"module": self.k, "replica": self.ctx.replica, "bounds": self.bounds,
                "next_epoch": self.start_epoch, "global_step": self.global_step,
                "cut": None if self.cut is None else dataclasses.asdict(self.cut),
                "stage": self.stage.state_dict(), "rng": rng_state(self.ctx.device)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage.load_state_dict(state["stage"])
        self.start_epoch, self.global_step = state["next_epoch"], state["global_step"]
        self.cut = None if state["cut"] is None else Cut(**state["cut"])
        set_rng_state(state["rng"], self.ctx.device)

    def load_unsplit(self, state: dict[str, Any]) -> None:
        """This rank's part of an unsplit state (a checkpoint of another split, K, replicas or method, drained).

        Random generators are streams of the old ranks, which the new ones do not correspond to: each rank is
        reseeded from the seed, the epoch, its module and its replica instead (reproducible, never a replay).
        """
        boundary = self.bounds[self.k + 1] if self.stage.aux_head is not None else None
        self.stage.load_state_dict(unsplit.cut(state, self.stage, boundary=boundary,
                                               aux_channels=self.cfg.method.aux_channels))
        self.start_epoch, self.global_step, self.cut = state["next_epoch"], state["global_step"], None
        seed_everything(data.stable_seed(self.cfg.trainer.seed, "re-cut", self.start_epoch, self.k,
                                         self.ctx.replica) % 2**32)

    def evaluate(self, epoch: int) -> EpochResult:
        if self.ctx.R > 1:  # replicas normalise alike: replica 0's BatchNorm statistics everywhere
            for buf in self.stage.module.buffers():
                dist.broadcast(buf, src=self.k, group=self.ctx.replica_group)
        sizes = data.batch_sizes(self.n_test, self.cfg.trainer.eval_batch_size)
        plan = schedule.plan(self.cfg.method.name, self.k, self.K, len(sizes), train=False)
        batches = self.test_data.epoch(epoch) if self.k == 0 else None
        return self.executor.run(plan, sizes, batches, epoch=epoch, train=False,
                                 on_timed=self.trace.hook(epoch, "eval") if self.trace is not None else None)

    # ------------------------------------------------------------------ export
    def export_final_model(self) -> None:
        """``final_model.pt``: the unsplit model's state_dict with the model's own keys (torchvision's for a
        torchvision model; auxiliary DGL heads excluded): it loads into ``models.build(cfg.model, classes)``;
        beside it ``final_model.json``: the normalisation and class names that inference needs (rank 0 is
        module 0, which holds the data)."""
        state = {n: t.detach().cpu() for n, t in self.stage.module.state_dict().items()}
        parts: list[dict] | None = [None] * self.ctx.world_size if self.ctx.rank == 0 else None
        dist.gather_object(state, parts, dst=0, group=self.ctx.header_group)
        if parts is not None:
            merged: dict[str, torch.Tensor] = {}
            for part in parts[: self.K]:  # replica 0 holds one copy of every module
                merged.update(part)
            model = models.build_model(self.cfg.model, self.cfg.data.num_classes, device="meta")
            files.atomic_save(model.model_state(merged), self.run_dir / final_model.WEIGHTS)
            meta = final_model.metadata(self.cfg, self.train_data.data)
            files.atomic_write((json.dumps(meta, indent=1) + "\n").encode(), self.run_dir / final_model.METADATA)
            files.atomic_write(json.dumps({"bounds": self.bounds}).encode(), self.run_dir / "split.json")
