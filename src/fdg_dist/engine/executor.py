"""Runs one rank's share of a schedule: take inputs, call the stage, post the time's messages.

This is the only place where the schedule (what), the stage (compute) and the transport (wires)
meet.  Every rank walks its ``schedule.program`` — per schedule time, its actions and then the
messages that time posts — the same order ``fabric.replay`` proves deadlock-free under NCCL's rules.

Nothing here reads a device value between actions: losses and error counts accumulate on the device
and are read once, at the epoch end; finiteness is checked a step late (``finite``); times come from
a ``Clock`` that on a GPU records CUDA events and converts them once the device has passed them.  Each
action's event goes to ``on_action`` at once and to ``on_timed`` when its times are known, and is then
dropped: nothing is kept for the whole epoch (``record`` keeps the events, for short trials and tests).

Must not decide what happens when (``schedule``), compute (``stage``) or move tensors itself (``transport``),
nor read files or the configuration.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fdg_dist.engine import schedule
from fdg_dist.engine.schedule import Action, Kind, Message, Plan
from fdg_dist.engine.stage import Stage, StepInfo
from fdg_dist.engine.transport import Envelope, Transport


@dataclass(frozen=True)
class Boundary:
    """Per-sample activation shapes at this module's input and output, the dtype on the wire, and the
    per-sample label shape (``()`` for a class, ``(T,)`` for next-token targets)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    label_shape: tuple[int, ...] = ()


@dataclass
class Event:
    """One executed action, for instrumentation, TensorBoard and the trace (times in seconds)."""

    action: Action
    start: float  # on the host clock (time.perf_counter), also for device-timed events
    wait_s: float  # time blocked on an incoming message (module 0 forward: on its data)
    compute_s: float
    stash: int  # forwards held after the action
    batches: tuple[int, ...] = ()  # STEP: batches whose gradients this step applied
    step: StepInfo | None = None  # STEP: gradient norm (and update ratio at log intervals)
    marks: tuple[Any, Any, Any] | None = None  # clock marks until the epoch end resolves them


@dataclass
class Cut:
    """An epoch stopped after ``tick`` on every rank (a consistent cut: every message produced by then
    has been received): what this rank needs to go on from there, bit for bit."""

    tick: int
    applied: list[int]  # batches whose gradients are accumulated but not yet stepped (adl)
    messages: dict[tuple[str, int], list[torch.Tensor]]  # received, not yet used
    loss_sum: torch.Tensor
    errors: torch.Tensor
    samples: int


class StopCheck(Protocol):
    """Decides, identically on every rank, whether to stop after a tick (see ``preempt``)."""

    def at(self, tick: int) -> bool: ...

    def close(self) -> None: ...


@dataclass
class EpochResult:
    """What a module saw in one pass; loss and errors may be device tensors until first read."""

    loss_sum: float | torch.Tensor = 0.0
    errors: int | torch.Tensor = 0
    samples: int = 0
    events: list[Event] = field(default_factory=list)  # with ``Executor(record=True)`` only
    stopped: Cut | None = None  # set when the pass was stopped early

    @property
    def loss(self) -> float:
        return float(self.loss_sum) / max(self.samples, 1)

    @property
    def error(self) -> float:
        return int(self.errors) / max(self.samples, 1)


class Clock(Protocol):
    """Marks taken around every action, turned into seconds only at the epoch end."""

    def begin(self) -> None: ...

    def mark(self) -> Any: ...

    def done(self, marks: tuple[Any, Any, Any]) -> bool:
        """Whether ``resolve`` can read these marks without waiting."""
        ...

    def resolve(self, marks: tuple[Any, Any, Any]) -> tuple[float, float, float]:
        """(start on the host clock, wait seconds, compute seconds)."""
        ...


class HostClock:
    """``time.perf_counter``: on the CPU an op returns when its work is done, so this is what it took."""

    def begin(self) -> None:
        return None

    def mark(self) -> float:
        return time.perf_counter()

    def done(self, marks: tuple[float, float, float]) -> bool:
        return True

    def resolve(self, marks: tuple[float, float, float]) -> tuple[float, float, float]:
        start, ready, end = marks
        return start, ready - start, end - ready


class DeviceClock:
    """CUDA events on the compute stream: when the device ran an action, not when the host queued it.

    The wait mark comes after the stream was told to wait for the incoming message, so (start → ready)
    is the device idling for a neighbour and (ready → end) its compute.  ``event`` makes the events
    (``torch.cuda.Event(enable_timing=True)``; tests pass a fake).
    """

    def __init__(self, event: Callable[[], Any] | None = None) -> None:
        self.event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self.origin: tuple[float, Any] | None = None

    def begin(self) -> None:
        self.origin = (time.perf_counter(), self.mark())

    def mark(self) -> Any:
        e = self.event()
        e.record()
        return e

    def done(self, marks: tuple[Any, Any, Any]) -> bool:
        return marks[2].query()  # the device has passed the last mark (so the earlier ones too): no sync

    def resolve(self, marks: tuple[Any, Any, Any]) -> tuple[float, float, float]:
        start, ready, end = marks
        end.synchronize()
        host0, event0 = self.origin
        return (host0 + event0.elapsed_time(start) / 1e3, start.elapsed_time(ready) / 1e3,
                ready.elapsed_time(end) / 1e3)


class Untimed:
    """The clock of a pass whose times nobody reads (no ``on_timed``, no ``record``: an evaluation without a
    trace): no marks at all, so no CUDA events on a GPU."""

    def begin(self) -> None:
        return None

    def mark(self) -> None:
        return None

    def done(self, marks: tuple[None, None, None]) -> bool:
        return True

    def resolve(self, marks: tuple[None, None, None]) -> tuple[float, float, float]:
        return 0.0, 0.0, 0.0


@contextmanager
def _sync_debug(device: torch.device) -> Iterator[None]:
    """``FDG_SYNC_DEBUG=warn|error`` on a GPU: torch flags every host synchronisation inside the steady state
    (the GPU acceptance script runs with ``error``); the epoch-end reads come after and are not flagged."""
    mode = os.environ.get("FDG_SYNC_DEBUG")
    if not mode or device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


class Executor:
    def __init__(self, stage: Stage, transport: Transport, boundary: Boundary, *, record: bool = False,
                 measure_every: int = 0, clock: Clock | None = None, probe_every: int = 0) -> None:
        self.stage = stage
        self.transport = transport
        self.boundary = boundary
        self.k = stage.index
        self.K = stage.num_stages
        self.record = record  # keep every event of a pass in its result (a short trial's, a test's)
        self.measure_every = measure_every  # steps between update/weight-ratio measurements (0: never)
        self.probe_every = probe_every  # steps between staleness probes (0: never)
        self.clock = clock or HostClock()

    def run(self, plan: Plan, batch_sizes: list[int], batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None,
            *, epoch: int, train: bool, on_action: Callable[[Event], None] | None = None,
            on_timed: Callable[[Event], None] | None = None,
            resume: Cut | None = None, stop: StopCheck | None = None) -> EpochResult:
        """Execute one epoch (train) or one evaluation pass; returns the stats this module saw.

        ``on_action`` sees each action's event as it ends, ``on_timed`` once its times are resolved (at once
        on the host clock, once the device passed it on a GPU, all by the end of the pass), in order.
        ``resume`` continues an epoch after the tick where it was cut (``batches`` then starts at module
        0's first forward after it); ``stop`` may cut it after any tick every rank works in.
        """
        phase = 0 if train else 1
        result = EpochResult(loss_sum=torch.zeros((), device=self.stage.device),
                             errors=torch.zeros((), dtype=torch.int64, device=self.stage.device))
        untimed: deque[Event] = deque()
        clock = self.clock if on_timed is not None or self.record else Untimed()

        def hand_over(every: bool) -> None:
            """Resolve the oldest events whose times are known (``every``: all) and pass them on."""
            while untimed and (every or clock.done(untimed[0].marks)):
                e = untimed.popleft()
                e.start, e.wait_s, e.compute_s = clock.resolve(e.marks)
                e.marks = None
                if self.record:
                    result.events.append(e)
                if on_timed is not None:
                    on_timed(e)

        def ended(event: Event) -> None:
            if on_action is not None:
                on_action(event)
            untimed.append(event)
            hand_over(False)

        clock.begin()
        with _sync_debug(self.stage.device):
            self._walk(plan, batch_sizes, batches, epoch, phase, train, ended, result, resume, stop, clock)
        if stop is not None:
            stop.close()
        self.transport.drain()
        if train:
            self.stage.finite.flush()
        hand_over(True)
        return result

    def _walk(self, plan: Plan, batch_sizes: list[int], batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None,
              epoch: int, phase: int, train: bool, ended: Callable[[Event], None],
              result: EpochResult, resume: Cut | None, stop: StopCheck | None, clock: Clock) -> None:
        """The steady state: every schedule time's actions, then its messages; no device value is read."""
        outbox: dict[tuple[str, int], list[torch.Tensor]] = {}
        applied: list[int] = []  # batches whose gradients are accumulated but not yet stepped
        steps = schedule.program(plan, self.K, after=None if resume is None else resume.tick,
                                 ordered=self.transport.ordered)
        if resume is not None:
            self.transport.deliver(resume.messages)
            applied = list(resume.applied)
            result.loss_sum += resume.loss_sum.to(self.stage.device)
            result.errors += resume.errors.to(self.stage.device)
            result.samples += resume.samples
        votes = set(plan.votes)  # ticks where every rank works: there all ranks can agree to stop
        for i, step in enumerate(steps):
            if step.ahead:
                self.transport.post([], [(m.src, self._envelopes(m, batch_sizes[m.batch], epoch, phase))
                                         for m in step.ahead])
            for a, needs in step.actions:
                start = clock.mark()
                if a.kind is Kind.FORWARD:
                    x, y = next(batches) if needs is None else self.transport.take(*needs)
                    ready = clock.mark()
                    out, stats, grad_in = self.stage.forward(
                        a.batch, x, y, train=train, keep_for_backward=train and not self._has_loss,
                        delayed=a.batch >= plan.sync)
                    if self.k < self.K - 1:
                        outbox[("act", a.batch)] = [out.to(self.boundary.dtype), y]
                    if grad_in is not None:
                        outbox[("grad", a.batch)] = [grad_in]
                    if stats is not None:
                        self.stage.finite.watch(stats.loss_sum, f"non-finite loss at module {self.k}, epoch {epoch}, "
                                                                f"batch {a.batch} (module step {self.stage.steps})")
                        result.loss_sum += stats.loss_sum
                        result.errors += stats.errors
                        result.samples += stats.samples
                    if train and self._has_loss:
                        applied.append(a.batch)
                elif a.kind is Kind.BACKWARD:
                    (grad,) = self.transport.take(*needs)
                    ready = clock.mark()
                    grad_in = self.stage.backward(a.batch, grad, probe=self._due(self.probe_every),
                                                  delayed=a.batch >= plan.sync)
                    if grad_in is not None:
                        outbox[("grad", a.batch)] = [grad_in]
                    applied.append(a.batch)
                else:
                    ready = start
                    info = self.stage.step(measure=self._due(self.measure_every), probe=self._due(self.probe_every),
                                           delayed=a.batch >= plan.sync)
                stepped = tuple(applied) if a.kind is Kind.STEP else ()
                if stepped:
                    applied = []
                ended(Event(a, 0.0, 0.0, 0.0, len(self.stage.stash), stepped, info if a.kind is Kind.STEP else None,
                            (start, ready, clock.mark())))
            tick = step.time[0]
            tick_done = i + 1 == len(steps) or steps[i + 1].time[0] != tick
            # decided before posting: a cut posts no receive of a message produced after it
            stopping = stop is not None and tick_done and tick in votes and stop.at(tick)
            self.transport.post(
                [(m.dst, self._envelopes(m, batch_sizes[m.batch], epoch, phase), outbox.pop((m.kind, m.batch)))
                 for m in step.sends],
                [(m.src, self._envelopes(m, batch_sizes[m.batch], epoch, phase))
                 for m in (step.recvs_until(tick) if stopping else step.recvs)])
            if stopping:
                result.stopped = Cut(tick, applied, self.transport.settle(), result.loss_sum, result.errors,
                                     result.samples)
                return

    def _due(self, every: int) -> bool:
        """Whether the stage's coming step is one of every ``every`` (0: never); a host counter, no device read."""
        return every > 0 and self.stage.steps % every == 0

    @property
    def _has_loss(self) -> bool:
        return self.stage.is_last or self.stage.aux_head is not None

    def _envelopes(self, m: Message, n: int, epoch: int, phase: int) -> list[Envelope]:
        """What message m must contain; both ends derive it from the schedule and the boundary shapes."""
        downstream = m.src < m.dst
        # the boundary between modules min(src,dst) and max(src,dst): this module's output if it is the lower one
        mine_is_lower = min(m.src, m.dst) == self.k
        shape = self.boundary.out_shape if mine_is_lower else self.boundary.in_shape
        main = Envelope(m.kind, phase, epoch, m.batch, self.boundary.dtype, (n, *shape))
        if downstream:
            return [main, Envelope("labels", phase, epoch, m.batch, torch.int64, (n, *self.boundary.label_shape))]
        return [main]
