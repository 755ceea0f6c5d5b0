"""Every batch shape a run will see, run once before the first tick, so cuDNN's autotuner never runs later.

``torch.backends.cudnn.benchmark`` times candidate kernels the first time it meets a shape, and that timing
synchronises the whole device.  Inside the steady state this is a hidden host wait: a rank whose receive
for the next batch is already posted stalls until its neighbour's kernels finish, and in a chain of ranks
sharing a GPU the waits can close into a cycle.  Fixed-size batches do not make the shapes fixed: the last
training batch of an epoch is partial, evaluation runs at its own batch size with its own partial last
batch.  ``autotune`` runs each of those shapes through the stage once, forward (and backward for training
shapes) on zeros, before the first tick, and leaves the stage exactly as it found it: weights, BatchNorm
statistics, gradients and random generators.  The run then meets no new shape.

Must not change any state a run keeps, nor run on the CPU (where there is no autotuner to feed).
"""

from __future__ import annotations

import torch

from fdg_dist import models
from fdg_dist.engine.stage import Stage


def shapes_of_a_run(train_sizes: list[int], eval_sizes: list[int]) -> list[tuple[int, bool]]:
    """The distinct (batch size, training?) pairs a run meets, in first-seen order."""
    return list(dict.fromkeys([(n, True) for n in train_sizes] + [(n, False) for n in eval_sizes]))


def autotune(stage: Stage, in_shape: tuple[int, ...], dtype: torch.dtype, shapes: list[tuple[int, bool]]) -> None:
    """Run ``stage``'s module (and auxiliary head) once per shape on zero inputs of per-sample shape
    ``in_shape`` and ``dtype``; training shapes also back-propagate (the backward kernels are tuned too).

    Nothing of it remains: BatchNorm statistics are put back, gradients dropped, generators restored.
    """
    module, aux = stage.module, stage.aux_head
    parts = [module] + ([aux] if aux is not None else [])
    buffers = [(b, b.clone()) for part in parts for b in part.buffers()]
    grads = [(p, p.grad) for part in parts for p in part.parameters()]
    modes = [(m, m.training) for part in parts for m in part.modules()]
    devices = [stage.device] if stage.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=stage.device.type if devices else "cuda"):
        for n, train in shapes:
            x = models.to_layout(torch.zeros((n, *in_shape), dtype=dtype, device=stage.device), stage.memory_format)
            for part in parts:
                part.train(train)
            with torch.set_grad_enabled(train), stage.autocast:
                out = module(x.requires_grad_(train and x.is_floating_point()))
                if aux is not None:
                    out = aux(out)
            if train:
                out.float().sum().backward()
    for buf, saved in buffers:
        buf.copy_(saved)
    for p, g in grads:
        p.grad = g
    for m, training in modes:
        m.train(training)
