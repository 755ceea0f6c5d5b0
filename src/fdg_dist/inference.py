"""A finished run's model, ready for inference: ``model, transform = fdg_dist.load_model(run_dir)``.

The pipeline feeds its network normalised inputs, (x/255 - mean)/std per channel, with statistics that
belong to the data (measured on the training images for ImageFolder and synthetic data, constants for
CIFAR), and its outputs are indices into a class order that only the dataset knows.  Neither is in
``final_model.pt`` (a plain ``state_dict``, loadable with ``weights_only=True``), so the export writes
them beside it as ``final_model.json``: that pair is all inference needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fdg_dist import models
from fdg_dist.config import Config
from fdg_dist.data import ImageSet, Normalize

WEIGHTS = "final_model.pt"
METADATA = "final_model.json"
FORMAT = 1


def metadata(cfg: Config, train: ImageSet) -> dict[str, Any]:
    """What ``final_model.json`` holds: how to build the model and how to feed it."""
    return {
        "format": FORMAT,
        "model": cfg.model.name,
        "num_classes": train.num_classes,
        "classes": list(train.classes),
        "image_size": cfg.data.image_size,
        "mean": list(train.mean),
        "std": list(train.std),
        "input": "RGB, (x/255 - mean)/std per channel, NCHW float32",
        "data": cfg.data.name,
    }


@dataclass(frozen=True)
class Transform:
    """Images → the model's input, exactly as the run fed its network (``classes[i]`` names output i).

    Takes a PIL image, an (H, W, 3) uint8 array, or a (3, H, W) / (N, 3, H, W) tensor (uint8 in 0..255, or
    float in 0..1); returns float32 of the same rank, resized to ``image_size`` if it differs.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    classes: tuple[str, ...]

    def __call__(self, image: Any) -> torch.Tensor:
        x = _as_tensor(image)
        single = x.dim() == 3
        x = x[None] if single else x
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB images shaped (3, H, W) or (N, 3, H, W), got {tuple(x.shape)}")
        if x.is_floating_point():
            x = x * 255
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            from torchvision.transforms.v2.functional import resize

            x = resize(x, [self.image_size, self.image_size], antialias=True)
        out = Normalize(self.mean, self.std, x.device)(x)
        return out[0] if single else out


def _as_tensor(image: Any) -> torch.Tensor:
    """PIL images (any mode, converted to RGB) and (H, W, C) arrays to (C, H, W) tensors; tensors as given."""
    if isinstance(image, torch.Tensor):
        return image
    if hasattr(image, "convert"):  # a PIL image
        from torchvision.transforms.v2.functional import pil_to_tensor

        return pil_to_tensor(image.convert("RGB"))
    return torch.as_tensor(image).permute(2, 0, 1)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Transform]:
    """The run's final model (unsplit, eval mode, on ``device``) and the transform its inputs need.

    ``logits = model(transform(images).to(device))``; ``transform.classes[logits.argmax(1)]`` names the
    prediction.  Reads ``final_model.pt`` and ``final_model.json`` of ``run_dir`` (written when a run
    finishes; a copied model needs both files).
    """
    run_dir = Path(run_dir)
    weights, meta_path = run_dir / WEIGHTS, run_dir / METADATA
    for path in (weights, meta_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a run writes {WEIGHTS} and {METADATA} when it finishes; "
                                    "pass the directory of a finished run")
    meta = json.loads(meta_path.read_text())
    model = models.build(meta["model"], meta["num_classes"])
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.to(device).eval()
    return model, Transform(tuple(meta["mean"]), tuple(meta["std"]), meta["image_size"], tuple(meta["classes"]))
