"""Reproducible epochs of batches over a dataset in memory: order, the paper's augmentation, the shard of a
global batch each data-parallel replica takes, and the move to the device.

Order and augmentation depend only on (seed, epoch, batch), so a resumed run and the reference simulation see
the same tensors.  Must not know about pipelines or process groups.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fdg_dist.data.images import ImageSet, Normalize
from fdg_dist.data.seeds import generator
from fdg_dist.data.text import TextSet

PAD = 4  # the paper's augmentation: zero-pad 4 pixels, random crop back to size, random h-flip


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Global batch sizes of one epoch over n samples: full batches, then a partial one (no drop_last)."""
    full, rest = divmod(n, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def shard_bounds(n: int, replica: int, replicas: int) -> tuple[int, int]:
    """[start, stop) of replica's contiguous slice of a global batch of n.

    A full batch splits exactly; a partial last batch splits as evenly as possible, the first n % R
    replicas taking one sample more (a last batch smaller than R leaves some replicas an empty slice).
    """
    base, extra = divmod(n, replicas)
    start = replica * base + min(replica, extra)
    return start, start + base + (replica < extra)


def shard_size(n: int, per_replica: int, replica: int, replicas: int) -> int:
    """Size of replica's slice of a global batch of n (``per_replica`` = batch_size // R, checked)."""
    if n > per_replica * replicas:
        raise ValueError(f"global batch of {n} exceeds {replicas} replicas x {per_replica}")
    start, stop = shard_bounds(n, replica, replicas)
    return stop - start


class Batches:
    """One epoch at a time of (x, y) batches; order and augmentation depend only on (seed, epoch, batch).

    Images: normalised float (n, 3, H, W) and labels (n,); text: tokens and next tokens, int64 (n, T), the
    training epoch's sequence offset drawn from (seed, epoch), 0 for evaluation.
    """

    def __init__(self, data: ImageSet | TextSet, batch_size: int, *, train: bool, augment: bool, seed: int,
                 device: torch.device | str = "cpu", shard: tuple[int, int] = (0, 1)) -> None:
        replica, replicas = shard
        if batch_size % replicas:
            raise ValueError(f"trainer.batch_size={batch_size} must divide by the {replicas} data-parallel replicas")
        if not 0 <= replica < replicas:
            raise ValueError(f"shard {shard}: replica index out of range")
        self.data, self.batch_size, self.train, self.augment, self.seed = data, batch_size, train, augment, seed
        self.device = torch.device(device)
        self.replica, self.replicas = replica, replicas
        self._normalize = None if isinstance(data, TextSet) else Normalize(data.mean, data.std, self.device)

    def batch_sizes(self) -> list[int]:
        return [shard_size(n, self.batch_size // self.replicas, self.replica, self.replicas)
                for n in batch_sizes(len(self.data), self.batch_size)]

    def num_batches(self) -> int:
        return len(batch_sizes(len(self.data), self.batch_size))

    def order(self, epoch: int) -> torch.Tensor:
        """Sample indices of the epoch: a seeded permutation when training, dataset order otherwise."""
        n = len(self.data)
        return torch.randperm(n, generator=generator(self.seed, "order", epoch)) if self.train else torch.arange(n)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches start_batch.. of the epoch; batch b is the same tensor whichever batch iteration began at."""
        order = self.order(epoch)
        cuda = self.device.type == "cuda"
        text = isinstance(self.data, TextSet)
        offset = self._offset(epoch) if text else 0
        for b, n in enumerate(batch_sizes(len(self.data), self.batch_size)):
            if b < start_batch:
                continue
            lo, hi = shard_bounds(n, self.replica, self.replicas)
            idx = order[b * self.batch_size + lo:b * self.batch_size + hi]
            if text:
                x, y = self.data.sequences(idx, offset)
            else:
                x, y = self.data.images[idx], self.data.labels[idx]
                if self.train and self.augment:
                    x = augment(x, *self._draw(epoch, b, n, lo, hi))
            if cuda:
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=cuda)
            if not text:
                x = self._normalize(x)
            yield x, y.to(self.device, non_blocking=cuda)

    def _offset(self, epoch: int) -> int:
        """Where a text epoch's sequences start: random in [0, context) when training, so every epoch cuts the
        stream elsewhere; 0 for evaluation."""
        if not self.train:
            return 0
        return int(torch.randint(0, self.data.context, (1,), generator=generator(self.seed, "offset", epoch)))

    def _draw(self, epoch: int, b: int, n: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crop offsets and flips for the whole global batch, then this shard's rows: shards agree with it."""
        g = generator(self.seed, "augment", epoch, b)
        dy, dx = torch.randint(0, 2 * PAD + 1, (2, n), generator=g)
        flip = torch.randint(0, 2, (n,), generator=g).bool()
        return dy[lo:hi], dx[lo:hi], flip[lo:hi]


def augment(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Zero-pad by PAD, crop the original size at (dy, dx), mirror where flip: one gather for the batch.

    Output pixel (i, j) of sample k is padded[k, :, dy+i, dx+j], or dx+(W-1-j) when flipped.
    """
    B, C, H, W = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    rows = dy[:, None] + torch.arange(H)
    j = torch.arange(W)
    cols = dx[:, None] + torch.where(flip[:, None], W - 1 - j, j)
    flat = rows[:, :, None] * (W + 2 * PAD) + cols[:, None, :]  # (B, H, W) offsets into a padded plane
    return padded.flatten(2).gather(2, flat.flatten(1)[:, None, :].expand(B, C, H * W)).view(B, C, H, W)
