"""Moving tensors between neighbouring ranks: P2P with a checked header, and nothing else.

Every message is (header, payload…).  The header is a small int64 CPU tensor sent over a gloo group
(the main group on CPU, a side group under NCCL) so it can be checked on the host without a GPU sync;
the payload goes over the main group (NCCL keeps it on the GPU).  gloo and NCCL check nothing — a
wrong size truncates, a wrong dtype is reinterpreted, a mis-routed batch is silently trained on — so
the receiver verifies kind, phase, epoch, batch, dtype and shape and raises naming the field.

One ``exchange`` call posts all operations of one schedule time as one group; the schedule makes both
ends of every pair issue them in the same order, which is what NCCL needs to be deadlock-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

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

    def check(self, header: torch.Tensor, peer: int) -> None:
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

    def _mismatch(self, field: str, want: object, got: object, peer: int) -> str:
        if field == "kind":
            want, got = _KINDS[want], _KINDS[got] if 0 <= got < len(_KINDS) else got
        if field == "dtype":
            want, got = _DTYPES[want], _DTYPES[got] if 0 <= got < len(_DTYPES) else got
        return (f"message from rank {peer} ({self.kind}, {'train' if self.phase == 0 else 'eval'} epoch "
                f"{self.epoch}, batch {self.batch}): header field '{field}' expected {want}, got {got}")


@dataclass
class _Pending:
    envelopes: list[Envelope]
    header_work: list[dist.Work]
    headers: list[torch.Tensor]
    payload_work: list[dist.Work]  # filled once the group is posted
    payloads: list[torch.Tensor]
    peer: int


class Transport:
    """Point-to-point channels of one rank to its pipeline neighbours.

    ``ranks[k]`` is the global rank holding module k of this rank's pipeline replica.
    """

    def __init__(self, ranks: list[int], device: torch.device, *, group: dist.ProcessGroup | None = None,
                 header_group: dist.ProcessGroup | None = None, timeout_s: float = 300.0) -> None:
        self.ranks = ranks
        self.device = device
        self.group = group
        self.header_group = header_group
        self.backend = dist.get_backend(group)
        # gloo moves CPU tensors only; NCCL moves tensors of the compute device.
        self.comm_device = device if self.backend == "nccl" else torch.device("cpu")
        self.timeout_s = timeout_s
        self._inbox: dict[tuple[str, int], _Pending] = {}
        self._in_flight: list[tuple[list[dist.Work], torch.Tensor]] = []  # isend tensors stay alive until done

    def exchange(self, sends: list[tuple[int, list[Envelope], list[torch.Tensor]]],
                 recvs: list[tuple[int, list[Envelope]]]) -> None:
        """Post one schedule time's sends (module, envelopes, tensors) and receives (module, envelopes).

        Both lists must be in the canonical order the schedule gives, identical on both ends.
        """
        ops: list[dist.P2POp] = []
        keep: list[torch.Tensor] = []
        for module, envelopes, tensors in sends:
            peer = self.ranks[module]
            for env, tensor in zip(envelopes, tensors, strict=True):
                header = env.encode()
                payload = tensor.detach().to(self.comm_device).contiguous()
                self._in_flight.append(([dist.isend(header, peer, group=self.header_group, tag=_tag(env, 1))], header))
                ops.append(dist.P2POp(dist.isend, payload, peer, self.group, _tag(env, 0)))
                keep.append(payload)
        pendings: list[_Pending] = []
        for module, envelopes in recvs:
            pending = _Pending(envelopes, [], [], [], [], self.ranks[module])
            for env in envelopes:
                header = torch.empty(HEADER_LEN, dtype=torch.int64)
                pending.header_work.append(dist.irecv(header, pending.peer, group=self.header_group, tag=_tag(env, 1)))
                pending.headers.append(header)
                buf = torch.empty(env.shape, dtype=env.dtype, device=self.comm_device)
                ops.append(dist.P2POp(dist.irecv, buf, pending.peer, self.group, _tag(env, 0)))
                pending.payloads.append(buf)
            self._inbox[(envelopes[0].kind, envelopes[0].batch)] = pending
            pendings.append(pending)
        per_op = self._post(ops)
        self._in_flight += list(zip(per_op[:len(keep)], keep))
        recv_works = iter(per_op[len(keep):])
        for pending in pendings:
            pending.payload_work = [w for _ in pending.envelopes for w in next(recv_works)]

    def _post(self, ops: list[dist.P2POp]) -> list[list[dist.Work]]:
        """Post ops as one group; returns, per op, the works to wait for before its tensor is safe."""
        if not ops:
            return []
        if self.backend == "nccl":
            works = dist.batch_isend_irecv(ops)  # NCCL coalesces: one work may stand for the whole group
            return [[w] for w in works] if len(works) == len(ops) else [works] * len(ops)
        # gloo: plain ops, matched per (peer, tag); gloo's batch_isend_irecv has been reported to hang.
        return [[op.op(op.tensor, op.peer, op.group, op.tag)] for op in ops]

    def take(self, kind: str, batch: int) -> list[torch.Tensor]:
        """Wait for the message (kind, batch), verify its headers and return its tensors on the device."""
        try:
            pending = self._inbox.pop((kind, batch))
        except KeyError:
            raise TransportError(f"no receive was posted for {kind} of batch {batch}: schedule bug") from None
        try:
            for env, work, header in zip(pending.envelopes, pending.header_work, pending.headers, strict=True):
                work.wait()
                env.check(header, pending.peer)
            for work in pending.payload_work:
                work.wait()
        except RuntimeError as e:  # gloo: closed socket (peer died) or timeout (peer hung)
            if isinstance(e, TransportError):
                raise
            module = self.ranks.index(pending.peer)
            raise TransportError(f"lost module {module} (rank {pending.peer}) while waiting for {kind} of batch "
                                 f"{batch}: {e}") from e
        return [t.to(self.device, non_blocking=True) for t in pending.payloads]

    def drain(self) -> None:
        """Wait for every outstanding send; call before a checkpoint or shutdown."""
        for works, _ in self._in_flight:
            for work in works:
                work.wait()
        self._in_flight.clear()
        if self._inbox:
            raise TransportError(f"messages received but never used: {sorted(self._inbox)}")

    def reap(self) -> None:
        """Drop finished sends so their buffers can be freed (cheap; called once per tick)."""
        self._in_flight = [(ws, t) for ws, t in self._in_flight if not all(w.is_completed() for w in ws)]


def _tag(env: Envelope, header: int) -> int:
    """gloo matches by (peer, tag): separate channels per kind and header/payload. NCCL ignores tags."""
    return 2 * _KINDS.index(env.kind) + header
