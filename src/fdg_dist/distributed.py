"""Process-group set-up: backend and device choice, timeouts, the pipeline and replica groups.

Layout of a run with K modules and R replicas (world size K·R): global rank ``r·K + k`` holds module
k of replica r.  Module k of every replica forms one "replica group" that averages gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fdg_dist import rendezvous


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

    @property
    def pipeline_ranks(self) -> list[int]:
        """Global ranks of modules 0..K-1 of this rank's replica."""
        return [self.replica * self.K + k for k in range(self.K)]


def choose_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(K: int, R: int = 1, *, backend: str = "auto", timeout_s: float = 300.0) -> Context:
    """Join the process group torchrun (or our elastic launch) described in the environment."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world != K * R:
        raise RuntimeError(f"world size {world} != pipeline.k {K} × pipeline.replicas {R}")
    backend = choose_backend(backend)
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}  # eager NCCL init (pytorch #136248)
    dist.init_process_group(backend, store=_store(timeout), rank=rank, world_size=world, timeout=timeout, **kwargs)
    header_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    if backend == "nccl":
        # every rank takes part in the first NCCL call: batch_isend_irecv requires it (its docs)
        dist.all_reduce(torch.zeros(1, device=device))
    replica_group = None
    if R > 1:
        for k in range(K):  # every rank must take part in creating every group
            g = dist.new_group([r * K + k for r in range(R)], timeout=timeout)
            if k == rank % K:
                replica_group = g
    return Context(rank, world, local_rank, rank % K, rank // K, K, R, device, backend, header_group, replica_group)


def _store(timeout: timedelta) -> dist.Store:
    """A store of this attempt's own, never torchrun's shared one (stale keys after a restart), listening on
    loopback on one machine, where gloo and NCCL listen too (``rendezvous.job_store``)."""
    rendezvous.pin_transports_to_loopback()
    return rendezvous.job_store(timeout)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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
