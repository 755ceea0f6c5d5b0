"""NCCL's point-to-point rules, emulated in one process: how CI, which has no GPU, proves the GPU path.

Every rank of a pipeline runs as a thread with its own ``Endpoint`` (a transport ``Wire``).  Payload
links follow NCCL, strictly:

- a link (one direction of one hop, one communicator) is one FIFO that ignores tags: its n-th send
  matches its n-th receive, whatever either claims to be;
- a send completes only once its receive is posted and a receive once its send is (no eager
  buffering that would hide a deadlock);
- dtype and element count must agree at both ends (NCCL would truncate or reinterpret silently);
- payloads must be contiguous and on the rank's device;
- a tensor handed to a send must not change (``_version``) until the sender has seen the send complete.

A link's first use is a rendezvous of its two ranks (NCCL creates a communicator, or connects a pair's
channels, at a link's first operation, blocking the host until the peer arrives): ``Endpoint.open`` waits
for the peer at start; a payload on a link never opened is listed in ``lazy_opens`` (a lazy creation).

``serial=True`` is a device that runs one communication kernel at a time (``NCCL_LAUNCH_ORDER_IMPLICIT=1``,
``CUDA_DEVICE_MAX_CONNECTIONS=1``, ranks sharing a GPU): each rank's payload operations complete strictly in
the order it issued them, over all its links, and a matched pair completes only once it heads both ranks'
queues.  Programs that issue in no global order deadlock here.

``completion="gloo"`` reports a send incomplete until it was waited for, as gloo's ``is_completed()`` does
(SPEC §5); under either rule the fabric counts, per link, the payloads handed to sends that are still alive
(``live_sends``, the most at any send in ``max_live_sends``): the memory a sender keeps for its link.

Headers follow gloo: matched by (link, tag), CPU tensors only.  A wait that can never end — every live
rank is waiting — raises ``DeadlockError`` naming every rank's wait, and a rank that fails makes its
peers' waits fail as a closed socket would.

``replay`` checks the programs of all ranks (``schedule.program``: the order in which each rank takes
and posts messages, the order the executor uses, with the transport's wait for sends more than its
window old) against the same FIFO rules without tensors or threads, in milliseconds; ``device_sync`` adds
a device-wide synchronisation before every action (cuDNN's autotuner), which waits for everything the rank
has posted.  ``launch_order`` checks that the union of every rank's issue order is acyclic: one global
order exists, so no device that runs kernels one at a time can deadlock on them.

Must not be used by a real run: it stands in for NCCL in tests and benchmarks only.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from fdg_dist.engine.schedule import Message, Step, launch_key
from fdg_dist.engine.transport import SEND_WINDOW, Link

T = TypeVar("T")
_NCCL_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                torch.int8, torch.uint8, torch.bool}


class FabricError(RuntimeError):
    """A broken NCCL rule: what would truncate, reinterpret, corrupt or hang on a GPU."""


class DeadlockError(FabricError):
    """Every live rank waits for a message that no rank will ever send."""


@dataclass(eq=False)
class _Op:
    rank: int
    peer: int
    is_send: bool
    tensor: torch.Tensor
    what: str  # for messages: "send act 0->1" / "recv header grad 2->1 tag 1"
    version: int
    done: bool = False
    waited: bool = False  # the owner has waited for it (gloo reports a send complete only then)
    error: BaseException | None = None
    channel: str = "payload"  # payload, header or open
    queued: bool = False  # serial: in its rank's issue queue, complete only once it heads it
    partner: _Op | None = None  # the op it matched


class _Work:
    """What isend/irecv return: ``wait`` blocks the rank's thread, ``is_completed`` does not."""

    def __init__(self, fabric: Fabric, op: _Op) -> None:
        self.fabric, self.op = fabric, op

    def wait(self) -> bool:
        self.fabric._wait(self.op)
        return True

    def is_completed(self) -> bool:
        with self.fabric._cond:
            if self.op.error is not None:
                raise self.op.error
            if self.op.done:
                self.fabric._observed(self.op)
            unseen = self.fabric.completion == "gloo" and self.op.is_send and not self.op.waited
            return self.op.done and not unseen


class Fabric:
    """The shared medium of one emulated job: ``devices[r]`` is rank r's device (payloads must live there)."""

    def __init__(self, devices: Sequence[torch.device | str], *, timeout_s: float = 120.0,
                 completion: str = "nccl", serial: bool = False) -> None:
        self.devices = [torch.device(d) for d in devices]
        self.timeout_s = timeout_s
        self.completion = completion  # nccl: is_completed() tells; gloo: only after wait()
        self.serial = serial  # each rank's payloads complete in its issue order (one kernel at a time)
        self.matched = 0  # payload messages delivered
        self.opened: list[tuple[int, Link]] = []  # (rank, link) in the order links were opened at start
        self.lazy_opens: list[str] = []  # links whose first use came with a payload, mid-run
        self._open: set[tuple[int, Link]] = set()
        self._issued: dict[int, deque[_Op]] = {}  # serial: each rank's payloads not yet complete, in issue order
        self.max_live_sends: dict[Link, int] = {}
        self._sent: dict[Link, list[weakref.ref[torch.Tensor]]] = {}
        self._cond = threading.Condition()
        self._queues: dict[tuple, tuple[deque[_Op], deque[_Op]]] = {}  # channel -> (unmatched sends, receives)
        self._waiting: dict[int, _Op] = {}
        self._live = set(range(len(self.devices)))
        self._failed: dict[int, str] = {}
        self._deadlock: str | None = None

    def endpoint(self, rank: int) -> Endpoint:
        return Endpoint(self, rank)

    def run(self, bodies: Sequence[Callable[[Endpoint], T]]) -> list[T]:
        """Run ``bodies[r](endpoint r)`` for every rank on its own thread; returns their results, or raises
        the first error any rank hit (the others are usually its consequences: lost peers, deadlocks)."""
        results: list[Any] = [None] * len(bodies)
        errors: list[tuple[float, int, BaseException]] = []

        def body(rank: int) -> None:
            try:
                results[rank] = bodies[rank](self.endpoint(rank))
            except BaseException as e:
                errors.append((time.monotonic(), rank, e))
                with self._cond:
                    self._failed[rank] = f"{type(e).__name__}: {e}"
            finally:
                with self._cond:
                    self._live.discard(rank)
                    self._cond.notify_all()

        threads = [threading.Thread(target=body, args=(r,), name=f"fabric-rank{r}") for r in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            errors.sort(key=lambda e: e[0])
            first = errors[0][2]
            for _, rank, e in errors[1:]:
                first.add_note(f"then rank {rank}: {type(e).__name__}: {e}")
            raise first
        return results

    def live_sends(self, link: Link) -> int:
        """Payloads handed to sends on ``link`` that are still alive (held by their sender)."""
        with self._cond:
            refs = self._sent[link] = [r for r in self._sent.get(link, []) if r() is not None]
            return len(refs)

    # ----------------------------------------------------------------- internals
    def _sending(self, tensor: torch.Tensor, link: Link) -> None:
        """Count ``tensor`` among the link's live send payloads, and the most seen alive at once."""
        live = self.live_sends(link) + 1
        with self._cond:
            self._sent[link].append(weakref.ref(tensor))
            self.max_live_sends[link] = max(self.max_live_sends.get(link, 0), live)

    def _post(self, op: _Op, channel: tuple) -> _Work:
        with self._cond:
            sends, recvs = self._queues.setdefault(channel, (deque(), deque()))
            waiting = recvs if op.is_send else sends
            if waiting:
                other = waiting.popleft()
                self._match(op if op.is_send else other, other if op.is_send else op)
            else:
                (sends if op.is_send else recvs).append(op)
            self._cond.notify_all()
            if op.error is not None:
                raise op.error
        return _Work(self, op)

    def _match(self, send: _Op, recv: _Op) -> None:
        a, b = send.tensor, recv.tensor
        problem = None
        if a.dtype != b.dtype:
            problem = f"dtype {a.dtype} sent, {b.dtype} expected: NCCL would reinterpret the bytes"
        elif a.numel() != b.numel():
            problem = (f"{a.numel()} elements sent, {b.numel()} expected: NCCL would truncate or hang "
                       f"(shapes {tuple(a.shape)} and {tuple(b.shape)})")
        elif a._version != send.version:
            problem = "the sent tensor was modified after the send was posted, before it completed"
        if problem is not None:
            send.error = recv.error = FabricError(f"{send.what} (rank {send.rank}) matched {recv.what} "
                                                  f"(rank {recv.rank}): {problem}")
            return
        send.partner, recv.partner = recv, send
        if not send.queued:
            self._complete(send, recv)
            return
        changed = True
        while changed:  # complete every pair that heads both its ranks' queues
            changed = False
            for queue in self._issued.values():
                head = queue[0] if queue else None
                if head is not None and head.partner is not None:
                    other = self._issued[head.partner.rank]
                    if other and other[0] is head.partner:
                        queue.popleft(), other.popleft()
                        self._complete(*((head, head.partner) if head.is_send else (head.partner, head)))
                        changed = True

    def _complete(self, send: _Op, recv: _Op) -> None:
        recv.tensor.view(-1).copy_(send.tensor.reshape(-1))
        send.done = recv.done = True
        send.partner = recv.partner = None  # no reference cycle: a sent tensor dies with its sender's hold
        self.matched += send.channel == "payload"

    def _observed(self, op: _Op) -> None:
        if op.is_send and op.tensor._version != op.version:
            op.error = FabricError(f"{op.what} (rank {op.rank}): the sent tensor was modified before the "
                                   "sender saw the send complete (NCCL may still be reading it)")
            raise op.error

    def _stuck(self, rank: int) -> bool:
        """Rank waits for an op that nothing but another rank's progress can complete (a rank woken but
        not yet running again still counts as waiting in ``_waiting``: its op is done)."""
        op = self._waiting.get(rank)
        return op is not None and not op.done and op.error is None and op.peer not in self._failed

    def _wait(self, op: _Op) -> None:
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            try:
                while True:
                    if op.error is not None:
                        raise op.error
                    if op.done:
                        self._observed(op)
                        op.waited = True
                        return
                    if op.peer in self._failed:
                        raise RuntimeError(f"Connection closed by peer: rank {op.peer} failed "
                                           f"({self._failed[op.peer]})")
                    self._waiting[op.rank] = op
                    if self._deadlock is None and all(self._stuck(r) for r in self._live):
                        self._deadlock = "every live rank waits: " + "; ".join(
                            f"rank {r} waits for {self._waiting[r].what}" for r in sorted(self._live))
                        self._cond.notify_all()
                    if self._deadlock is not None:
                        raise DeadlockError(self._deadlock)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise FabricError(f"rank {op.rank}: timed out after {self.timeout_s:g} s waiting for {op.what}")
                    self._cond.wait(left)
            finally:
                self._waiting.pop(op.rank, None)


class Endpoint:
    """One rank's wire into the fabric (the ``transport.Wire`` protocol)."""

    def __init__(self, fabric: Fabric, rank: int) -> None:
        self.fabric, self.rank = fabric, rank
        self.device = fabric.devices[rank]

    def send(self, tensor: torch.Tensor, link: Link) -> _Work:
        return self._payload(tensor, link, is_send=True)

    def recv(self, tensor: torch.Tensor, link: Link) -> _Work:
        return self._payload(tensor, link, is_send=False)

    def send_header(self, tensor: torch.Tensor, link: Link, tag: int) -> _Work:
        return self._header(tensor, link, tag, is_send=True)

    def recv_header(self, tensor: torch.Tensor, link: Link, tag: int) -> _Work:
        return self._header(tensor, link, tag, is_send=False)

    ordered = True  # the fabric emulates NCCL: the launch order matters (see ``serial``)

    def describe(self, module: int) -> str:
        return f"module {module} (rank {module})"

    def open(self, link: Link) -> None:
        """The link's rendezvous at start: returns once its peer opened it too."""
        self._rendezvous(link)
        with self.fabric._cond:
            self.fabric.opened.append((self.rank, link))

    def _rendezvous(self, link: Link) -> None:
        is_src = link.src == self.rank
        what = f"open {link.kind} {link.src}->{link.dst}"
        self._check_end(link, is_src, what)
        self.fabric._open.add((self.rank, link))
        self._post(torch.empty(0), link, is_src, what, ("open", link)).wait()

    def _payload(self, tensor: torch.Tensor, link: Link, *, is_send: bool) -> _Work:
        what = f"{'send' if is_send else 'recv'} {link.kind} {link.src}->{link.dst}"
        self._check_end(link, is_send, what)
        if tensor.device != self.device:
            raise FabricError(f"rank {self.rank} {what}: payload on {tensor.device}; NCCL moves tensors of the "
                              f"rank's device {self.device}")
        if not tensor.is_contiguous():
            raise FabricError(f"rank {self.rank} {what}: payload is not contiguous (strides {tensor.stride()})")
        if tensor.dtype not in _NCCL_DTYPES:
            raise FabricError(f"rank {self.rank} {what}: NCCL has no {tensor.dtype}")
        if (self.rank, link) not in self.fabric._open:
            with self.fabric._cond:  # listed, not waited for: tests that drive endpoints by hand stay as they are
                self.fabric.lazy_opens.append(f"rank {self.rank} {what}")
                self.fabric._open.add((self.rank, link))
        if is_send:
            self.fabric._sending(tensor, link)
        return self._post(tensor, link, is_send, what, ("payload", link))

    def _header(self, tensor: torch.Tensor, link: Link, tag: int, *, is_send: bool) -> _Work:
        what = f"{'send' if is_send else 'recv'} header {link.kind} {link.src}->{link.dst} tag {tag}"
        self._check_end(link, is_send, what)
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise FabricError(f"rank {self.rank} {what}: gloo moves contiguous CPU tensors only")
        return self._post(tensor, link, is_send, what, ("header", link.src, link.dst, tag))

    def _check_end(self, link: Link, is_send: bool, what: str) -> None:
        if (link.src if is_send else link.dst) != self.rank:
            raise FabricError(f"rank {self.rank} cannot {what}: that link does not start/end here")

    def _post(self, tensor: torch.Tensor, link: Link, is_send: bool, what: str, channel: tuple) -> _Work:
        op = _Op(self.rank, link.dst if is_send else link.src, is_send, tensor, what, tensor._version, channel=channel[0],
                 queued=self.fabric.serial and channel[0] == "payload")
        if op.queued:
            with self.fabric._cond:
                self.fabric._issued.setdefault(self.rank, deque()).append(op)
        return self.fabric._post(op, channel)


# ----------------------------------------------------------------------- replay
@dataclass
class _RankState:
    steps: Sequence[Step]
    step: int = 0
    action: int = 0
    ahead: bool = False  # the current step's ``ahead`` receives are posted
    posted: bool = False  # the current step's messages are posted (it waits for its old sends)
    matched: set[tuple[str, int]] = field(default_factory=set)  # received messages ready to take
    posted_recvs: set[tuple[str, int]] = field(default_factory=set)


def replay(programs: Sequence[Sequence[Step]], *, window: int = SEND_WINDOW, device_sync: bool = False) -> int:
    """Walk every rank's program (``programs[k]``: module k's ``schedule.program``) under NCCL's FIFO rules:
    each link matches its n-th send with its n-th receive, and those must be the same message; a rank
    cannot take a message before it arrived, and after posting a time's messages it waits until at most
    ``window`` of its sends per link are unmatched (``Transport``: a send completes once its receive is
    posted).  ``device_sync``: before each action a rank also waits until everything it posted is matched (a
    device-wide synchronisation, as cuDNN's autotuner makes at a new shape).  Raises ``FabricError``/
    ``DeadlockError``; returns the number of messages delivered."""
    ranks = [_RankState(p) for p in programs]
    fifos: dict[Link, tuple[deque[Message], deque[Message]]] = {}
    delivered = 0

    def deliver(m: Message, is_send: bool) -> None:
        nonlocal delivered
        sends, recvs = fifos.setdefault(Link.of(m.kind, m.src, m.dst), (deque(), deque()))
        (sends if is_send else recvs).append(m)
        while sends and recvs:
            s, r = sends.popleft(), recvs.popleft()
            if (s.kind, s.batch) != (r.kind, r.batch):
                raise FabricError(f"link {s.kind} {s.src}->{s.dst}: module {s.src} sent {s.kind} of batch {s.batch} "
                                  f"where module {r.dst} expects {r.kind} of batch {r.batch}")
            ranks[r.dst].matched.add((r.kind, r.batch))
            delivered += 1

    def receive(k: int, st: _RankState, m: Message) -> None:
        st.posted_recvs.add((m.kind, m.batch))
        deliver(m, False)

    def pending(k: int) -> bool:
        """Whether rank k posted a send or a receive that is not matched yet."""
        return any((link.src == k and sends) or (link.dst == k and recvs) for link, (sends, recvs) in fifos.items())

    def sending(k: int) -> bool:
        """Whether rank k still waits for a send more than ``window`` messages old on its link."""
        return any(link.src == k and len(sends) > window for link, (sends, _) in fifos.items())

    def advance(k: int, st: _RankState) -> bool:
        """Run rank k as far as it can go; True if it moved."""
        moved = False
        while st.step < len(st.steps):
            step = st.steps[st.step]
            if st.posted:
                if sending(k):
                    return moved
                st.step, st.action, st.ahead, st.posted, moved = st.step + 1, 0, False, False, True
                continue
            if not st.ahead:
                for m in step.ahead:
                    receive(k, st, m)
                st.ahead = moved = True
            while st.action < len(step.actions):
                if device_sync and pending(k):
                    return moved
                need = step.actions[st.action][1]
                if need is not None:
                    if need not in st.posted_recvs:
                        raise FabricError(f"module {k} at time {step.time} takes {need} without having posted its "
                                          "receive")
                    if need not in st.matched:
                        return moved
                    st.matched.discard(need)
                st.action += 1
                moved = True
            for m in step.sends:
                deliver(m, True)
            for m in step.recvs:
                receive(k, st, m)
            st.posted = moved = True
        return moved

    def waiting(k: int, st: _RankState) -> str:
        step = st.steps[st.step]
        if st.posted:
            old = [(m.kind, m.batch) for link, (sends, _) in fifos.items() if link.src == k and len(sends) > window
                   for m in list(sends)[:len(sends) - window]]
            return f"module {k} at time {step.time} waits for its sends of {old} to be received"
        if device_sync and pending(k):
            return f"module {k} at time {step.time} waits in a device-wide sync for everything it posted"
        return f"module {k} at time {step.time} waits for {step.actions[st.action][1]}"

    while any(st.step < len(st.steps) for st in ranks):
        if not any([advance(k, st) for k, st in enumerate(ranks)]):
            waits = [waiting(k, st) for k, st in enumerate(ranks) if st.step < len(st.steps)]
            raise DeadlockError("no module can move: " + "; ".join(waits))
    for link, (sends, recvs) in fifos.items():
        if sends or recvs:
            raise FabricError(f"link {link.kind} {link.src}->{link.dst} ends with unmatched messages: sends "
                              f"{[m.batch for m in sends]}, receives {[m.batch for m in recvs]}")
    for k, st in enumerate(ranks):
        if st.matched:
            raise FabricError(f"module {k} received but never used {sorted(st.matched)}")
    return delivered


def launch_order(programs: Sequence[Sequence[Step]]) -> list[Message]:
    """One order of all messages that every rank's issue order (``Step.posts``, over all its links) follows,
    or ``FabricError`` naming a cycle.  A message is one node (its send and its receive are one operation of
    the pair), each rank's consecutive operations an edge: with no cycle, a device that runs one kernel at a
    time, or synchronises in between, completes them in this order; with one, every rank on it waits."""
    after: dict[Message, set[Message]] = {}
    for program in programs:
        issued = [m for step in program for m in step.posts()]
        for m in issued:
            after.setdefault(m, set())
        for a, b in zip(issued, issued[1:], strict=False):
            after[a].add(b)
    before = {m: 0 for m in after}
    for targets in after.values():
        for b in targets:
            before[b] += 1
    ready = sorted((m for m, n in before.items() if n == 0), key=launch_key)
    order: list[Message] = []
    while ready:
        m = ready.pop()
        order.append(m)
        for b in after[m]:
            before[b] -= 1
            if before[b] == 0:
                ready.append(b)
    if len(order) < len(after):
        stuck = {m for m, n in before.items() if n}
        m = min(stuck, key=launch_key)
        cycle = [m]
        while True:  # walk back along edges inside the stuck set until a message repeats
            m = next(a for a in sorted(stuck, key=launch_key) if m in after[a])
            if m in cycle:
                cycle = cycle[cycle.index(m):][::-1]
                break
            cycle.append(m)
        raise FabricError("no global launch order: " + " before ".join(
            f"{m.kind} {m.src}->{m.dst} batch {m.batch} (time {m.time})" for m in [*cycle, cycle[0]]))
    return order
