"""A whole pipeline in one process: every module a thread on the emulated-NCCL ``Fabric``.

The same stages, executor and transport as a real run (``trainer.build_stage``, ``Executor``,
``Transport``); only the wire is the fabric instead of torch.distributed.  Each epoch is trained, then
evaluated, like ``Trainer.fit`` without files or process groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from fdg_dist import data
from fdg_dist.config import Config
from fdg_dist.engine import schedule
from fdg_dist.engine.executor import Clock, EpochResult, Event, Executor
from fdg_dist.engine.fabric import Fabric
from fdg_dist.engine.stage import Stage
from fdg_dist.engine.transport import Transport
from fdg_dist.observe.metrics import EpochRecord
from fdg_dist.run.trainer import build_stage

PlanFn = Callable[..., schedule.Plan]
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RankRun:
    stage: Stage
    executor: Executor
    train: list[EpochResult] = field(default_factory=list)
    evals: list[EpochResult] = field(default_factory=list)


def train_sizes(cfg: Config, n_train: int) -> list[list[int]]:
    """Each epoch's batch sizes, cut by trainer.max_steps as the trainer cuts them."""
    out, steps = [], 0
    for _ in range(cfg.trainer.epochs):
        sizes = data.batch_sizes(n_train, cfg.trainer.batch_size)
        if cfg.trainer.max_steps is not None:
            sizes = sizes[:max(cfg.trainer.max_steps - steps, 0)]
        if not sizes:
            break
        out.append(sizes)
        steps += len(sizes)
    return out


@dataclass
class StopAt:
    """A StopCheck that cuts ``epoch`` after ``tick`` on every rank (what a signal does through ``preempt``)."""

    epoch: int
    tick: int
    asked: list[int] = field(default_factory=list)

    def at(self, tick: int) -> bool:
        self.asked.append(tick)
        return tick == self.tick

    def close(self) -> None:
        return None


def run_emulated(cfg: Config, *, device: str = "cpu", plan: PlanFn = schedule.plan, evaluate: bool = True,
                 batches: Callable[[int, bool], Batches] | None = None,
                 setup: Callable[[int, RankRun], None] | None = None,
                 inside: Callable[[int], object] | None = None,
                 stop: StopAt | None = None,
                 resume: tuple[int, list[dict], list] | None = None,
                 fabric: Fabric | None = None) -> list[RankRun]:
    """Train (and evaluate) ``cfg``'s K-module pipeline on one fabric; returns every rank's stage and results.

    ``plan`` replaces ``schedule.plan`` (to inject a faulty plan); ``batches(epoch, train)`` replaces
    module 0's data; ``setup(k, run)`` may patch a rank before it starts; ``inside(k)`` is a context
    manager entered on rank k's thread around its whole run (dispatch modes are per thread).  ``stop``
    cuts an epoch (the run ends there, the cut in the last train result); ``resume=(epoch, stage
    states, cuts)`` continues such a run.  ``fabric`` (K CPU ranks) replaces a fresh NCCL-rules fabric.
    """
    torch.set_num_threads(1)
    K, dev = cfg.pipeline.k, torch.device(device)
    train_set, test_set = data.load(cfg.data, cfg.trainer.seed)
    epochs = train_sizes(cfg, len(train_set))
    runs = []
    for k in range(K):  # one after the other: building seeds the global RNG
        stage, boundary, _ = build_stage(cfg, K, k, dev, total_batches=sum(map(len, epochs)))
        runs.append(RankRun(stage, Executor(stage, None, boundary, record=True)))  # type: ignore[arg-type]
    loaders = {True: data.Batches(train_set, cfg.trainer.batch_size, train=True, augment=cfg.data.augment,
                                  seed=cfg.trainer.seed, device=dev),
               False: data.Batches(test_set, cfg.trainer.eval_batch_size, train=False, augment=False,
                                   seed=cfg.trainer.seed, device=dev)}
    source = batches or (lambda epoch, train: loaders[train].epoch(epoch))
    test_sizes = data.batch_sizes(len(test_set), cfg.trainer.eval_batch_size)
    m = cfg.method

    def body(k: int) -> Callable:
        def go(endpoint) -> RankRun:
            run = runs[k]
            run.executor.transport = Transport(endpoint, k, dev, memory_format=run.stage.memory_format)
            run.executor.transport.open(K)  # as the trainer does: every link's rendezvous at start
            if setup is not None:
                setup(k, run)
            cut = None
            if resume is not None:
                run.stage.load_state_dict(resume[1][k])
                cut = resume[2][k]
            with inside(k) if inside is not None else nullcontext():
                for epoch, sizes in enumerate(epochs):
                    if resume is not None and epoch < resume[0]:
                        continue
                    done = sum(map(len, epochs[:epoch]))
                    p = plan(m.name, k, K, len(sizes), train=True, accum_steps=m.accum_steps,
                             sync=schedule.sync_batches(m.sync_warmup_steps, done, len(sizes)))
                    data_iter = None
                    if k == 0:
                        first = 0 if cut is None else schedule.first_forward_after(p, cut.tick)
                        data_iter = loaders[True].epoch(epoch, start_batch=first) if batches is None else \
                            source(epoch, True)
                    run.train.append(run.executor.run(p, sizes, data_iter, epoch=epoch, train=True, resume=cut,
                                                      stop=stop if stop is not None and stop.epoch == epoch else None))
                    cut = None
                    if run.train[-1].stopped is not None:
                        return run
                    run.stage.scheduler.step()
                    if evaluate:
                        p = plan(m.name, k, K, len(test_sizes), train=False)
                        run.evals.append(run.executor.run(p, test_sizes, source(epoch, False) if k == 0 else None,
                                                          epoch=epoch, train=False))
            return run
        return go

    return (fabric or Fabric([dev] * K)).run([body(k) for k in range(K)])


def fake_timeline(costs: dict[str, float], wait_s: float, clock: Callable[[list[float]], Clock],
                  nows: dict[int, list[float]], *, post_s: float = 0.0) -> Callable[[int, RankRun], None]:
    """A ``setup`` putting every rank on a fake timeline of its own, ``nows[k][0]`` (seconds): it advances
    ``costs[kind]`` in each stage action, ``wait_s`` in each wait for a message and ``post_s`` in each
    posting of a time's messages, and nowhere else; ``clock(now)`` is the rank's clock reading it."""
    def setup(k: int, run: RankRun) -> None:
        now = nows.setdefault(k, [0.0])
        run.executor.clock = clock(now)

        def advancing(original: Callable, seconds: float) -> Callable:
            def timed(*a, **kw):
                now[0] += seconds
                return original(*a, **kw)
            return timed

        for kind, seconds in costs.items():
            setattr(run.stage, kind, advancing(getattr(run.stage, kind), seconds))
        transport = run.executor.transport
        transport.take = advancing(transport.take, wait_s)
        transport.post = advancing(transport.post, post_s)

    return setup


def record_of(events: list[Event]) -> EpochRecord:
    """The record the trainer builds of a pass from its events as they come (``Executor.run``'s ``on_timed``)."""
    record = EpochRecord(sum(e.step is not None for e in events), torch.device("cpu"))
    for e in events:
        record.add(e)
    return record


def merged_state(runs: list[RankRun]) -> dict[str, torch.Tensor]:
    """The unsplit model's state_dict, as final_model.pt holds it."""
    state: dict[str, torch.Tensor] = {}
    for run in runs:
        state.update({n: t.detach().clone() for n, t in run.stage.module.state_dict().items()})
    return state
