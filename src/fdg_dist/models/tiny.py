"""``tiny``: a <20k-parameter test model with BatchNorm, fast enough for multi-process unit tests.

Must not know pipelines, splits or process groups: it only builds blocks.
"""

from __future__ import annotations

from torch import nn

from fdg_dist.models.layers import ClassifierHead, ConvBNReLU


def tiny_blocks(num_classes: int) -> list[nn.Module]:
    """Six conv-BN-ReLU blocks (one stride-2) and a head."""
    return [
        ConvBNReLU(3, 8),
        ConvBNReLU(8, 8),
        ConvBNReLU(8, 16, stride=2),
        ConvBNReLU(16, 16),
        ConvBNReLU(16, 16),
        ConvBNReLU(16, 16),
        ClassifierHead(16, num_classes),
    ]
