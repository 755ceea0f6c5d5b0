"""CIFAR ResNets of He et al. 2016 (resnet20 ... resnet1202): 3 stages of n basic blocks, 16/32/64 channels.

Option-A shortcuts (strided identity + zero channel padding) keep the parameter counts of the
paper (0.27M ... 19.4M); option B (1x1 conv + BN) is used by the CIFAR ResNet-18.

Must not know pipelines, splits or process groups: it only builds blocks.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from fdg_dist.models.layers import ClassifierHead, ConvBNReLU

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18, "resnet1202": 200}


class PadShortcut(nn.Module):
    """Option A: subsample spatially by 2 and zero-pad channels; parameter-free."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.pad_lo = (out_ch - in_ch) // 2
        self.pad_hi = out_ch - in_ch - self.pad_lo

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_lo, self.pad_hi))


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, add shortcut, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, option: Literal["A", "B"]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            if option == "A":
                self.shortcut = PadShortcut(in_ch, out_ch)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
                )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def residual_stages(in_ch: int, widths: list[int], depth: int, option: Literal["A", "B"]) -> list[nn.Module]:
    """Stages of ``depth`` basic blocks each; every stage after the first halves the resolution."""
    blocks: list[nn.Module] = []
    for stage, width in enumerate(widths):
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(in_ch, width, stride, option))
            in_ch = width
    return blocks


def resnet_cifar_blocks(name: str, num_classes: int) -> list[nn.Module]:
    """Stem, 3n residual blocks, head."""
    return [
        ConvBNReLU(3, 16),
        *residual_stages(16, [16, 32, 64], DEPTHS[name], "A"),
        ClassifierHead(64, num_classes),
    ]
