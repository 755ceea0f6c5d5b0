"""Runs one rank's share of a schedule: take inputs, call the stage, post the time's P2P group.

This is the only place where the schedule (what), the stage (compute) and the transport (wires)
meet.  Every rank walks the times of its plan in order; after its actions at a time it posts that
time's sends and receives as one group (see ``schedule`` for why that is deadlock-free).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from fdg_dist.schedule import Action, Kind, Message, Plan
from fdg_dist.stage import BatchStats, NonFiniteError, Stage, StepInfo
from fdg_dist.transport import Envelope, Transport


@dataclass(frozen=True)
class Boundary:
    """Per-sample activation shapes at this module's input and output, and the dtype on the wire."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


@dataclass
class Event:
    """One executed action, for instrumentation, TensorBoard and the trace."""

    action: Action
    start: float
    wait_s: float  # time blocked on an incoming message
    compute_s: float
    stash: int  # forwards held after the action
    batches: tuple[int, ...] = ()  # STEP: batches whose gradients this step applied
    step: StepInfo | None = None  # STEP: gradient norm (and update ratio at log intervals)


@dataclass
class EpochResult:
    loss_sum: float = 0.0
    errors: int = 0
    samples: int = 0
    events: list[Event] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)

    @property
    def error(self) -> float:
        return self.errors / max(self.samples, 1)


class Executor:
    def __init__(self, stage: Stage, transport: Transport, boundary: Boundary, *, record: bool = True,
                 measure_every: int = 0) -> None:
        self.stage = stage
        self.transport = transport
        self.boundary = boundary
        self.k = stage.index
        self.K = stage.num_stages
        self.record = record
        self.measure_every = measure_every  # steps between update/weight-ratio measurements (0: never)

    def run(self, plan: Plan, batch_sizes: list[int], batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None,
            *, epoch: int, train: bool, on_action: Callable[[Event], None] | None = None) -> EpochResult:
        """Execute one epoch (train) or one evaluation pass; returns the stats this module saw."""
        phase = 0 if train else 1
        actions: dict[tuple, list[Action]] = defaultdict(list)
        for a in plan.actions:
            actions[a.time].append(a)
        sends: dict[tuple, list[Message]] = defaultdict(list)
        for m in plan.sends:
            sends[m.time].append(m)
        recvs: dict[tuple, list[Message]] = defaultdict(list)
        for m in plan.recvs:
            recvs[m.time].append(m)

        result = EpochResult()
        loss_sum = torch.zeros((), device=self.stage.device)
        errors = torch.zeros((), dtype=torch.int64, device=self.stage.device)
        outbox: dict[tuple[str, int], list[torch.Tensor]] = {}
        applied: list[int] = []  # batches whose gradients are accumulated but not yet stepped
        for t in plan.times():
            for a in actions.get(t, ()):
                start = time.perf_counter()
                wait = 0.0
                if a.kind is Kind.FORWARD:
                    if self.k == 0:
                        x, y = next(batches)
                    else:
                        x, y = self.transport.take("act", a.batch)
                    wait = time.perf_counter() - start
                    out, stats, grad_in = self.stage.forward(
                        a.batch, x, y, train=train, keep_for_backward=train and not self._has_loss)
                    if self.k < self.K - 1:
                        outbox[("act", a.batch)] = [out.to(self.boundary.dtype), y]
                    if grad_in is not None:
                        outbox[("grad", a.batch)] = [grad_in]
                    if stats is not None:
                        if self.stage.nan_policy == "stop":  # skip_step: the gradient check drops the step
                            self._check_loss(stats, a, epoch)
                        loss_sum += stats.loss_sum
                        errors += stats.errors
                        result.samples += stats.samples
                    if train and self._has_loss:
                        applied.append(a.batch)
                elif a.kind is Kind.BACKWARD:
                    (grad,) = self.transport.take("grad", a.batch)
                    wait = time.perf_counter() - start
                    grad_in = self.stage.backward(a.batch, grad)
                    if grad_in is not None:
                        outbox[("grad", a.batch)] = [grad_in]
                    applied.append(a.batch)
                else:
                    measure = self.measure_every > 0 and self.stage.steps % self.measure_every == 0
                    info = self.stage.step(measure=measure)
                stepped = tuple(applied) if a.kind is Kind.STEP else ()
                if stepped:
                    applied = []
                event = Event(a, start, wait, time.perf_counter() - start - wait, len(self.stage.stash), stepped,
                              info if a.kind is Kind.STEP else None)
                if self.record:
                    result.events.append(event)
                if on_action is not None:
                    on_action(event)
            self.transport.exchange(
                [(m.dst, *self._payload(m, batch_sizes, epoch, phase, outbox)) for m in sends.get(t, ())],
                [(m.src, self._envelopes(m, batch_sizes[m.batch], epoch, phase)) for m in recvs.get(t, ())])
            self.transport.reap()
        self.transport.drain()
        result.loss_sum = float(loss_sum)
        result.errors = int(errors)
        return result

    @property
    def _has_loss(self) -> bool:
        return self.stage.is_last or self.stage.aux_head is not None

    def _payload(self, m: Message, batch_sizes: list[int], epoch: int, phase: int,
                 outbox: dict[tuple[str, int], list[torch.Tensor]]) -> tuple[list[Envelope], list[torch.Tensor]]:
        return self._envelopes(m, batch_sizes[m.batch], epoch, phase), outbox.pop((m.kind, m.batch))

    def _envelopes(self, m: Message, n: int, epoch: int, phase: int) -> list[Envelope]:
        """What message m must contain; both ends derive it from the schedule and the boundary shapes."""
        downstream = m.src < m.dst
        # the boundary between modules min(src,dst) and max(src,dst): this module's output if it is the lower one
        mine_is_lower = min(m.src, m.dst) == self.k
        shape = self.boundary.out_shape if mine_is_lower else self.boundary.in_shape
        main = Envelope(m.kind, phase, epoch, m.batch, self.boundary.dtype, (n, *shape))
        if downstream:
            return [main, Envelope("labels", phase, epoch, m.batch, torch.int64, (n,))]
        return [main]

    def _check_loss(self, stats: BatchStats, a: Action, epoch: int) -> None:
        if not torch.isfinite(stats.loss_sum):
            raise NonFiniteError(f"non-finite loss {float(stats.loss_sum):g} at module {self.k}, "
                                 f"epoch {epoch}, batch {a.batch} (module step {self.stage.steps})")
