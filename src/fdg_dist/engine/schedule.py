"""Which module does what, when: the tick rule of every method, as plain data.

A schedule is a list of :class:`Action` per module.  Each action has a ``time`` — a tuple
``(tick, phase, sub, seq)`` ordered lexicographically — and every message between neighbours is
produced by an action at one time and consumed by an action at a strictly later time.  The
executor walks times in order on every rank and posts each time's sends and receives, so every pair of
ranks issues its operations in the same order (deadlock-free under NCCL, whose sends may wait for their
receives) without any rank knowing the others' progress; under NCCL every rank also issues them, over all
its links, in one global order (``launch_key``), which a device running one kernel at a time needs.

The FDG rule (SPEC §1), module k of K, batch b:
    forward  at tick b + k                      (one hop per tick, decoupled)
    backward at tick b + 2(K-1) - k  (k < K-1)  (the gradient arrives one hop per tick)
    the last module back-propagates its loss at once and steps after its forward.
Within a tick: backward (phase 0), step (phase 1), forward (phase 2).

A synchronous warm-up (``sync``) runs an epoch's first batches by back-propagation's locked rule and the
rest by the method's: batch ``sync``'s first forward comes after the last synchronous batch is applied on
every module (the pipeline drains between the two), and accumulation (adl) starts afresh there.

Must not touch tensors, devices or process groups: plain data that ``executor`` walks and ``fabric`` and
``split.pace`` replay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

Time = tuple[int, int, int, int]

BACKWARD_PHASE, STEP_PHASE, FORWARD_PHASE, LOCKED_BACKWARD_PHASE = 0, 1, 2, 3


class Kind(str, Enum):
    FORWARD = "forward"
    BACKWARD = "backward"
    STEP = "step"


@dataclass(frozen=True, order=True)
class Action:
    time: Time
    module: int
    kind: Kind
    batch: int  # for STEP: the batch whose gradient completes this step

    @property
    def tick(self) -> int:
        return self.time[0]


@dataclass(frozen=True, order=True)
class Message:
    """A tensor that crosses one pipeline hop; ``kind`` is "act" (forward) or "grad" (backward)."""

    time: Time  # when the producer sends it
    src: int
    dst: int
    kind: str
    batch: int


@dataclass(frozen=True)
class Rule:
    """A method's timing: when module k forwards and back-propagates batch b."""

    forward: Callable[[int, int, int], Time]  # (k, b, K) -> time
    backward: Callable[[int, int, int], Time] | None  # None: no gradient crosses modules (dgl)
    locked: bool  # forward of batch b at module k waits for module k-1 in the same tick


def _fdg_forward(k: int, b: int, K: int) -> Time:
    return (b + k, FORWARD_PHASE, 0, 0)


def _fdg_backward(k: int, b: int, K: int) -> Time:
    return (b + 2 * (K - 1) - k, BACKWARD_PHASE, 0, 0)


def _locked_forward(k: int, b: int, K: int) -> Time:
    return (b, FORWARD_PHASE, k, 0)


def _ddg_backward(k: int, b: int, K: int) -> Time:
    return (b + (K - 1 - k), BACKWARD_PHASE, 0, 0)


def _bp_backward(k: int, b: int, K: int) -> Time:
    return (b, LOCKED_BACKWARD_PHASE, K - 1 - k, 0)


RULES: dict[str, Rule] = {
    "fdg": Rule(_fdg_forward, _fdg_backward, locked=False),
    "adl": Rule(_fdg_forward, _fdg_backward, locked=False),
    "dgl": Rule(_fdg_forward, None, locked=False),
    "ddg": Rule(_locked_forward, _ddg_backward, locked=True),
    "fr": Rule(_locked_forward, _ddg_backward, locked=True),
    "bp": Rule(_locked_forward, _bp_backward, locked=True),
    "dp": Rule(_locked_forward, _bp_backward, locked=True),  # K = 1 per replica: plain back-propagation
}


def _after(t: Time) -> Time:
    return (t[0], t[1], t[2], t[3] + 1)


def train_actions(method: str, k: int, K: int, n_batches: int, accum_steps: int = 1, sync: int = 0) -> list[Action]:
    """Module k's actions for one epoch of ``n_batches`` batches, drained at the end.

    Steps follow the backward that completes them; with ``accum_steps`` M (adl) a module steps after
    every M-th backward and after the epoch's last one, so every epoch ends fully applied.  Batches
    ``b < sync`` go by back-propagation's rule (the synchronous warm-up), applied before the others start.
    """
    last = k == K - 1
    actions: list[Action] = []
    for b in range(n_batches):
        rule = RULES["bp" if b < sync else method]
        first = 0 if b < sync else sync  # where this part's accumulation groups start
        fwd = rule.forward(k, b, K)
        actions.append(Action(fwd, k, Kind.FORWARD, b))
        if last or rule.backward is None:
            grad_time = fwd  # loss (global or local) back-propagated at once, inside the forward
        else:
            grad_time = rule.backward(k, b, K)
            actions.append(Action(grad_time, k, Kind.BACKWARD, b))
        if (b - first + 1) % accum_steps == 0 or b in (n_batches - 1, sync - 1):
            step_time = _after(grad_time) if grad_time[1] != BACKWARD_PHASE else (grad_time[0], STEP_PHASE, 0, 0)
            actions.append(Action(step_time, k, Kind.STEP, b))
    return sorted(actions)


def eval_actions(k: int, n_batches: int) -> list[Action]:
    """Forward-only pipeline for evaluation: one hop per tick, nothing stashed."""
    return [Action(_fdg_forward(k, b, 0), k, Kind.FORWARD, b) for b in range(n_batches)]


def messages(actions: list[Action], K: int, *, sends_grad: bool) -> list[Message]:
    """The messages module ``actions[0].module`` sends: activations down, gradients up."""
    out: list[Message] = []
    for a in actions:
        k = a.module
        if a.kind is Kind.FORWARD and k < K - 1:
            out.append(Message(a.time, k, k + 1, "act", a.batch))
        grad_source = a.kind is Kind.BACKWARD or (a.kind is Kind.FORWARD and k == K - 1)
        if sends_grad and grad_source and k > 0:
            out.append(Message(a.time, k, k - 1, "grad", a.batch))
    return out


@dataclass
class Plan:
    """All actions and messages of one epoch for one rank: what the executor walks.  ``sync``: the epoch's
    batches of synchronous warm-up (run by back-propagation's rule); ``votes``: the ticks in which every module
    acts, where all ranks can agree to stop (``preempt``)."""

    actions: list[Action]
    sends: list[Message]
    recvs: list[Message]
    sync: int = 0
    votes: tuple[int, ...] = ()

    def times(self) -> list[Time]:
        """Every time at which this rank acts, sends or receives, in order."""
        return sorted({a.time for a in self.actions} | {m.time for m in self.sends} | {m.time for m in self.recvs})


def plan(method: str, k: int, K: int, n_batches: int, *, train: bool, accum_steps: int = 1, sync: int = 0) -> Plan:
    """Module k's plan; neighbours' messages are derived from their own schedules, never exchanged.  ``sync``
    (training only): the epoch's first batches run synchronously (``sync_batches``)."""
    sends_grad = train and RULES[method].backward is not None
    sync = sync if train else 0

    def acts(j: int) -> list[Action]:
        return train_actions(method, j, K, n_batches, accum_steps, sync) if train else eval_actions(j, n_batches)

    mine = acts(k)
    recvs = [m for j in (k - 1, k + 1) if 0 <= j < K for m in messages(acts(j), K, sends_grad=sends_grad) if m.dst == k]
    busy = [{a.tick for a in acts(j)} for j in range(K)]
    votes = tuple(t for t in range(K - 1, n_batches) if all(t in ticks for ticks in busy))
    return Plan(mine, messages(mine, K, sends_grad=sends_grad), sorted(recvs), sync, votes)


def sync_batches(warmup: int, done: int, n_batches: int) -> int:
    """How many of an epoch's ``n_batches`` belong to a synchronous warm-up of ``warmup`` batches of the run
    when ``done`` batches were trained before the epoch."""
    return min(max(warmup - done, 0), n_batches)


def consumes(action: Action, K: int) -> tuple[str, int] | None:
    """The message (kind, batch) an action must take before it runs; None if it needs none.

    Module 0 reads its forward's input from the data, not from a neighbour; a step uses what the
    module accumulated itself.
    """
    if action.kind is Kind.FORWARD and action.module > 0:
        return ("act", action.batch)
    if action.kind is Kind.BACKWARD:
        return ("grad", action.batch)
    return None


def launch_key(m: Message) -> tuple[Time, int, int]:
    """Where message m stands in the one global launch order every rank issues its operations in (``program``
    with ``ordered``): by the time it is produced, then gradients before activations, then along the flow
    (activations from the first module on, gradients from the last), so a rank that passes a message on at the
    time it receives one posts the receive first."""
    return (m.time, 0, -m.src) if m.kind == "grad" else (m.time, 1, m.src)


@dataclass(frozen=True)
class Step:
    """One schedule time of one rank: its actions (each with the message it takes), then the messages it
    posts (sends it produced at this time, receives of what its neighbours produce at its next time).
    ``ahead``: receives posted before the actions (an ordered program's first step, for the receives of its
    own time that come before its sends in the launch order)."""

    time: Time
    actions: list[tuple[Action, tuple[str, int] | None]]
    sends: list[Message]
    recvs: list[Message]
    ahead: tuple[Message, ...] = ()

    def recvs_until(self, tick: int) -> list[Message]:
        """The receives this step posts when the run is cut after ``tick`` (``executor.Cut``): none of a
        message produced after the cut (posted early, see ``program``), which no neighbour sends before
        the run resumes; the resumed program posts it (``program(after=tick)``)."""
        return [m for m in self.recvs if m.time[0] <= tick]

    def posts(self) -> list[Message]:
        """Every message this step sends or receives, in the order the rank issues them."""
        return [*self.ahead, *self.sends, *self.recvs]


def program(p: Plan, K: int, *, after: int | None = None, ordered: bool = False) -> list[Step]:
    """The order in which a rank acts, takes and posts: what the executor walks and the fabric replays.

    Both go through this one function, so a replay that proves an order deadlock-free under NCCL's
    rules proves the order the executor really uses.  ``after``: only the times after that tick, the
    program of an epoch resumed after a cut (its first step also posts its own receives).

    ``ordered`` (NCCL): every rank issues its sends and receives, over all its links, in one global order
    (``launch_key``).  NCCL requires it of several communicators on one device: a GPU may run their kernels
    one at a time (``NCCL_LAUNCH_ORDER_IMPLICIT=1``, ``CUDA_DEVICE_MAX_CONNECTIONS=1``, SM pressure, ranks
    sharing a GPU), and then a rank's operations complete in the order it issued them.  A receive is still
    posted a step early unless the rank sends, at the time the message is produced, a message that comes
    first in that order: then right after that send.  Only one receive per tick waits so (the last module's
    activation, which exchanges with module K-2 at the same time in fdg and adl); gloo, whose links progress
    independently, keeps every receive early (``ordered`` False).
    """
    actions: dict[Time, list[Action]] = {}
    for a in p.actions:
        actions.setdefault(a.time, []).append(a)
    sends: dict[Time, list[Message]] = {}
    for m in p.sends:
        sends.setdefault(m.time, []).append(m)
    recvs: dict[Time, list[Message]] = {}
    for m in p.recvs:
        recvs.setdefault(m.time, []).append(m)
    times = [t for t in p.times() if after is None or t[0] > after]
    if not times:
        return []
    if not ordered:
        # Each time's receives are posted one step early: gloo moves a message only once its receive is posted, so
        # a receive posted right before the action that takes it made the rank wait for the whole transfer (4-18 ms
        # for 8 MB on the loaded 2-core box, 0.04 ms posted early); a step early, it arrives during the previous
        # action.  Every link still posts its receives in time order (NCCL's FIFO matching is unchanged).
        posted = [recvs.get(t, []) for t in times[1:]] + [[]]
        posted[0] = recvs.get(times[0], []) + posted[0]
        return [Step(t, [(a, consumes(a, K)) for a in actions.get(t, ())], sends.get(t, []), early)
                for t, early in zip(times, posted, strict=True)]
    posted: list[list[Message]] = [[] for _ in times]  # after step i's sends
    ahead: list[Message] = []  # before the first step's actions
    for i, t in enumerate(times):
        first = min((launch_key(m) for m in sends.get(t, ())), default=None)
        for m in recvs.get(t, ()):
            if first is not None and first < launch_key(m):
                posted[i].append(m)  # after the send that comes first
            elif i:
                posted[i - 1].append(m)  # a step early
            else:
                ahead.append(m)
    return [Step(t, [(a, consumes(a, K)) for a in actions.get(t, ())], sorted(sends.get(t, []), key=launch_key),
                 sorted(posted[i], key=launch_key), tuple(sorted(ahead, key=launch_key)) if i == 0 else ())
            for i, t in enumerate(times)]


def first_forward_after(p: Plan, tick: int) -> int:
    """The first batch a rank forwards after ``tick`` (the number of batches if none): where module 0's data
    resumes when an epoch continues after a cut."""
    later = [a.batch for a in p.actions if a.kind is Kind.FORWARD and a.tick > tick]
    return min(later, default=len({a.batch for a in p.actions if a.kind is Kind.FORWARD}))


def grid(method: str, K: int, n_batches: int, accum_steps: int = 1) -> str:
    """A tick × module table (F3 = forward batch 3, B1 = backward batch 1, S = step) for docs and debugging."""
    cells: dict[tuple[int, int], list[str]] = {}
    for k in range(K):
        for a in train_actions(method, k, K, n_batches, accum_steps):
            cells.setdefault((a.tick, k), []).append({"forward": "F", "backward": "B", "step": "S"}[a.kind.value]
                                                     + ("" if a.kind is Kind.STEP else str(a.batch)))
    ticks = max(t for t, _ in cells) + 1
    rows = ["tick | " + " | ".join(f"module {k}" for k in range(K))]
    rows += [f"{t:>4} | " + " | ".join(" ".join(cells.get((t, k), ["."])) for k in range(K)) for t in range(ticks)]
    return "\n".join(rows)
