"""Wide ResNet 28-10 (Zagoruyko & Komodakis 2016): pre-activation blocks, widths 160/320/640, ~36.5M params.

Must not know pipelines, splits or process groups: it only builds blocks.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fdg_dist.models.layers import ClassifierHead


class StemConv(nn.Module):
    """Plain 3x3 conv: a pre-activation net normalises at the start of each block instead (``bias``: the FDG
    authors' stem, ``official.py``)."""

    def __init__(self, in_ch: int, out_ch: int, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus shortcut; a 1x1 conv on the pre-activated input when shapes change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if stride != 1 or in_ch != out_ch else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def wrn_blocks(depth: int, widen: int, num_classes: int) -> list[nn.Module]:
    """Stem conv, 3 stages of (depth-4)/6 blocks, head with the final BN+ReLU."""
    n = (depth - 4) // 6
    blocks: list[nn.Module] = [StemConv(3, 16)]
    in_ch = 16
    for stage, width in enumerate([16 * widen, 32 * widen, 64 * widen]):
        for i in range(n):
            blocks.append(PreActBlock(in_ch, width, 2 if stage > 0 and i == 0 else 1))
            in_ch = width
    blocks.append(ClassifierHead(in_ch, num_classes, preact=True))
    return blocks
