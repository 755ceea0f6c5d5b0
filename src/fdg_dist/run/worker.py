"""One process = one pipeline module: init distributed → train → close, whatever happens.

No Hydra below this line: the worker receives the resolved configuration as a plain dict, so the
same entry serves torchrun (each process composed its own config) and our elastic launch (the parent
composed it once).

Must not import Hydra or compose a configuration, nor train itself (that is the trainer's).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from fdg_dist import models
from fdg_dist.config import Config
from fdg_dist.run import devices, distributed, rendezvous, warm
from fdg_dist.run.preempt import Stopped
from fdg_dist.run.trainer import Trainer
from fdg_dist.util import files

log = logging.getLogger("fdg_dist")


def setup_logging(run_dir: Path, module: int, replica: int, console: bool) -> None:
    """train.log gets every rank's lines, tagged; the console only the lines of the ranks that report."""
    tag = f"m{module}" + (f"r{replica}" if replica else "")
    fmt = logging.Formatter(f"%(asctime)s [{tag}] %(levelname)s %(message)s", "%H:%M:%S")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO)
    run_dir.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(run_dir / "train.log")
    file.setFormatter(fmt)
    log.addHandler(file)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    stream.setLevel(logging.INFO if console else logging.WARNING)
    stream.addFilter(lambda record: record.exc_info is None)  # tracebacks: train.log; the CLI prints one line
    log.addHandler(stream)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel (CPU tensors have no
    caching allocator): otherwise every step's activations are fresh pages, each one a page fault and a
    zeroing.  Measured on ResNet-20 at batch 128, one thread: 20,000 page faults per step and 8-13 % more CPU
    time per step without it, none with it.  Memory stays at its peak, as with the CUDA caching allocator.
    Returns whether it applied (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, -1)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX))


FAILURES = "FDG_FAILURE_DIR"  # set by fdg-train's launcher: where each rank reports its own first error


def report_path(folder: Path, attempt: int, rank: int) -> Path:
    return folder / f"attempt{attempt}-rank{rank}.json"


def report_failure(rank: int, error: BaseException) -> None:
    """Leave this rank's error where the launcher reads it (``FDG_FAILURE_DIR``), before the process groups are
    aborted: so it exists before any neighbour can notice this rank is gone.  torch's agent reports only the
    first process it sees exit, which may be a neighbour that lost this one."""
    folder = os.environ.get(FAILURES)
    if folder is None:
        return
    report = {"error": f"{type(error).__name__}: {error}", "time": time.time()}
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    files.atomic_write(json.dumps(report).encode(), report_path(Path(folder), attempt, rank))


_FLIGHT_RECORDER = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")  # torch reads the first one set


def no_flight_recorder() -> bool:
    """Turn off torch's flight recorder unless the user asked for it (either variable set): returns whether it did.

    It keeps the last 2000 collectives of every process group (torch 2.14.1; for debugging hangs), ~0.9 KB
    each, and the preemption vote is a collective every tick: those small blocks land in the heap between a
    step's activations, and with freed memory kept (``keep_freed_memory``) each one pins a hole, so resident
    memory crept up with the batches (ResNet-20, K = 3, one CIFAR-10 epoch: module 0 +14 %; flat without).
    Must run before the process groups are made."""
    if any(name in os.environ for name in _FLIGHT_RECORDER):
        return False
    os.environ[_FLIGHT_RECORDER[0]] = "0"
    return True


ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
CLEAN_UP_ONLY = "2"  # ProcessGroupNCCL's CleanUpOnly: abort the communicators on an error, never end the process


def nccl_errors_reach_us() -> None:
    """Make NCCL's watchdog abort a failed or timed-out communicator without ending the process.

    torch's elastic agent (our launcher and torchrun) sets ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` in every
    worker: on a dead neighbour the watchdog would tear the rank down with torch's message before our
    transport names the lost module.  With CleanUpOnly the abort reaches the waiting call as an error, which
    the transport turns into our one line (``lost module k …``), and a host wait stuck behind a dead peer's
    kernel is released at ``dist.timeout_s``.  Must run before the process groups are made."""
    os.environ[ERROR_HANDLING] = CLEAN_UP_ONLY


ABORT_GRACE_S = 10.0  # how long aborting the process groups may take before the process leaves without it


def leave_within(abort: Callable[[], None], grace_s: float) -> None:
    """Run ``abort``; if it has not returned within ``grace_s`` (an abort can hang on a wedged device), end the
    process with exit code 1: the error is already reported and logged, so nothing is lost."""
    timer = threading.Timer(grace_s, os._exit, args=(1,))
    timer.daemon = True
    timer.start()
    try:
        abort()
    finally:
        timer.cancel()


def run(raw: dict, run_dir: str, environment: Mapping[str, str | None] | None = None) -> dict | None:
    """Entry of every worker process; returns the run's result on the reporting rank.  ``environment``: what the
    launcher's environment has that a worker forked from the warm server lacks (``warm.environment_since``)."""
    warm.arrive(environment or {})
    cfg = Config.from_dict(raw)
    stages, replicas = (1, cfg.world_size) if cfg.method.name == "dp" else (cfg.pipeline.k, cfg.pipeline.replicas)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    module, replica = rank % stages, rank // stages
    setup_logging(Path(run_dir), module, replica, console=rank == 0 or (module == stages - 1 and replica == 0))
    threads = cfg.trainer.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    torch.set_num_threads(threads)
    keep_freed_memory()
    no_flight_recorder()
    nccl_errors_reach_us()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    sharing = devices.share_gpus(local_world, cfg.dist.ranks_per_gpu) if devices.choose_backend(
        cfg.dist.backend) == "nccl" else []  # before NCCL starts in this process
    ctx = distributed.init(stages, replicas, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s,
                           precision=cfg.trainer.precision, ranks_per_gpu=cfg.dist.ranks_per_gpu)
    log.info("rank %d/%d: module %d of %d, replica %d, %s on %s, %d thread(s), pid %d", rank, world, module, stages,
             replica, ctx.backend, ctx.device, threads, os.getpid())
    blocks = models.build_blocks(cfg.model, cfg.data.num_classes, device="meta")
    convolutions = any(isinstance(m, nn.modules.conv._ConvNd) for b in blocks for m in b.modules())
    for line in devices.resolve(cfg, ctx.device, convolutions=convolutions):
        if rank == 0:
            log.info("default: %s", line)
    for line in sharing:
        if rank == 0:
            log.info("GPUs shared: %s", line)
    finished = False
    try:
        rendezvous.check_shared_run_dir(Path(run_dir), rank, ctx.header_group)
        trainer = Trainer(cfg, ctx, Path(run_dir))
        trainer.preemption.install()  # from here on SIGTERM/SIGINT stop the run at a checkpoint
        result = trainer.fit()
        finished = True
        return result
    except Stopped as e:
        finished = True  # every rank stopped at the same point and nothing is in flight: leave cleanly
        log.warning("rank %d (module %d): %s", rank, module, e)
        raise
    except Exception as e:
        report_failure(rank, e)
        log.error("rank %d (module %d) failed: %s: %s", rank, module, type(e).__name__, e, exc_info=True)
        raise
    finally:
        # after an error, operations may still wait for a dead peer: abort, never destroy (which would wait)
        distributed.close() if finished else leave_within(distributed.abort, ABORT_GRACE_S)
