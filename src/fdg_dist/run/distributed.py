"""Process-group set-up: timeouts, the pipeline and replica groups, on the backend and device ``devices`` picks.

Layout of a run with K modules and R replicas (world size K·R): global rank ``r·K + k`` holds module
k of replica r.  Module k of every replica forms one "replica group" that averages gradients.  Every
direction of every pipeline hop, for each kind of traffic, is a two-rank group of its own (a *link*):
under NCCL its own communicator and stream, so activations never queue behind gradients (``transport``).
That communicator is split eagerly from the default one at ``new_group`` (the device is bound at
``init_process_group``), in the same order on every rank, and is the only one the link uses: the transport
moves payloads with ``batch_isend_irecv``, which runs on it, and opens every link at start
(``Transport.open``), so no communicator or connection is created mid-run.

On an error the groups are *aborted*, not destroyed: destroying an NCCL group waits for its pending
kernels, which never finish when the peer they wait for is dead.

Must not know the schedule or the stage: it builds the groups the transport and the trainer use, and tears
them down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fdg_dist.engine.transport import Link
from fdg_dist.run import rendezvous
from fdg_dist.run.devices import check_device, choose_backend


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    module: int  # pipeline index k
    replica: int
    K: int
    R: int
    device: torch.device
    backend: str
    header_group: dist.ProcessGroup | None  # gloo group for message headers (None: the default group)
    replica_group: dist.ProcessGroup | None  # module k of all replicas (None when R == 1)
    control_group: dist.ProcessGroup  # gloo, every rank: the preemption vote, which runs beside P2P traffic
    links: dict[Link, dist.ProcessGroup]  # this rank's links (keyed by module indices within its replica)
    # the store the groups were built on, kept alive with them: torch keeps only the C++ part of a store
    # written in Python (rendezvous.SignedStore), whose methods then fail "Not implemented"
    store: dist.Store | None = None

    @property
    def pipeline_ranks(self) -> list[int]:
        """Global ranks of modules 0..K-1 of this rank's replica."""
        return [self.replica * self.K + k for k in range(self.K)]


def init(K: int, R: int = 1, *, backend: str = "auto", timeout_s: float = 300.0,
         precision: str = "fp32", ranks_per_gpu: int | None = None) -> Context:
    """Join the process group torchrun (or our elastic launch) described in the environment."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world != K * R:
        raise RuntimeError(f"world size {world} != pipeline.k {K} × pipeline.replicas {R}")
    backend = choose_backend(backend)
    device = check_device(backend, local_rank, precision, ranks_per_gpu=ranks_per_gpu,
                          local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # safe: the trainer autotunes every shape before the first tick
    timeout = timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}  # eager NCCL init (pytorch #136248)
    store = _store(timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)
    header_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    if backend == "nccl":
        # every rank takes part in the first NCCL call: batch_isend_irecv (``TorchWire``) requires it (its docs)
        dist.all_reduce(torch.zeros(1, device=device))
    replica_group = None
    if R > 1:
        for k in range(K):  # every rank must take part in creating every group
            g = dist.new_group([r * K + k for r in range(R)], timeout=timeout)
            if k == rank % K:
                replica_group = g
    control_group = dist.new_group(backend="gloo", timeout=timeout)
    links = _link_groups(rank, K, R, timeout)
    return Context(rank, world, local_rank, rank % K, rank // K, K, R, device, backend, header_group, replica_group,
                   control_group, links, store)


def _link_groups(rank: int, K: int, R: int, timeout: timedelta) -> dict[Link, dist.ProcessGroup]:
    """One two-rank group per direction of every hop of every replica; this rank keeps its own four (or fewer)."""
    mine: dict[Link, dist.ProcessGroup] = {}
    for r in range(R):
        for k in range(K - 1):
            for link in (Link("act", k, k + 1), Link("grad", k + 1, k)):
                group = dist.new_group([r * K + k, r * K + k + 1], timeout=timeout)  # collective: every rank calls it
                if rank in (r * K + k, r * K + k + 1):
                    mine[link] = group
    return mine


def _store(timeout: timedelta) -> dist.Store:
    """A store of this attempt's own, never torchrun's shared one (stale keys after a restart), listening on
    loopback on one machine, where gloo and NCCL listen too (``rendezvous.job_store``); returned once every
    rank reached it (``rendezvous.await_ranks``: one line naming the store if some cannot)."""
    rendezvous.pin_transports_to_loopback()
    store = rendezvous.job_store(timeout)
    rendezvous.await_ranks(store, int(os.environ["WORLD_SIZE"]), timeout)
    return store


def close() -> None:
    """Leave cleanly after a successful run: every operation has completed, so destroying cannot block."""
    if dist.is_initialized():
        dist.destroy_process_group()


def abort() -> None:
    """Leave after an error: abort every group instead of destroying it.

    With NCCL, destroying waits for pending kernels — a receive from a dead neighbour never finishes —
    so the rank would sit until the watchdog; aborting returns at once.
    """
    if dist.is_initialized():
        dist.distributed_c10d._abort_process_group()


def allreduce_mean(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Average tensors in place over ``group`` with one flat all-reduce (what DDP's buckets do)."""
    if not tensors:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for t, avg in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors), strict=True):
        t.copy_(avg)


def check_agreement(value: str, what: str, group: dist.ProcessGroup | None) -> None:
    """Fail at start, naming the ranks, if ranks disagree on ``value`` (e.g. a config hash or shapes).

    Ranks launched by hand (torchrun on several nodes) can get different overrides; P2P would then
    truncate or reinterpret buffers silently instead of failing.
    """
    values: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    if len(set(values)) > 1:
        ranks = [r for r, v in enumerate(values) if v != values[0]]
        raise RuntimeError(f"ranks {ranks} disagree with rank 0 on the {what}; launch every rank with the same "
                           "configuration overrides")
