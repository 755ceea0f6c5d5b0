"""Model zoo as ordered lists of blocks, so every pipeline split point is a block boundary.

``build(name)`` is ``nn.Sequential(*build_blocks(name))``; its ``state_dict`` keys ("0.conv.weight",
"3.bn1.running_mean", ...) are the keys of the unsplit model, and a pipeline module owning blocks
[a, b) recovers them by re-indexing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fdg_dist.models.layers import init_weights
from fdg_dist.models.resnet18 import resnet18_blocks
from fdg_dist.models.resnet_cifar import DEPTHS, resnet_cifar_blocks
from fdg_dist.models.tiny import tiny_blocks
from fdg_dist.models.wrn import wrn_blocks

__all__ = ["aux_head", "build", "build_blocks", "memory_format", "names", "to_layout"]

_FACTORIES: dict[str, Callable[[int], list[nn.Module]]] = {
    **{name: (lambda nc, name=name: resnet_cifar_blocks(name, nc)) for name in DEPTHS},
    "resnet18": resnet18_blocks,
    "wrn28_10": lambda nc: wrn_blocks(28, 10, nc),
    "tiny": tiny_blocks,
}


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout a run computes in (``trainer.channels_last``): NHWC convolutions are faster on CPUs and GPUs."""
    if not isinstance(channels_last, bool):
        raise ValueError(f"trainer.channels_last={channels_last!r}: resolve 'auto' for the device first "
                         "(fdg_dist.device_defaults.resolve)")
    return torch.channels_last if channels_last else torch.contiguous_format


def to_layout(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``x`` in layout ``fmt`` if it is an image batch (4-D); other tensors (logits, labels) as they are."""
    return x.contiguous(memory_format=fmt) if x.dim() == 4 else x


def names() -> list[str]:
    """Sorted names accepted by ``model.name``."""
    return sorted(_FACTORIES)


def build_blocks(name: str, num_classes: int, device: str | torch.device | None = None) -> list[nn.Module]:
    """The model ``name`` as an ordered list of blocks: stem, each residual block, head.

    On ``device="meta"`` the blocks are created directly there (no memory, for shape inference and
    parameter counting). Otherwise they are created and initialised on the CPU and then moved, so the
    initial weights for a given ``torch.manual_seed`` do not depend on the device.
    """
    if name not in _FACTORIES:
        raise ValueError(f"model.name={name!r} is not a known model; valid names: {', '.join(names())}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    build_on = device if device.type == "meta" else torch.device("cpu")
    with build_on:
        blocks = _FACTORIES[name](num_classes)
        for block in blocks:
            init_weights(block)
    return [block.to(device) for block in blocks]


def build(name: str, num_classes: int, device: str | torch.device | None = None) -> nn.Sequential:
    """The unsplit model; its ``state_dict`` keys are the canonical checkpoint keys."""
    return nn.Sequential(*build_blocks(name, num_classes, device))


def aux_head(in_shape: torch.Size | tuple[int, ...], num_classes: int, width: int = 128) -> nn.Module:
    """DGL auxiliary classifier for a module boundary with activation shape (N, C, H, W) or (N, F).

    Follows the DGL default: conv3x3(C->width)+BN+ReLU, global average pool, linear. A flat (N, F)
    boundary gets a plain linear layer.
    """
    if len(in_shape) == 2:
        return nn.Linear(in_shape[1], num_classes)
    if len(in_shape) != 4:
        raise ValueError(f"aux_head needs an (N, C, H, W) or (N, F) activation shape, got {tuple(in_shape)}")
    head = nn.Sequential(
        nn.Conv2d(in_shape[1], width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )
    init_weights(head)
    return head
