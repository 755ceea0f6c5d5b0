"""Every model as an ordered list of blocks, so every pipeline split point is a block boundary.

``model.name`` picks the builder: a CIFAR CNN of the zoo (resnet20 ... wrn28_10, tiny), ``gpt`` (a
decoder-only transformer for ``data=text``), ``torchvision`` (``model.arch``: a torchvision classifier cut
at its top-level children) or ``custom`` (``model._target_``: your function returning blocks).  Every
other key under ``model`` is an argument of that builder.

A pipeline module owning blocks [a, b) is an ``nn.Sequential`` keyed by block index ("3.conv1.weight");
``BlockModel.model_state`` maps such keys to the model's own: for the zoo, ``gpt`` and a returned list
they are the same, for torchvision they are torchvision's (``layer1.0.conv1.weight``), for a returned
``nn.Sequential`` its children's names.  ``build`` returns the model those keys load into.

Must not know pipelines, stages, data or process groups (layer 1: it imports only ``config``): blocks are built
the same on every rank from the seed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fdg_dist.config import ModelConfig
from fdg_dist.models import official
from fdg_dist.models.gpt import gpt_blocks
from fdg_dist.models.layers import init_weights
from fdg_dist.models.resnet18 import resnet18_blocks
from fdg_dist.models.resnet_cifar import DEPTHS, resnet_cifar_blocks
from fdg_dist.models.tiny import tiny_blocks
from fdg_dist.models.torchvision_models import torchvision_model
from fdg_dist.models.wrn import wrn_blocks

__all__ = ["BlockModel", "aux_head", "build", "build_blocks", "build_model", "memory_format", "names", "to_layout"]

_ZOO: dict[str, Callable[[int], list[nn.Module]]] = {
    **{name: (lambda nc, name=name: resnet_cifar_blocks(name, nc)) for name in DEPTHS},
    "resnet18": resnet18_blocks,
    "wrn28_10": lambda nc: wrn_blocks(28, 10, nc),
    "tiny": tiny_blocks,
}
FAMILIES = ("gpt", "torchvision", "custom")
_CUSTOM_HINT = ("return the model as an ordered list of blocks (or an nn.Sequential) whose forward applies them "
                "one after the other, each taking one tensor and returning one; torchvision classifiers are "
                "built in: model=torchvision model.arch=<name>")


@dataclass
class BlockModel:
    """A model as the pipeline sees it: its blocks in forward order, where each block's weights live in the
    model's own ``state_dict`` (``prefixes[i] + key``), and the model itself (``whole``), which a state with
    those keys loads into with ``strict=True``."""

    blocks: list[nn.Module]
    prefixes: list[str]
    whole: nn.Module

    def model_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pipeline keys ("<block index>.<key>", of any modules) → the model's own keys."""
        out = {}
        for key, value in state.items():
            index, rest = key.split(".", 1)
            out[self.prefixes[int(index)] + rest] = value
        return out

    def block_names(self) -> list[str]:
        """Each block's name in the model (``layer3.1``; its index where the model has no names)."""
        return [p.rstrip(".") or type(b).__name__ for p, b in zip(self.prefixes, self.blocks, strict=True)]

    @classmethod
    def of(cls, blocks: list[nn.Module]) -> BlockModel:
        """Blocks keyed by index, as ``nn.Sequential(*blocks)`` keys them."""
        return cls(blocks, [f"{i}." for i in range(len(blocks))], nn.Sequential(*blocks))


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout a run computes in (``trainer.channels_last``): NHWC convolutions are faster on CPUs and GPUs."""
    if not isinstance(channels_last, bool):
        raise ValueError(f"trainer.channels_last={channels_last!r}: resolve 'auto' for the device first "
                         "(fdg_dist.run.devices.resolve)")
    return torch.channels_last if channels_last else torch.contiguous_format


def to_layout(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``x`` in layout ``fmt`` if it is an image batch (4-D); other tensors (logits, labels) as they are."""
    return x.contiguous(memory_format=fmt) if x.dim() == 4 else x


def names() -> list[str]:
    """Sorted names accepted by ``model.name``."""
    return sorted([*_ZOO, *FAMILIES])


VARIANTS = ("ours", "official")


def build_model(model: ModelConfig | str, num_classes: int, device: str | torch.device | None = None) -> BlockModel:
    """The model ``model`` (a ``ModelConfig``, or a zoo name) as blocks; ``num_classes`` is the vocabulary
    size for language models.

    On ``device="meta"`` the blocks are created directly there (no memory, for shape inference and
    parameter counting). Otherwise they are created and initialised on the CPU and then moved, so the
    initial weights for a given ``torch.manual_seed`` do not depend on the device.  ``model.variant=official``
    is the FDG authors' definition of the same model (``official.py``), with the same block boundaries.
    """
    spec = model if isinstance(model, ModelConfig) else ModelConfig(name=model)
    if spec.name not in names():
        raise ValueError(f"model.name={spec.name!r} is not a known model; valid names: {', '.join(names())}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    build_on = device if device.type == "meta" else torch.device("cpu")
    with build_on:
        built = _build(spec, num_classes)
    _check_untied(built.blocks)
    built.whole.to(device)  # moves every block too: they are the whole model's modules
    return built


def _build(spec: ModelConfig, num_classes: int) -> BlockModel:
    if spec.name in _ZOO:
        _check_args(lambda num_classes: None, spec.args, spec.name)
        if spec.variant == "official":
            return BlockModel.of(official.blocks(spec.name, num_classes))
        blocks = _ZOO[spec.name](num_classes)
        for block in blocks:
            init_weights(block)
        return BlockModel.of(blocks)
    if spec.name == "gpt":
        _check_args(gpt_blocks, spec.args, "gpt")
        return BlockModel.of(gpt_blocks(num_classes, **spec.args))
    if spec.name == "torchvision":
        _check_args(torchvision_model, spec.args, "torchvision")
        return BlockModel(*torchvision_model(num_classes, **spec.args))
    return _custom(spec._target_, num_classes, spec.args)


def _check_args(fn: Callable[..., Any], args: Mapping[str, Any], name: str) -> None:
    """Name the ``model.<key>`` that ``fn`` does not take, or the one it needs and did not get."""
    params = {n: p for n, p in inspect.signature(fn).parameters.items() if n != "num_classes"}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in args:
        if key not in params:
            valid = ", ".join(params) or "none"
            raise ValueError(f"model.{key}: model={name} takes no argument {key!r}; its arguments: {valid}")
    for key, p in params.items():
        if p.default is inspect.Parameter.empty and key not in args:
            raise ValueError(f"model.{key}: model={name} needs it")


def _custom(target: str | None, num_classes: int, args: Mapping[str, Any]) -> BlockModel:
    """``model._target_`` called through ``hydra.utils.instantiate`` with the other ``model`` keys as its
    arguments (and ``num_classes=data.num_classes`` if it takes that argument and it is not set)."""
    from hydra.utils import get_method, instantiate

    if not target or target == "???":
        raise ValueError("model._target_: model=custom needs model._target_=<module>.<function>, a function "
                         "returning the model's blocks (its other arguments as model.<name>=value)")
    try:
        fn = get_method(target)
    except Exception as e:  # hydra wraps ImportError and AttributeError alike
        raise ValueError(f"model._target_: {target!r} cannot be imported ({' '.join(str(e).split())}); its module must be importable from "
                         "the working directory or PYTHONPATH") from None
    extra = {}
    try:
        if "num_classes" in inspect.signature(fn).parameters and "num_classes" not in args:
            extra["num_classes"] = num_classes
    except (TypeError, ValueError):  # no signature (a builtin): pass what was configured
        pass
    out = instantiate({"_target_": target, **args}, _convert_="all", **extra)
    if isinstance(out, nn.Sequential):
        if type(out).forward is not nn.Sequential.forward:
            raise ValueError(f"model._target_: {target} returned a {type(out).__name__} with its own forward, "
                             f"so cutting it between its children may change what it computes: {_CUSTOM_HINT}")
        named = list(out.named_children())
        return BlockModel([m for _, m in named], [f"{n}." for n, _ in named], out)
    if isinstance(out, (list, tuple, nn.ModuleList)) and len(out) and all(isinstance(b, nn.Module) for b in out):
        return BlockModel.of(list(out))
    raise ValueError(f"model._target_: {target} returned {type(out).__name__}, which cannot be cut into pipeline "
                     f"modules: {_CUSTOM_HINT}")


def _check_untied(blocks: list[nn.Module]) -> None:
    """A parameter used by two blocks (tied weights) cannot live on two pipeline modules."""
    owner: dict[int, tuple[int, str]] = {}
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            j, first = owner.setdefault(id(p), (i, name))
            if j != i:
                raise ValueError(f"model: blocks {j} ({first}) and {i} ({name}) share one parameter (tied weights), "
                                 "which cannot be split over pipeline modules; give each block its own")


def build_blocks(model: ModelConfig | str, num_classes: int, device: str | torch.device | None = None) -> list[nn.Module]:
    """The model's blocks in forward order (see ``build_model``)."""
    return build_model(model, num_classes, device).blocks


def build(model: ModelConfig | str, num_classes: int, device: str | torch.device | None = None) -> nn.Module:
    """The unsplit model: ``final_model.pt`` loads into it with ``strict=True``."""
    return build_model(model, num_classes, device).whole


def aux_head(in_shape: torch.Size | tuple[int, ...], num_classes: int, width: int = 128, *,
             per_token: bool = False) -> nn.Module:
    """DGL auxiliary classifier for a module boundary with activation shape (N, C, H, W), (N, F) or (N, T, C).

    Follows the DGL default for images: conv3x3(C->width)+BN+ReLU, global average pool, linear. A flat
    (N, F) boundary gets a plain linear layer; a token sequence (N, T, C) LayerNorm and a linear layer,
    per token (``per_token``: next-token prediction) or on the mean over tokens.
    """
    if len(in_shape) == 3:
        return TokenHead(in_shape[2], num_classes, per_token=per_token)
    if per_token:
        raise ValueError(f"a per-token auxiliary head needs an (N, T, C) boundary, got {tuple(in_shape)}")
    if len(in_shape) == 2:
        return nn.Linear(in_shape[1], num_classes)
    if len(in_shape) != 4:
        raise ValueError(f"aux_head needs an (N, C, H, W), (N, F) or (N, T, C) activation shape, got {tuple(in_shape)}")
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


class TokenHead(nn.Module):
    """LayerNorm + linear on (N, T, C) features: logits per token, or of the mean token."""

    def __init__(self, width: int, num_classes: int, *, per_token: bool) -> None:
        super().__init__()
        self.per_token = per_token
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln(x)
        return self.out(x if self.per_token else x.mean(dim=1))
