"""Checkpoints: atomic files; per-rank state at epoch ends (after the drain, so nothing is in flight)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fdg_dist.trainer import Trainer


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file, fsync, rename: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(trainer: Trainer, epoch: int) -> None:
    """Placeholder until checkpointing lands: nothing is written."""


def restore(trainer: Trainer) -> Path | None:
    """Placeholder until checkpointing lands: always a fresh start."""
    return None
