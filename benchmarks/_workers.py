"""What runs inside one benchmark variant: the single-process loop and the per-rank entry points.

Kept apart from ``throughput.py`` so the elastic agent's spawned ranks import only this module (and
``fdg_dist``), never the orchestrator.  Every function here times whole epochs of the same synthetic,
augmented batches (``fdg_dist.data.Batches``) that the engine's module 0 reads, so data cost is equal.
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
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fdg_dist import data, models, partition, worker
from fdg_dist.config import DataConfig, OptimConfig
from fdg_dist.optim import build_optimizer

Spec = dict[str, Any]


def peak_rss_mb() -> float:
    """This process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def data_config(spec: Spec) -> DataConfig:
    return DataConfig(name="synthetic", num_classes=spec["num_classes"], image_size=spec["image_size"],
                      train_size=spec["train_size"], test_size=spec["batch_size"])


def train_batches(spec: Spec) -> data.Batches:
    train_set, _ = data.load(data_config(spec), spec["seed"])
    return data.Batches(train_set, spec["batch_size"], train=True, augment=True, seed=spec["seed"])


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
    """Plain back-propagation of the unsplit model in this process with ``spec["threads"]`` threads."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    fmt = models.memory_format(spec["channels_last"])
    model = models.build(spec["model"], spec["num_classes"]).to(memory_format=fmt)
    optimizer = build_optimizer(OptimConfig(), model.parameters())
    batches = train_batches(spec)
    windows = []
    for epoch in range(spec["epochs"]):
        samples, tic = 0, time.perf_counter()
        for x, y in batches.epoch(epoch):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(models.to_layout(x, fmt)), y).backward()
            optimizer.step()
            samples += len(y)
        windows.append(samples / (time.perf_counter() - tic))
    return {"windows": windows[spec["warmup"]:], "peak_mem_mb": [peak_rss_mb()], "busy": None}


# ------------------------------------------------------------------------------------ our engine
def engine_rank(raw: dict, run_dir: str) -> Spec:
    """One rank of our engine (``fdg_dist.worker.run``), reporting its peak RSS afterwards."""
    worker.run(raw, run_dir)
    return {"rank": int(os.environ["RANK"]), "peak_mem_mb": peak_rss_mb()}


def engine_busy(run_dir: Path, rank: int, first_epoch: int, train_s: float) -> float:
    """Fraction of the timed epochs' training time rank spent in forward/backward/step (its trace)."""
    spans = json.loads((run_dir / "trace" / f"rank{rank}.json").read_text())["traceEvents"]
    compute_us = sum(s["dur"] for s in spans if s.get("cat") in ("forward", "backward", "step")
                     and s["args"]["phase"] == "train" and s["args"]["epoch"] >= first_epoch)
    return compute_us / 1e6 / train_s


# ------------------------------------------------------------------------------------ torch pipelining
class _Layout(nn.Module):
    """Puts a 4-D activation in one memory layout (its backward returns the gradient in the input's)."""

    def __init__(self, fmt: torch.memory_format) -> None:
        super().__init__()
        self.fmt = fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return models.to_layout(x, self.fmt)


def pipelining_rank(spec: Spec) -> Spec:
    """One stage of ``torch.distributed.pipelining`` (GPipe or 1F1B) over our split of the model.

    Stage 0 reads the batches; the last stage computes the cross-entropy and takes its labels straight
    from the data set in the epoch's order (no extra message); every stage steps SGD once per batch.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec["timeout_s"]))
    try:
        torch.manual_seed(spec["seed"])
        blocks = models.build_blocks(spec["model"], spec["num_classes"])
        sample = (1, 3, spec["image_size"], spec["image_size"])
        bounds = spec["bounds"]
        # like our engine: compute in the configured layout, send contiguous (NCHW) tensors, which gloo requires
        fmt = models.memory_format(spec["channels_last"])
        module = nn.Sequential(_Layout(fmt), *blocks[bounds[rank]:bounds[rank + 1]],
                               _Layout(torch.contiguous_format)).to(memory_format=fmt)
        # static shapes: the stages then exchange no metadata at all
        micro = spec["batch_size"] // spec["micro_batches"]
        shapes = partition.boundary_shapes(blocks, sample)
        example_in, example_out = (torch.empty(micro, *shapes[i][1:]) for i in (bounds[rank], bounds[rank + 1]))
        example_in.requires_grad_(rank > 0)  # else no gradient is sent back and stage 0 never trains
        example_out.requires_grad_(True)
        stage = PipelineStage(module, rank, world, torch.device("cpu"), input_args=example_in, output_args=example_out)
        schedule_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[spec["schedule"]]
        last = rank == world - 1
        # every stage needs the loss_fn: without one a schedule runs forward only on that stage, so stage 0
        # would post no gradient receives and the last stage's gradient sends would wait forever
        schedule = schedule_cls(stage, spec["micro_batches"], loss_fn=nn.CrossEntropyLoss())
        optimizer = build_optimizer(OptimConfig(), module.parameters())
        bs = spec["batch_size"]
        batches = train_batches(spec) if rank == 0 or last else None
        sizes = data.batch_sizes(spec["train_size"], bs)
        initial = [p.detach().clone() for p in module.parameters()]
        windows, cpu = [], []
        for epoch in range(spec["epochs"]):
            inputs = batches.epoch(epoch) if rank == 0 else None
            order = batches.order(epoch) if last else None
            dist.barrier()
            tic, cpu_tic = time.perf_counter(), time.process_time()
            for b, n in enumerate(sizes):
                optimizer.zero_grad(set_to_none=True)
                if rank == 0:
                    schedule.step(next(inputs)[0])
                elif last:
                    schedule.step(target=batches.data.labels[order[b * bs:b * bs + n]], return_outputs=False)
                else:
                    schedule.step()
                optimizer.step()
            windows.append(time.perf_counter() - tic)
            cpu.append(time.process_time() - cpu_tic)
        if all(torch.equal(a, b) for a, b in zip(initial, module.parameters(), strict=True)):
            raise RuntimeError(f"stage {rank} of {spec['schedule']} did not train: its weights never changed")
        first = spec["warmup"]
        return {"rank": rank, "window_s": windows[first:], "busy": sum(cpu[first:]) / sum(windows[first:]),
                "peak_mem_mb": peak_rss_mb(), "bounds": bounds}
    finally:
        dist.destroy_process_group()
