"""What runs inside one benchmark variant: the single-process loop and the per-rank entry points.

Kept apart from ``throughput.py`` so the elastic agent's spawned ranks import only this module (and
``fdg_dist``), never the orchestrator.  Every function here times whole epochs of the same synthetic,
augmented batches (``fdg_dist.data.Batches``) that the engine's module 0 reads, so data cost is equal,
and marks the start of every batch, so the steady state (the middle half of an epoch's batches, see
``steady_range``) is reported apart from the whole epoch (which includes our engine's fill and drain).

On ``spec["device"] == "cuda"`` every process computes on ``cuda:LOCAL_RANK`` (the single process on
``cuda:0``), bf16 runs under ``torch.autocast``, times come from CUDA events on the compute stream
(each epoch bracketed by ``torch.cuda.synchronize()``) and memory is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fdg_dist import data, models
from fdg_dist.config import DataConfig, OptimConfig
from fdg_dist.engine.optim import build_optimizer
from fdg_dist.run import worker
from fdg_dist.split import partition

Spec = dict[str, Any]


def steady_range(n: int) -> tuple[int, int]:
    """Batches [lo, hi) of an n-batch epoch that count as steady state: the middle half, far from the start
    (allocator warm-up, our pipeline's fill) and the end (our pipeline's drain)."""
    return n // 4, n - n // 4


def device_of(spec: Spec) -> torch.device:
    """Where this process computes: ``cuda:LOCAL_RANK`` on ``--device cuda`` (0 outside a launch), else the CPU."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if spec["device"] == "cuda" else torch.device("cpu")


def autocast(spec: Spec, device: torch.device) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if spec["precision"] == "bf16" else nullcontext()


def peak_mem_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, else the peak resident set (ru_maxrss: KiB on Linux,
    bytes on macOS; includes the ~0.6 GB of the torch libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class Marks:
    """Times of the batch boundaries of one epoch: host time on the CPU, CUDA events on a GPU (no host sync
    inside the epoch; ``rates`` synchronises once at its end)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
        self.marks: list[Any] = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Each mark's time since the first."""
        if not self.cuda:
            return [t - self.marks[0] for t in self.marks]
        torch.cuda.synchronize()
        return [self.marks[0].elapsed_time(e) / 1e3 for e in self.marks]


def rates(times: list[float], sizes: list[int]) -> tuple[float, float]:
    """(whole-epoch, steady-state) samples/s from the start times of an epoch's batches and its end."""
    lo, hi = steady_range(len(sizes))
    return sum(sizes) / (times[-1] - times[0]), sum(sizes[lo:hi]) / (times[hi] - times[lo])


def data_config(spec: Spec) -> DataConfig:
    return DataConfig(name="synthetic", num_classes=spec["num_classes"], image_size=spec["image_size"],
                      train_size=spec["train_size"], test_size=spec["batch_size"])


def train_batches(spec: Spec, device: torch.device) -> data.Batches:
    train_set, _ = data.load(data_config(spec), spec["seed"])
    return data.Batches(train_set, spec["batch_size"], train=True, augment=True, seed=spec["seed"], device=device)


def launch(entry: Callable[..., Any], nprocs: int, *args: Any) -> list[Any]:
    """Run ``entry(*args)`` on ``nprocs`` local ranks with torch's elastic agent; return values by rank.

    A fresh rendezvous (and so a fresh process group) per call; same settings as ``fdg_dist.cli.launch_local``.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0,
                          monitor_interval=0.2, start_method="spawn")
    results = elastic_launch(config, entry)(*args)
    return [results[r] for r in range(nprocs)]


# ------------------------------------------------------------------------------------ single process
def single_process(spec: Spec) -> Spec:
    """Plain back-propagation of the unsplit model in this process: ``spec["threads"]`` threads on the CPU,
    or one GPU."""
    device = device_of(spec)
    torch.set_num_threads(spec["threads"])
    worker.keep_freed_memory()  # as our engine's workers do: equal conditions
    torch.manual_seed(spec["seed"])
    fmt = models.memory_format(spec["channels_last"])
    model = models.build(spec["model"], spec["num_classes"]).to(device, memory_format=fmt)
    optimizer = build_optimizer(OptimConfig(), model.parameters())
    batches, amp = train_batches(spec, device), autocast(spec, device)
    sizes = data.batch_sizes(spec["train_size"], spec["batch_size"])
    windows = []
    for epoch in range(spec["epochs"]):
        marks = Marks(device)
        for x, y in batches.epoch(epoch):
            optimizer.zero_grad(set_to_none=True)
            with amp:
                loss = F.cross_entropy(model(models.to_layout(x, fmt)), y)
            loss.backward()
            optimizer.step()
            marks.mark()
        windows.append(rates(marks.seconds(), sizes))
    timed = windows[spec["warmup"]:]
    return {"windows": [w for w, _ in timed], "steady": [s for _, s in timed], "peak_mem_mb": [peak_mem_mb(device)],
            "busy": None}


# ------------------------------------------------------------------------------------ our engine
def engine_rank(raw: dict, run_dir: str) -> Spec:
    """One rank of our engine (``fdg_dist.run.worker.run``), reporting its peak memory afterwards."""
    worker.run(raw, run_dir)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if raw["dist"]["backend"] == "nccl" else torch.device("cpu")
    return {"rank": int(os.environ["RANK"]), "peak_mem_mb": peak_mem_mb(device)}


def engine_steady(run_dir: Path, rank: int, epochs: range, n: int) -> tuple[list[float], list[float]]:
    """Per timed epoch, from rank's trace: the seconds from the start of its forward of batch lo to that of batch
    hi (``steady_range``), and the fraction of them it spent in forward/backward/step.

    Each rank is judged on its own clock over its own ticks lo..hi (trace origins differ between processes).
    """
    spans = [s for s in json.loads((run_dir / "trace" / f"rank{rank}.json").read_text())["traceEvents"]
             if s.get("ph") == "X" and s["args"]["phase"] == "train"]
    lo, hi = steady_range(n)
    seconds, busy = [], []
    for epoch in epochs:
        mine = [s for s in spans if s["args"]["epoch"] == epoch]
        starts = {s["args"]["batch"]: s["ts"] for s in mine if s["cat"] == "forward"}
        a, b = starts[lo], starts[hi]
        compute = sum(min(s["ts"] + s["dur"], b) - max(s["ts"], a) for s in mine
                      if s["cat"] in ("forward", "backward", "step") and s["ts"] < b and s["ts"] + s["dur"] > a)
        seconds.append((b - a) / 1e6)
        busy.append(compute / (b - a))
    return seconds, busy


# ------------------------------------------------------------------------------------ torch pipelining
class _Boundary(nn.Module):
    """Puts a 4-D activation in one memory layout and dtype (its backward returns the gradient in the input's)."""

    def __init__(self, fmt: torch.memory_format, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.fmt, self.dtype = fmt, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = models.to_layout(x, self.fmt)
        return x if self.dtype is None else x.to(self.dtype)


def pipelining_rank(spec: Spec) -> Spec:
    """One stage of ``torch.distributed.pipelining`` (GPipe or 1F1B) over our split of the model.

    Stage 0 reads the batches; the last stage computes the cross-entropy and takes its labels straight
    from the data set in the epoch's order (no extra message); every stage steps SGD once per batch.
    On a GPU: NCCL with ``device_id`` (eager communicators), bf16 activations on the wire under bf16.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    torch.set_num_threads(1)
    worker.keep_freed_memory()  # as our engine's workers do: equal conditions
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = device_of(spec)
    timeout = timedelta(seconds=spec["timeout_s"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    try:
        torch.manual_seed(spec["seed"])
        blocks = models.build_blocks(spec["model"], spec["num_classes"])
        sample = (1, 3, spec["image_size"], spec["image_size"])
        bounds = spec["bounds"]
        # like our engine: compute in the configured layout, send contiguous tensors (gloo requires it), in bf16
        # under bf16 (the receive buffers are allocated from the static shapes and dtypes below)
        fmt = models.memory_format(spec["channels_last"])
        wire = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
        module = nn.Sequential(_Boundary(fmt), *blocks[bounds[rank]:bounds[rank + 1]],
                               _Boundary(torch.contiguous_format, wire)).to(device, memory_format=fmt)
        # static shapes: the stages then exchange no metadata at all
        micro = spec["batch_size"] // spec["micro_batches"]
        shapes = partition.boundary_shapes(blocks, sample)
        example_in = torch.empty(micro, *shapes[bounds[rank]][1:], device=device,
                                 dtype=wire if rank > 0 else torch.float32)
        example_out = torch.empty(micro, *shapes[bounds[rank + 1]][1:], device=device, dtype=wire)
        example_in.requires_grad_(rank > 0)  # else no gradient is sent back and stage 0 never trains
        example_out.requires_grad_(True)
        stage = PipelineStage(module, rank, world, device, input_args=example_in, output_args=example_out)
        schedule_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[spec["schedule"]]
        last = rank == world - 1
        # every stage needs the loss_fn: without one a schedule runs forward only on that stage, so stage 0
        # would post no gradient receives and the last stage's gradient sends would wait forever
        schedule = schedule_cls(stage, spec["micro_batches"], loss_fn=nn.CrossEntropyLoss())
        optimizer = build_optimizer(OptimConfig(), module.parameters())
        bs = spec["batch_size"]
        batches = train_batches(spec, device) if rank == 0 or last else None
        amp = autocast(spec, device)  # per thread: the schedule runs every stage's forward and backward in this one
        sizes = data.batch_sizes(spec["train_size"], bs)
        initial = [p.detach().clone() for p in module.parameters()]
        windows, steady, cpu = [], [], []
        for epoch in range(spec["epochs"]):
            inputs = batches.epoch(epoch) if rank == 0 else None
            order = batches.order(epoch) if last else None
            labels = batches.data.labels.to(device) if last else None
            dist.barrier()
            marks, cpu_tic = Marks(device), time.process_time()
            for b, n in enumerate(sizes):
                optimizer.zero_grad(set_to_none=True)
                with amp:
                    if rank == 0:
                        schedule.step(next(inputs)[0])
                    elif last:
                        schedule.step(target=labels[order[b * bs:b * bs + n].to(device)], return_outputs=False)
                    else:
                        schedule.step()
                optimizer.step()
                marks.mark()
            times = marks.seconds()
            windows.append(times[-1])
            lo, hi = steady_range(len(sizes))
            steady.append(times[hi] - times[lo])
            cpu.append(time.process_time() - cpu_tic)
        if all(torch.equal(a, b) for a, b in zip(initial, module.parameters(), strict=True)):
            raise RuntimeError(f"stage {rank} of {spec['schedule']} did not train: its weights never changed")
        first = spec["warmup"]
        busy = None if device.type == "cuda" else sum(cpu[first:]) / sum(windows[first:])  # CPU time means nothing on a GPU
        return {"rank": rank, "window_s": windows[first:], "steady_s": steady[first:], "busy": busy,
                "peak_mem_mb": peak_mem_mb(device), "bounds": bounds}
    finally:
        dist.destroy_process_group()
