"""Moving tensors between neighbouring ranks: P2P with a checked header, and nothing else.

Every message is (header, payload…).  The header is a small int64 CPU tensor sent over a gloo group
so it is checked on the host without touching the device; the payload goes over its *link*: one
direction of one pipeline hop for one kind of traffic (activations with their labels, or gradients).
Each link is a process group of its own, so under NCCL it is a communicator with its own stream: a
forward's input never queues behind a gradient, nor behind this rank's own send to its other
neighbour, and every link carries traffic one way only, so no two ranks can both be sending first to
each other (the NCCL deadlock).  gloo and NCCL check nothing — a wrong size truncates, a wrong dtype
is reinterpreted, a mis-routed batch is silently trained on — so the receiver verifies kind, phase,
epoch, batch, dtype and shape and raises naming the field.

The ``Wire`` protocol is the only thing the transport needs from torch.distributed; ``fabric`` gives
an in-process implementation with NCCL's rules for tests.

Must not know the schedule or the stage: it moves and checks what the executor hands it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

SEND_WINDOW = 3
HEADER_LEN = 16
MAGIC = 0x46_44_47  # "FDG"
_KINDS = ("act", "grad", "labels")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.float64)
_HEADER_FIELDS = ("magic", "kind", "phase", "epoch", "batch", "dtype", "ndim")
MAX_NDIM = HEADER_LEN - len(_HEADER_FIELDS)


class TransportError(RuntimeError):
    """A message that is not the one the schedule expects: a bug, or ranks with different configs."""


@dataclass(frozen=True)
class Envelope:
    """What a message claims to be; sender and receiver build it independently and must agree."""

    kind: str
    phase: int  # 0 train, 1 eval
    epoch: int
    batch: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def encode(self) -> torch.Tensor:
        if len(self.shape) > MAX_NDIM:
            raise TransportError(f"tensors of more than {MAX_NDIM} dimensions cannot cross a module boundary")
        values = [MAGIC, _KINDS.index(self.kind), self.phase, self.epoch, self.batch,
                  _DTYPES.index(self.dtype), len(self.shape), *self.shape]
        return torch.tensor(values + [0] * (HEADER_LEN - len(values)), dtype=torch.int64)

    def check(self, header: torch.Tensor, peer: str) -> None:
        """Raise naming the first field where the received header disagrees with this expectation."""
        got = header.tolist()
        want = self.encode().tolist()
        for i, name in enumerate(_HEADER_FIELDS):
            if got[i] != want[i]:
                raise TransportError(self._mismatch(name, want[i], got[i], peer))
        ndim = got[_HEADER_FIELDS.index("ndim")]
        got_shape = tuple(got[len(_HEADER_FIELDS):len(_HEADER_FIELDS) + ndim])
        if got_shape != self.shape:
            raise TransportError(self._mismatch("shape", self.shape, got_shape, peer))

    def _mismatch(self, field: str, want: object, got: object, peer: str) -> str:
        if field == "kind":
            want, got = _KINDS[want], _KINDS[got] if 0 <= got < len(_KINDS) else got
        if field == "dtype":
            want, got = _DTYPES[want], _DTYPES[got] if 0 <= got < len(_DTYPES) else got
        return (f"message from {peer} ({self.kind}, {'train' if self.phase == 0 else 'eval'} epoch "
                f"{self.epoch}, batch {self.batch}): header field '{field}' expected {want}, got {got}")


@dataclass(frozen=True)
class Link:
    """One direction of one pipeline hop for one kind of traffic: ``act`` (activations and their labels,
    module src → src+1) or ``grad`` (gradients, module src → src-1)."""

    kind: str
    src: int
    dst: int

    @staticmethod
    def of(kind: str, src: int, dst: int) -> Link:
        return Link("grad" if kind == "grad" else "act", src, dst)


class Work(Protocol):
    def wait(self) -> object: ...


class Wire(Protocol):
    """Point-to-point operations of one rank: payloads over links, headers over a gloo-like channel.

    ``device`` is where payloads must live (the compute device under NCCL, the CPU under gloo).
    """

    device: torch.device
    ordered: bool  # operations on different links must follow one global order (NCCL: ``schedule.program``)

    def send(self, tensor: torch.Tensor, link: Link) -> Work: ...

    def recv(self, tensor: torch.Tensor, link: Link) -> Work: ...

    def send_header(self, tensor: torch.Tensor, link: Link, tag: int) -> Work: ...

    def recv_header(self, tensor: torch.Tensor, link: Link, tag: int) -> Work: ...

    def describe(self, module: int) -> str: ...

    def open(self, link: Link) -> None:
        """Make ``link`` ready, at start (both of its ranks take part): its first use must not be mid-run."""
        ...


def links_in_order(K: int) -> list[Link]:
    """Every link of a K-module pipeline in the one order all ranks open them in (hop by hop, act then grad):
    each rank opens a subsequence of it, so no two ranks wait for each other in opposite orders."""
    return [link for k in range(K - 1) for link in (Link("act", k, k + 1), Link("grad", k + 1, k))]


class TorchWire:
    """The real wire: torch.distributed isend/irecv, one process group per link (see ``distributed``)."""

    def __init__(self, ranks: list[int], links: dict[Link, dist.ProcessGroup], header_group: dist.ProcessGroup | None,
                 device: torch.device, backend: str) -> None:
        self.ranks = ranks  # global rank of module k of this replica
        self.links = links
        self.header_group = header_group  # gloo; None: the default group (itself gloo)
        # gloo moves CPU tensors only; NCCL moves tensors of the compute device.
        self.device = device if backend == "nccl" else torch.device("cpu")
        # a GPU may run the kernels of several communicators one at a time; gloo's links progress independently
        self.ordered = backend == "nccl"

    def send(self, tensor: torch.Tensor, link: Link) -> Work:
        return self._p2p(dist.isend, tensor, link.dst, link)

    def recv(self, tensor: torch.Tensor, link: Link) -> Work:
        return self._p2p(dist.irecv, tensor, link.src, link)

    def _p2p(self, op: Callable[..., Work | None], tensor: torch.Tensor, module: int, link: Link) -> Work:
        """One operation as a batch of one: under NCCL ``batch_isend_irecv`` runs on the link group's own
        communicator, split eagerly at ``new_group`` (``distributed.init`` binds the device), where a plain
        ``isend``/``irecv`` would create a second, two-rank communicator lazily at the link's first message
        (pytorch #129140, #160342), blocking the host in NCCL's init until the peer arrives."""
        (work,) = dist.batch_isend_irecv([dist.P2POp(op, tensor, self.ranks[module], self.links[link])])
        return work

    def open(self, link: Link) -> None:
        """A one-element message over the link and back to the host: NCCL connects a pair's channels at its
        first operation, so that happens here, at start, in ``links_in_order`` on every rank."""
        probe = torch.zeros(1, device=self.device)
        (self.send if link.src == self.ranks.index(dist.get_rank()) else self.recv)(probe, link).wait()
        if probe.device.type == "cuda":
            torch.cuda.current_stream(probe.device).synchronize()

    def send_header(self, tensor: torch.Tensor, link: Link, tag: int) -> Work:
        return dist.isend(tensor, self.ranks[link.dst], group=self.header_group, tag=tag)

    def recv_header(self, tensor: torch.Tensor, link: Link, tag: int) -> Work:
        return dist.irecv(tensor, self.ranks[link.src], group=self.header_group, tag=tag)

    def describe(self, module: int) -> str:
        return f"module {module} (rank {self.ranks[module]})"


def to_wire(tensor: torch.Tensor, fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``tensor``'s bytes in the layout the receiver expects for format ``fmt``, as a contiguous tensor: an
    NHWC (channels_last) batch goes out as the (N, H, W, C) tensor it already is in memory, so crossing a
    boundary costs no layout copy (one, if a tensor arrives in the other layout)."""
    t = tensor.detach()
    if t.dim() == 4 and fmt == torch.channels_last:
        return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    return t.contiguous()


def wire_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                fmt: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer to receive into, the logical tensor it becomes): the inverse of ``to_wire`` for format ``fmt``."""
    if len(shape) == 4 and fmt == torch.channels_last:
        n, c, h, w = shape
        buf = torch.empty((n, h, w, c), dtype=dtype, device=device)
        return buf, buf.permute(0, 3, 1, 2)
    buf = torch.empty(shape, dtype=dtype, device=device)
    return buf, buf


class _Done:
    """The work of a message that arrived before this process started (restored from a checkpoint)."""

    def wait(self) -> bool:
        return True


_DONE = _Done()


@dataclass
class _Outgoing:
    """One message's sends (its headers and payloads): the tensors stay alive until they were waited for."""

    peer: int  # module
    sends: list[tuple[Work, torch.Tensor]] = field(default_factory=list)


@dataclass
class _Incoming:
    envelopes: list[Envelope]
    peer: int  # module
    headers: list[tuple[Work, torch.Tensor]] = field(default_factory=list)
    payloads: list[tuple[Work, torch.Tensor]] = field(default_factory=list)  # (work, logical tensor)


class Transport:
    """Messages of one rank to and from its pipeline neighbours, verified on arrival.

    ``memory_format`` is the layout stages compute in; 4-D payloads cross the wire in it (every rank of a
    run uses the same one, which the configuration check at start guarantees).

    A sent tensor must stay alive and unchanged until its send is done, and a send is known to be done only
    by waiting for it: gloo's ``is_completed()`` stays False until ``wait()`` (SPEC §5), so polling it kept
    every payload of an epoch alive until the drain, memory growing with the epoch's length.  Instead, after
    posting a schedule time's messages, a rank waits for the sends that are more than ``window`` messages old
    on their link, so each link holds at most ``window`` messages (``window`` + 1 while posting).  Waiting for
    a send waits until the neighbour has posted its receive; the neighbour posts receives ahead of its own
    progress in the same ``schedule.program`` order, and ``fabric.replay`` proves every schedule free of
    deadlock under this rule.  In a healthy FDG pipeline a message ``SEND_WINDOW`` = 3 times old is already
    delivered (the neighbour's answer that this rank took since proves it), so the wait returns at once; it
    only holds back a rank that runs ahead of a slower neighbour (evaluation has no answer to wait for).  Under
    NCCL ``wait()`` only orders the compute stream after the send, with no host block.
    """

    def __init__(self, wire: Wire, module: int, device: torch.device, *,
                 memory_format: torch.memory_format = torch.contiguous_format, window: int = SEND_WINDOW) -> None:
        self.wire = wire
        self.module = module
        self.device = device
        self.memory_format = memory_format
        self.window = window
        self._inbox: dict[tuple[str, int], _Incoming] = {}
        self._sent: dict[Link, deque[_Outgoing]] = {}  # per link, oldest first: not yet waited for

    def open(self, K: int) -> None:
        """Open this rank's links of a K-module pipeline, in the order every rank opens them (``links_in_order``)."""
        for link in links_in_order(K):
            if self.module in (link.src, link.dst):
                with self._lost(link.dst if link.src == self.module else link.src, f"its link {link.kind} to open"):
                    self.wire.open(link)

    @property
    def ordered(self) -> bool:
        """Whether this rank must issue its operations in the global launch order (``schedule.program``)."""
        return self.wire.ordered

    def post(self, sends: list[tuple[int, list[Envelope], list[torch.Tensor]]],
             recvs: list[tuple[int, list[Envelope]]]) -> None:
        """Post one schedule time's sends (to module, envelopes, tensors) and receives (from module, envelopes).

        Every link is a FIFO: both ends post its messages in the order the schedule gives.  Then the sends
        more than ``window`` messages old on their link are waited for and let go (see the class).
        """
        for peer, envelopes, tensors in sends:
            message = _Outgoing(peer)
            for env, tensor in zip(envelopes, tensors, strict=True):
                link = Link.of(env.kind, self.module, peer)
                header = env.encode()
                message.sends.append((self.wire.send_header(header, link, _tag(env)), header))
                payload = to_wire(tensor, self.memory_format).to(self.wire.device)
                message.sends.append((self.wire.send(payload, link), payload))
            self._sent.setdefault(Link.of(envelopes[0].kind, self.module, peer), deque()).append(message)
        for peer, envelopes in recvs:
            incoming = _Incoming(envelopes, peer)
            for env in envelopes:
                link = Link.of(env.kind, peer, self.module)
                header = torch.empty(HEADER_LEN, dtype=torch.int64)
                incoming.headers.append((self.wire.recv_header(header, link, _tag(env)), header))
                buf, logical = wire_buffer(env.shape, env.dtype, self.wire.device, self.memory_format)
                incoming.payloads.append((self.wire.recv(buf, link), logical))
            self._inbox[(envelopes[0].kind, envelopes[0].batch)] = incoming
        self._release(self.window)

    def take(self, kind: str, batch: int) -> list[torch.Tensor]:
        """Wait for the message (kind, batch), verify its headers and return its tensors on the device.

        The header wait is on the host (gloo); under NCCL the payload wait only orders the compute
        stream after the receive, so the host does not wait for the device.
        """
        try:
            incoming = self._inbox.pop((kind, batch))
        except KeyError:
            raise TransportError(f"no receive was posted for {kind} of batch {batch}: schedule bug") from None
        peer = self.wire.describe(incoming.peer)
        with self._lost(incoming.peer, f"{kind} of batch {batch}"):
            for env, (work, header) in zip(incoming.envelopes, incoming.headers, strict=True):
                work.wait()
                env.check(header, peer)
            for work, _ in incoming.payloads:
                work.wait()
        return [t.to(self.device, non_blocking=True) for _, t in incoming.payloads]

    def settle(self) -> dict[tuple[str, int], list[torch.Tensor]]:
        """Receive every posted message now and hand them over: at a consistent cut through the schedule
        (a mid-epoch checkpoint) they are the messages in flight."""
        return {key: self.take(*key) for key in sorted(self._inbox)}

    def deliver(self, messages: dict[tuple[str, int], list[torch.Tensor]]) -> None:
        """Put messages ``settle`` returned back as received, for the run that resumes from the cut."""
        for key, tensors in messages.items():
            self._inbox[key] = _Incoming([], -1, payloads=[(_DONE, t) for t in tensors])

    def drain(self) -> None:
        """Wait for every outstanding send; call before a checkpoint or shutdown."""
        self._release(0)
        if self._inbox:
            raise TransportError(f"messages received but never used: {sorted(self._inbox)}")

    def in_flight(self) -> dict[Link, int]:
        """Messages per link not yet waited for (at most ``window`` between two postings)."""
        return {link: len(queue) for link, queue in self._sent.items() if queue}

    def _release(self, keep: int) -> None:
        """Wait for the oldest sends of every link until at most ``keep`` messages remain on it, and drop them."""
        for queue in self._sent.values():
            while len(queue) > keep:
                message = queue.popleft()
                with self._lost(message.peer, "a send to complete"):
                    for work, _ in message.sends:
                        work.wait()

    @contextmanager
    def _lost(self, peer: int, waiting_for: str) -> Iterator[None]:
        """Turn a communication failure (closed socket: the peer died; timeout: it hangs) into one line
        naming the lost module; our own TransportErrors pass through."""
        try:
            yield
        except TransportError:
            raise
        except RuntimeError as e:
            raise TransportError(f"lost {self.wire.describe(peer)} while waiting for {waiting_for}: {e}") from e


def _tag(env: Envelope) -> int:
    """gloo matches headers by (peer, tag): one channel per kind (labels share the act link's payload FIFO)."""
    return _KINDS.index(env.kind)
