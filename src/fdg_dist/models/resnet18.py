"""CIFAR ResNet-18 (3x3 stem, no max-pool, 4 stages 64/128/256/512, 1x1-conv shortcuts, ~11.2M params).

Must not know pipelines, splits or process groups: it only builds blocks.
"""

from __future__ import annotations

from torch import nn

from fdg_dist.models.layers import ClassifierHead, ConvBNReLU
from fdg_dist.models.resnet_cifar import BasicBlock


def resnet18_blocks(num_classes: int) -> list[nn.Module]:
    """Stem, 8 basic blocks (2 per stage), head."""
    blocks: list[nn.Module] = [ConvBNReLU(3, 64)]
    in_ch = 64
    for stage, width in enumerate([64, 128, 256, 512]):
        for i in range(2):
            blocks.append(BasicBlock(in_ch, width, 2 if stage > 0 and i == 0 else 1, "B"))
            in_ch = width
    blocks.append(ClassifierHead(512, num_classes))
    return blocks
