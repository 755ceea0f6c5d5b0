"""Staleness telemetry: how old, how far and how wrong the gradient a module applies is.

At every ``logging.staleness_every_steps``-th step a module with a stashed forward measures, for the
gradient it is about to apply (after any corrector):

- ``delay_steps``: its own optimizer steps since the forward that produced it;
- ``weight_distance``: ‖w_stashed − w_live‖ / ‖w_live‖ at backward time;
- ``local_cosine`` and ``local_norm_ratio``: against the *local fresh* gradient — the same incoming
  gradient back-propagated through the live weights instead of the stashed ones (one extra forward and
  backward of this module, with BatchNorm statistics left untouched).  The norm ratio is applied / fresh;
  β scales both alike.

A module that back-propagates its own loss at once (the last one, and K = 1) applies the fresh
gradient by construction: delay 0, distance 0, cosine and ratio 1.  The rest of the network's share
of the staleness (stale activations from upstream, stale gradients from downstream) needs every
module's current weights, which only ``reference.Simulation`` has: its probes add the *full* fresh
gradient of the same batch.  Values stay on the device until the epoch end (``metrics.EpochRecord``).

Must not change what a step applies: the probes only measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

TAGS = ("delay_steps", "weight_distance", "local_cosine", "local_norm_ratio")


@dataclass
class Probe:
    """One measurement; tensors are device scalars, read with the rest of the epoch's values."""

    delay_steps: int
    weight_distance: torch.Tensor | float
    local_cosine: torch.Tensor | float
    local_norm_ratio: torch.Tensor | float


FRESH = Probe(0, 0.0, 1.0, 1.0)  # a gradient back-propagated at once, through the weights it is applied to


def _flat_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


def compare(applied: Sequence[torch.Tensor], fresh: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, norm ratio applied/fresh) of two gradients given per parameter, on the device."""
    dot = torch.stack([(a.float() * f.float()).sum() for a, f in zip(applied, fresh, strict=True)]).sum()
    na, nf = _flat_norm(applied), _flat_norm(fresh)
    return dot / (na * nf).clamp_min(1e-30), na / nf.clamp_min(1e-30)


def distance(stashed: Sequence[torch.Tensor], live: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖stashed − live‖ / ‖live‖ over all of a module's parameters."""
    diff = _flat_norm([s.detach() - p.detach() for s, p in zip(stashed, live, strict=True)])
    return diff / _flat_norm([p.detach() for p in live]).clamp_min(1e-30)
