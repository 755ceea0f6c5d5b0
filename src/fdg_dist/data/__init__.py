"""Inputs (layer 1): datasets as in-memory tensors, and reproducible epochs of batches over them.

Images are uint8 (N, C, H, W) tensors (``images``, ``synthetic``); text (``data=text``) is one token stream cut
into sequences of ``data.context`` tokens, each paired with the same tokens shifted by one (``text``).  Only
pipeline module 0 reads images or text.  Every random choice is drawn from a stably seeded generator
(``seeds``), so batch b of epoch e (``batches``) is the same tensor whether the run started at epoch 0, resumed
from a checkpoint, or is replayed by the single-process reference simulation.

The public names stay importable as ``fdg_dist.data.X``.  Must not know about pipelines, stages or process
groups; imports only ``config`` and ``util``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fdg_dist.config import DataConfig
from fdg_dist.data.batches import PAD, Batches, augment, batch_sizes, shard_bounds, shard_size
from fdg_dist.data.images import (
    CIFAR_STATS,
    DataUnavailable,
    ImageSet,
    Normalize,
    check_available,
    load_cifar,
    load_imagefolder,
    subset,
)
from fdg_dist.data.seeds import stable_seed
from fdg_dist.data.synthetic import load_synthetic
from fdg_dist.data.text import TextSet, load_text, text_tokens

__all__ = ["CIFAR_STATS", "PAD", "Batches", "DataUnavailable", "ImageSet", "Normalize", "SampleSpec", "TextSet",
           "augment", "batch_sizes", "check_available", "describe", "load", "sample_spec", "shard_bounds",
           "shard_size", "stable_seed", "text_tokens"]


@dataclass(frozen=True)
class SampleSpec:
    """One sample as the model sees it: input shape and dtype, and the shape of its labels."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    label_shape: tuple[int, ...] = ()


def sample_spec(cfg: DataConfig) -> SampleSpec:
    """Images: float (3, S, S) with one label; text: int64 tokens (T,) with T next-token labels."""
    if cfg.name == "text":
        return SampleSpec((cfg.context,), torch.int64, (cfg.context,))
    return SampleSpec((3, cfg.image_size, cfg.image_size), torch.float32)


def describe(data: ImageSet | TextSet) -> str:
    if isinstance(data, TextSet):
        kind = (f"BPE tokens (vocabulary {data.num_classes}, {data.bytes_per_token:.2f} bytes each)" if data.bpe
                else "bytes" if data.vocab is None else f"characters ({data.num_classes} distinct)")
        return f"{len(data.tokens)} {kind}, {len(data)} sequences of {data.context}"
    n, c, h, w = data.images.shape
    return f"{n} images {c}x{h}x{w}, {data.num_classes} classes"


def load(cfg: DataConfig, seed: int) -> tuple[ImageSet, ImageSet] | tuple[TextSet, TextSet]:
    """(train, test) for ``cfg.name``, each cut to ``cfg.train_subset`` / ``cfg.test_subset`` if set."""
    if cfg.name == "text":
        return load_text(cfg)
    if cfg.name == "synthetic":
        train, test = load_synthetic(cfg, seed)
    elif cfg.name in CIFAR_STATS:
        train, test = load_cifar(cfg)
    elif cfg.name == "imagefolder":
        train, test = load_imagefolder(cfg, seed)
    else:
        raise ValueError(f"data.name: unknown dataset {cfg.name!r}")
    for split in (train, test):
        if split.num_classes != cfg.num_classes:
            raise ValueError(f"data.num_classes is {cfg.num_classes} but {cfg.name} has {split.num_classes} classes")
        if split.images.shape[-2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"data.image_size is {cfg.image_size} but {cfg.name} images are "
                             f"{tuple(split.images.shape[-2:])}; resize the images or set data.image_size")
    if cfg.std is not None:  # e.g. the FDG authors' CIFAR-10 std (0.2023, 0.1994, 0.2010)
        train, test = (replace(split, std=tuple(cfg.std)) for split in (train, test))
    return subset(train, cfg.train_subset, seed, "train"), subset(test, cfg.test_subset, seed, "test")
