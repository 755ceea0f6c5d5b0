"""The FDG authors' own model definitions (github.com/ZHUANGHP/FDG, PyTorch 1.0): ``model.variant=official``.

For parity runs at the paper's margins (0.1–0.3 points); the default (``ours``) is the textbook model.

CIFAR ResNets (``ResNet_cifar.py``): our blocks, but the head is ``AvgPool2d(6)`` on the 8×8 map — its
stride is 6 too, so it averages the top-left 6×6 window only — and the initialisation is PyTorch 1.0's
default (their Kaiming init is commented out): convolutions and the linear layer as torch's default today,
BatchNorm weights uniform in [0, 1) (torch < 1.2).

WRN-28-10 (``WRN.py``): convolutions with biases, the stride on each block's *second* convolution, the
shortcut (1×1 conv with bias) on the raw block input instead of the pre-activated one, the final
BatchNorm with momentum 0.9 (torch's convention: 0.9 of the new batch statistics), an 8×8 average pool, and
the default initialisation (their ``conv_init`` is never applied).  Dropout is their default 0: left out.

Must not change the default models: these definitions are taken only with ``model.variant=official``, and know
nothing of pipelines or process groups.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fdg_dist.models.layers import ClassifierHead, ConvBNReLU
from fdg_dist.models.resnet_cifar import DEPTHS, residual_stages
from fdg_dist.models.wrn import StemConv

NAMES = (*DEPTHS, "wrn28_10")


class WideBasic(nn.Module):
    """Their ``wide_basic``: BN-ReLU-conv(bias) - BN-ReLU-conv(bias, stride) + shortcut(raw input)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=stride, padding=1, bias=True)
        self.shortcut = (nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=True)
                         if stride != 1 or in_ch != out_ch else None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))


def torch10_init(module: nn.Module) -> None:
    """PyTorch 1.0's BatchNorm init (weight uniform in [0, 1), bias 0); convs and linears keep torch's default."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight)
            nn.init.zeros_(m.bias)


def blocks(name: str, num_classes: int) -> list[nn.Module]:
    """The official variant of ``name`` as blocks (same block boundaries as ours), initialised."""
    if name in DEPTHS:
        out = [ConvBNReLU(3, 16), *residual_stages(16, [16, 32, 64], DEPTHS[name], "A"), ClassifierHead(64, num_classes, pool=6)]
    elif name == "wrn28_10":
        out, in_ch = [StemConv(3, 16, bias=True)], 16
        for stage, width in enumerate([160, 320, 640]):
            for i in range(4):
                out.append(WideBasic(in_ch, width, 2 if stage > 0 and i == 0 else 1))
                in_ch = width
        out.append(ClassifierHead(in_ch, num_classes, preact=True, pool=8, bn_momentum=0.9))
    else:
        raise ValueError(f"model.variant=official exists for {', '.join(NAMES)}; {name!r} has only variant=ours")
    for block in out:
        torch10_init(block)
    return out
