"""Building blocks shared by every model: stem, classifier head and weight init.

Each block is a self-contained ``nn.Module`` so a pipeline module can own any contiguous
range of blocks and its ``state_dict`` keys map one-to-one onto the unsplit model's keys.

Must not know pipelines, splits or process groups.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ConvBNReLU(nn.Module):
    """3x3 conv + BatchNorm + ReLU: the CIFAR stem and the ``tiny`` model's block."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class ClassifierHead(nn.Module):
    """Global average pool + flatten + linear; ``preact`` adds the final BN+ReLU of pre-activation nets.

    ``pool`` (the FDG authors' heads, ``official.py``): ``AvgPool2d(pool)`` instead, whose stride is ``pool``
    too, so on an 8×8 map with pool 6 it averages the top-left 6×6 window only; ``bn_momentum`` theirs.
    """

    def __init__(self, in_ch: int, num_classes: int, preact: bool = False, *, pool: int | None = None,
                 bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch, momentum=bn_momentum) if preact else None
        self.pool = nn.AdaptiveAvgPool2d(1) if pool is None else nn.AvgPool2d(pool)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(self.flatten(self.pool(x)))


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs (fan_in, ReLU gain, as the CIFAR ResNet references), BN to identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
