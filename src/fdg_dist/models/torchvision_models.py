"""torchvision classification models cut into blocks, their weights keyed as torchvision keys them.

A model's forward is written out as the sequence of its top-level children (plus the parameter-free
steps its ``forward`` does between them, such as the flatten before the classifier); every pure
``nn.Sequential`` among them (residual stages, ``features``) is flattened into its own children,
recursively.  Each block remembers where its weights live in the torchvision model (``layer3.1.``), so
the pipeline's weights map back to torchvision's ``state_dict`` keys and ``final_model.pt`` loads with
``strict=True`` into ``torchvision.models.get_model(arch, num_classes=...)``.  Never pretrained.

Must not download weights or know pipelines, splits or process groups: it only cuts a torchvision model into
blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Flatten(nn.Flatten):
    """``torch.flatten(x, 1)``: what most classifiers' forward does between pooling and the head."""

    def __init__(self) -> None:
        super().__init__(1)


class SpatialMean(nn.Module):
    """``x.mean([2, 3])``: the global pool of ShuffleNetV2 and MNASNet."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean([2, 3])


class ReLUPoolFlatten(nn.Module):
    """DenseNet's and (without the ReLU) MobileNetV2's step from features to classifier."""

    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        if self.relu:
            x = torch.relu(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1)


class _Holder(nn.Module):
    """Registers existing modules or parameters under torchvision's names (``encoder.pos_embedding``)."""

    def __init__(self, **members: nn.Module | nn.Parameter) -> None:
        super().__init__()
        for name, member in members.items():
            setattr(self, name, member)


class ViTStem(nn.Module):
    """Patchify, prepend the class token, add the position embedding: VisionTransformer up to its encoder
    layers.  Its keys are torchvision's (``class_token``, ``conv_proj.*``, ``encoder.pos_embedding``)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.class_token = vit.class_token
        self.conv_proj = vit.conv_proj
        self.encoder = _Holder(pos_embedding=vit.encoder.pos_embedding, dropout=vit.encoder.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (n, patches, hidden), as VisionTransformer._process_input
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder.dropout(x + self.encoder.pos_embedding)


class ViTHead(nn.Module):
    """The encoder's final LayerNorm, the class token's features, the classification head."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.encoder = _Holder(ln=vit.encoder.ln)
        self.heads = vit.heads

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(self.encoder.ln(x)[:, 0])


def _layout(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's forward as (state_dict prefix, module) in order; "" for modules keyed at the root."""
    from torchvision import models as tv

    def kids(*names: str) -> list[tuple[str, nn.Module]]:
        return [(name, getattr(model, name)) for name in names]

    flat = [("", Flatten())]
    if isinstance(model, tv.ResNet):  # also resnext and wide_resnet
        return kids("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool") + flat + kids("fc")
    if isinstance(model, (tv.MobileNetV3, tv.EfficientNet, tv.VGG, tv.AlexNet)):
        return kids("features", "avgpool") + flat + kids("classifier")
    if isinstance(model, tv.MobileNetV2):
        return kids("features") + [("", ReLUPoolFlatten(relu=False))] + kids("classifier")
    if isinstance(model, tv.DenseNet):
        return kids("features") + [("", ReLUPoolFlatten(relu=True))] + kids("classifier")
    if isinstance(model, tv.ConvNeXt):
        return kids("features", "avgpool", "classifier")
    if isinstance(model, tv.RegNet):
        return kids("stem", "trunk_output", "avgpool") + flat + kids("fc")
    if isinstance(model, tv.ShuffleNetV2):
        return kids("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5") + [("", SpatialMean())] + kids("fc")
    if isinstance(model, tv.MNASNet):
        return kids("layers") + [("", SpatialMean())] + kids("classifier")
    if isinstance(model, tv.SqueezeNet):
        return kids("features", "classifier") + flat
    if isinstance(model, tv.SwinTransformer):
        return kids("features", "norm", "permute", "avgpool", "flatten", "head")
    if isinstance(model, tv.VisionTransformer):
        layers = [(f"encoder.layers.{name}", layer) for name, layer in model.encoder.layers.named_children()]
        return [("", ViTStem(model)), *layers, ("", ViTHead(model))]
    raise ValueError(f"{type(model).__name__} cannot be cut into a sequence of blocks (its forward is not a chain of "
                     f"its children); supported families: {', '.join(SUPPORTED)}")


SUPPORTED = ("resnet*", "resnext*", "wide_resnet*", "mobilenet_v2", "mobilenet_v3_*", "efficientnet_*", "vgg*",
             "alexnet", "densenet*", "convnext_*", "regnet_*", "shufflenet_v2_*", "mnasnet*", "squeezenet*",
             "swin_*", "vit_*")


def _is_chain(module: nn.Module) -> bool:
    """A container whose forward is nn.Sequential's: cutting between its children changes nothing."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _flatten(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    if not _is_chain(module):
        return [(prefix, module)]
    return [item for name, child in module.named_children()
            for item in _flatten(f"{prefix}.{name}" if prefix else name, child)]


def arch_names() -> list[str]:
    """Every torchvision classification model name (``model.arch``)."""
    from torchvision import models as tv

    return tv.list_models(module=tv)


def torchvision_model(num_classes: int, *, arch: str, image_size: int | None = None,
                      **kwargs: object) -> tuple[list[nn.Module], list[str], nn.Module]:
    """(blocks, state_dict prefix of each block, the torchvision model itself) for ``arch``.

    ``image_size`` goes to vision transformers only (their position embedding is sized for it); other
    keyword arguments go to torchvision's constructor (e.g. ``dropout=0``).
    """
    from torchvision import models as tv

    if arch not in arch_names():
        raise ValueError(f"model.arch={arch!r} is not a torchvision classification model; valid: "
                         f"{', '.join(arch_names())}")
    if image_size is not None and arch.startswith("vit_"):
        kwargs["image_size"] = image_size
    try:
        model = tv.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"model: torchvision's {arch} does not take {sorted(kwargs)} ({e}); every model.<key> but "
                         "arch and image_size goes to its constructor") from None
    try:
        cut = [item for name, module in _layout(model) for item in _flatten(name, module)]
    except ValueError as e:
        raise ValueError(f"model.arch={arch}: {e}") from None
    prefixes = [f"{name}." if name else "" for name, _ in cut]
    blocks = [module for _, module in cut]
    keys = [p + k for p, b in zip(prefixes, blocks, strict=True) for k in b.state_dict()]
    if sorted(keys) != sorted(model.state_dict()):  # a layout above that misses or repeats a weight
        raise RuntimeError(f"cutting {arch} lost track of its weights: "
                           f"{sorted(set(model.state_dict()) ^ set(keys))[:5]}")
    return blocks, prefixes, model
