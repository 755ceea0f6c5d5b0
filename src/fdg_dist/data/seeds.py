"""Stable seeds: every random choice of the data (epoch order, crop offsets, flips, subsets, synthetic images)
is drawn from a generator seeded by a stable hash of its parts, never from global RNG state.

So batch b of epoch e is the same tensor whether the run started at epoch 0, resumed from a checkpoint, or is
replayed by the single-process reference simulation.  Must not touch global random state.
"""

from __future__ import annotations

import hashlib

import torch


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed from the parts; unlike ``hash()`` it is identical across processes and Python runs."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*parts: int | str) -> torch.Generator:
    """A torch generator seeded by ``stable_seed(*parts)``."""
    return torch.Generator().manual_seed(stable_seed(*parts))
