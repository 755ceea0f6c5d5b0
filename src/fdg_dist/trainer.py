"""The training loop of one rank, top-down: build → (resume) → epochs of train, drain, eval, log, save.

Everything here is per rank; the cross-rank choreography lives in ``schedule`` and ``executor``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fdg_dist import checkpoint, data, models, partition, schedule, split_choice
from fdg_dist.config import Config
from fdg_dist.distributed import Context, allreduce_mean, check_agreement
from fdg_dist.executor import Boundary, DeviceClock, EpochResult, Executor, HostClock
from fdg_dist.metrics import RunLog, chain
from fdg_dist.optim import build_optimizer, build_scheduler
from fdg_dist.stage import Stage
from fdg_dist.trace import TraceWriter
from fdg_dist.transport import TorchWire, Transport

log = logging.getLogger("fdg_dist")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class BuiltModule:
    module: nn.Module  # blocks bounds[k]:bounds[k+1], keyed like the unsplit model
    aux_head: nn.Module | None  # DGL's local classifier (modules k < K-1 only)
    bounds: list[int]
    shapes: list[torch.Size]  # input and output activation shape of module k (batch 1)


def build_module(cfg: Config, K: int, k: int, bounds: list[int] | None = None) -> BuiltModule:
    """Module k of the split model, from the same seed on every rank.

    Every rank builds the whole model and keeps its blocks, so the split is deterministic and the
    weights equal those of the unsplit model built with that seed.  ``bounds`` (a split chosen by
    ``split_choice``, identical on every rank) replaces ``pipeline.split`` balanced by counted FLOPs.
    """
    seed_everything(cfg.trainer.seed)
    blocks = models.build_blocks(cfg.model.name, cfg.data.num_classes)
    sample = (1, 3, cfg.data.image_size, cfg.data.image_size)
    if bounds is None:
        split = cfg.pipeline.split if K > 1 else "auto"
        bounds = partition.split_points(partition.block_costs(blocks, sample), K, split)
    shapes = partition.boundary_shapes(blocks, sample)
    module = nn.Sequential(OrderedDict((str(i), blocks[i]) for i in range(bounds[k], bounds[k + 1])))
    aux = None
    if cfg.method.name == "dgl" and k < K - 1:
        torch.manual_seed(cfg.trainer.seed + 1 + k)
        aux = models.aux_head(shapes[bounds[k + 1]], cfg.data.num_classes, cfg.method.aux_channels)
    return BuiltModule(module, aux, bounds, [shapes[bounds[k]], shapes[bounds[k + 1]]])


def split_table(cfg: Config, bounds: list[int], seconds: list[float] | None = None) -> str:
    """The split table printed at start (built on the meta device: no weights, no memory)."""
    K = len(bounds) - 1
    blocks = models.build_blocks(cfg.model.name, cfg.data.num_classes, device="meta")
    depths = [stash_depth(cfg.method.name, j, K) for j in range(K)]
    stash = "recompute" if cfg.method.name == "fr" else cfg.method.stash
    return partition.describe(blocks, bounds, (1, 3, cfg.data.image_size, cfg.data.image_size), cfg.trainer.batch_size,
                              depths, seconds=seconds, stash=stash)


def build_stage(cfg: Config, K: int, k: int, device: torch.device, *, bounds: list[int] | None = None,
                grad_sync: Callable[[list[torch.Tensor]], None] | None = None) -> tuple[Stage, Boundary, BuiltModule]:
    """Module k as a stage on ``device`` (weights, optimizer, LR schedule, method settings) and its boundary.

    The one place a config becomes a stage: the trainer, the emulated-NCCL tests and the benchmarks use it.
    """
    t, m = cfg.trainer, cfg.method
    built = build_module(cfg, K, k, bounds)
    fmt = models.memory_format(t.channels_last)
    module = built.module.to(device, memory_format=fmt)
    aux = built.aux_head.to(device, memory_format=fmt) if built.aux_head is not None else None
    params = list(module.parameters()) + (list(aux.parameters()) if aux is not None else [])
    optimizer = build_optimizer(cfg.optim, params)
    scheduler = build_scheduler(cfg.sched, optimizer, t.epochs)
    stage = Stage(module, k, K, optimizer, scheduler, beta=m.beta, stash="recompute" if m.name == "fr" else m.stash,
                  accum_steps=m.accum_steps, aux_head=aux, sends_grad=m.name != "dgl", precision=t.precision,
                  device=device, grad_sync=grad_sync, nan_policy=t.nan_policy, memory_format=fmt)
    wire_dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    boundary = Boundary(tuple(built.shapes[0][1:]), tuple(built.shapes[1][1:]), wire_dtype)
    return stage, boundary, built


def stash_depth(method: str, k: int, K: int) -> int:
    """How many forwards module k holds at most: 2(K-1-k) for FDG, K-1-k for DDG/FR, 0 otherwise."""
    return {"fdg": 2, "adl": 2, "ddg": 1, "fr": 1}.get(method, 0) * (K - 1 - k)


class Trainer:
    def __init__(self, cfg: Config, ctx: Context, run_dir: Path) -> None:
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        m = cfg.method
        self.k, self.K = ctx.module, ctx.K
        check_agreement(json.dumps(cfg.to_dict(), sort_keys=True, default=str), "configuration", ctx.header_group)
        sync = (lambda ps: allreduce_mean(ps, ctx.replica_group)) if ctx.R > 1 else None
        wire = TorchWire(ctx.pipeline_ranks, ctx.links, ctx.header_group, ctx.device, ctx.backend)
        transport = Transport(wire, self.k, ctx.device, memory_format=models.memory_format(cfg.trainer.channels_last))
        measured = cfg.pipeline.cost == "time" and cfg.pipeline.split == "auto" and self.K > 1
        choice = self._choose_split(transport, sync) if measured else None
        self.stage, boundary, built = build_stage(cfg, self.K, self.k, ctx.device,
                                                  bounds=choice.bounds if choice else None, grad_sync=sync)
        self.bounds = built.bounds
        if ctx.rank == 0:
            if choice is not None:
                log.info("split %s by measured time: %s", self.bounds, choice.how)
            log.info("split of %s into K=%d modules (%s):\n%s", cfg.model.name, self.K,
                     "stashed weights" if m.stash == "weights" else "recompute",
                     split_table(cfg, self.bounds, choice.block_seconds if choice else None))
        clock = DeviceClock() if ctx.device.type == "cuda" else HostClock()
        self.executor = Executor(self.stage, transport, boundary, measure_every=cfg.logging.log_every_steps,
                                 clock=clock)
        self.train_data, self.test_data = self._load_data()
        self.is_reporter = self.k == self.K - 1 and ctx.replica == 0
        self.log = RunLog(cfg, run_dir, module=self.k, replica=ctx.replica, reporter=self.is_reporter,
                          device=ctx.device)
        self.global_step = 0
        self.start_epoch = 0
        self.trace = TraceWriter(run_dir, ctx.rank, self.k, time.perf_counter()) if cfg.logging.trace else None

    def _choose_split(self, transport: Transport, sync: Callable[[list[torch.Tensor]], None] | None
                      ) -> split_choice.Choice:
        """``pipeline.cost=time``: measured, ranked, tried in this pipeline, kept in the run directory."""
        def trial_stage(bounds: list[int]) -> tuple[Stage, Boundary]:
            return build_stage(self.cfg, self.K, self.k, self.ctx.device, bounds=bounds, grad_sync=sync)[:2]

        return split_choice.choose(self.cfg, self.ctx, self.run_dir, transport, trial_stage)

    # -------------------------------------------------------------------- data
    def _load_data(self) -> tuple[data.Batches | None, data.Batches | None]:
        """Module 0 reads images; every rank learns the set sizes (for the schedule) by broadcast."""
        cfg, ctx = self.cfg, self.ctx
        sizes = torch.zeros(2, dtype=torch.int64)
        train = test = None
        if self.k == 0:
            train_set, test_set = data.load(cfg.data, cfg.trainer.seed)
            sizes = torch.tensor([len(train_set.labels), len(test_set.labels)])
            shard = (ctx.replica, ctx.R)
            train = data.Batches(train_set, cfg.trainer.batch_size, train=True, augment=cfg.data.augment,
                                 seed=cfg.trainer.seed, device=ctx.device, shard=shard)
            test = data.Batches(test_set, cfg.trainer.eval_batch_size, train=False, augment=False,
                                seed=cfg.trainer.seed, device=ctx.device)
            if ctx.rank == 0:
                log.info("data: train %s; test %s", data.describe(train_set), data.describe(test_set))
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
        resumed = checkpoint.restore(self)  # also cuts metrics.jsonl back to the epochs kept
        self.log.first_step = self.stage.steps + 1
        if resumed is not None:
            log.info("resumed from %s (next epoch %d)", resumed, self.start_epoch)
        best = self.log.best_error()
        started = time.perf_counter()
        for epoch in range(self.start_epoch, cfg.trainer.epochs):
            sizes = self._train_sizes()
            if cfg.trainer.max_steps is not None:
                sizes = sizes[:max(cfg.trainer.max_steps - self.global_step, 0)]
            if not sizes:
                break
            tic = time.perf_counter()
            train = self.train_epoch(epoch, sizes)
            train_time = time.perf_counter() - tic
            self.stage.scheduler.step()
            self.global_step += len(sizes)
            test = self.evaluate(epoch)
            if self.trace is not None:
                self.trace.add(train.events, epoch=epoch, phase="train")
                self.trace.add(test.events, epoch=epoch, phase="eval")
            if self.is_reporter:
                best = min(best, test.error)
            self.log.epoch(epoch, lr=self.stage.optimizer.param_groups[0]["lr"], train=train, test=test,
                           seconds=train_time, samples=sum(sizes) * self.ctx.R, events=train.events,
                           steps=self.stage.steps)
            self.start_epoch = epoch + 1
            if cfg.checkpoint.enabled and (epoch + 1) % cfg.checkpoint.every_epochs == 0:
                checkpoint.save(self, epoch)
        self.export_final_model()
        return self.log.finish(wall_s=time.perf_counter() - started, best_error=best, steps=self.stage.steps)

    def train_epoch(self, epoch: int, sizes: list[int]) -> EpochResult:
        m = self.cfg.method
        plan = schedule.plan(m.name, self.k, self.K, len(sizes), train=True, accum_steps=m.accum_steps)
        batches = self.train_data.epoch(epoch) if self.k == 0 else None
        return self.executor.run(plan, sizes, batches, epoch=epoch, train=True,
                                 on_action=chain(self.log.progress(epoch, len(sizes)),
                                                 checkpoint.kill_hook(self.run_dir, self.k, epoch)))

    def evaluate(self, epoch: int) -> EpochResult:
        if self.ctx.R > 1:  # replicas normalise alike: replica 0's BatchNorm statistics everywhere
            for buf in self.stage.module.buffers():
                dist.broadcast(buf, src=self.k, group=self.ctx.replica_group)
        sizes = data.batch_sizes(self.n_test, self.cfg.trainer.eval_batch_size)
        plan = schedule.plan(self.cfg.method.name, self.k, self.K, len(sizes), train=False)
        batches = self.test_data.epoch(epoch) if self.k == 0 else None
        return self.executor.run(plan, sizes, batches, epoch=epoch, train=False)

    # ------------------------------------------------------------------ export
    def export_final_model(self) -> None:
        """``final_model.pt``: the unsplit model's state_dict (auxiliary DGL heads excluded)."""
        state = {n: t.detach().cpu() for n, t in self.stage.module.state_dict().items()}
        parts: list[dict] | None = [None] * self.ctx.world_size if self.ctx.rank == 0 else None
        dist.gather_object(state, parts, dst=0, group=self.ctx.header_group)
        if parts is not None:
            merged: dict[str, torch.Tensor] = {}
            for part in parts[: self.K]:  # replica 0 holds one copy of every module
                merged.update(part)
            checkpoint.atomic_save(merged, self.run_dir / "final_model.pt")
            (self.run_dir / "split.json").write_text(json.dumps({"bounds": self.bounds}))
