"""A finished run's model, ready for inference: ``model, transform = fdg_dist.load_model(run_dir)``.

The pipeline feeds its network normalised inputs, (x/255 - mean)/std per channel, with statistics that
belong to the data (measured on the training images for ImageFolder and synthetic data, constants for
CIFAR), and its outputs are indices into a class order that only the dataset knows.  Neither is in
``final_model.pt`` (a plain ``state_dict``, loadable with ``weights_only=True``), so the export writes
them beside it as ``final_model.json``: that pair is all inference needs.  For a language model the
"transform" is its tokenizer: the characters in id order (``data.tokens=char``), raw bytes, or the run's
byte-level BPE (``data.tokens=bpe``, Hugging Face ``tokenizers`` JSON).

An entry point (``fdg_dist.load_model``, layer 6): nothing below imports it.  Must not train, write files or
need a process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer
from torch import nn

from fdg_dist import models
from fdg_dist.config import ModelConfig
from fdg_dist.data import Normalize
from fdg_dist.run.final_model import METADATA, WEIGHTS
from fdg_dist.util.files import read_json


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


@dataclass(frozen=True)
class Tokenizer:
    """Text → a language model's input ids and back, as the run tokenized its file: ``vocab`` holds the
    characters in id order (``data.tokens=char``), or is None for raw UTF-8 bytes and for BPE (``bpe``: the
    trained tokenizer's JSON)."""

    vocab: tuple[str, ...] | None
    context: int  # the longest sequence the model's position embedding covers
    bpe: str | None = None

    def __call__(self, text: str) -> torch.Tensor:
        """int64 ids of shape (1, len); an unknown character is named (the model has no id for it)."""
        if self.bpe is not None:
            return torch.tensor(HFTokenizer.from_str(self.bpe).encode(text).ids, dtype=torch.int64)[None]
        if self.vocab is None:
            return torch.tensor(list(text.encode()), dtype=torch.int64)[None]
        index = {c: i for i, c in enumerate(self.vocab)}
        missing = sorted({c for c in text if c not in index})
        if missing:
            raise ValueError(f"characters {missing!r} are not in the model's vocabulary of {len(self.vocab)}")
        return torch.tensor([index[c] for c in text], dtype=torch.int64)[None]

    def decode(self, ids: torch.Tensor) -> str:
        """Ids (any shape, read in order) back to text."""
        flat = ids.flatten().tolist()
        if self.bpe is not None:
            return HFTokenizer.from_str(self.bpe).decode(flat)
        if self.vocab is None:
            return bytes(flat).decode(errors="replace")
        return "".join(self.vocab[i] for i in flat)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu", *,
               trust_code: bool = False) -> tuple[nn.Module, Transform | Tokenizer]:
    """The run's final model (unsplit, eval mode, on ``device``) and the transform its inputs need.

    Images: ``logits = model(transform(images).to(device))``; ``transform.classes[logits.argmax(1)]`` names
    the prediction.  Language models: ``logits = model(tokenizer(text).to(device))`` (at most ``context``
    tokens), ``tokenizer.decode(logits[0, -1:].argmax(-1))`` the next character.  Reads ``final_model.pt``
    and ``final_model.json`` of ``run_dir`` (written when a run finishes; a copied model needs both files).

    A ``model=custom`` run is built by calling the function its ``final_model.json`` names: code chosen by
    whoever wrote the directory, so it is refused unless ``trust_code=True`` (as ``trust_remote_code`` in
    other libraries).  Nothing else read from the directory is executed: the weights load with
    ``weights_only=True`` and every other model is one of fdg_dist's or torchvision's builders.
    """
    run_dir = Path(run_dir)
    weights, meta_path = run_dir / WEIGHTS, run_dir / METADATA
    for path in (weights, meta_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a run writes {WEIGHTS} and {METADATA} when it finishes; "
                                    "pass the directory of a finished run")
    meta = read_metadata(meta_path)
    spec = ModelConfig.from_dict(meta["model"]) if isinstance(meta["model"], dict) else ModelConfig(meta["model"])
    if spec.name == "custom" and not trust_code:
        raise ValueError(f"{meta_path}: this model is built by calling {spec._target_!r}, code that the run "
                         "directory names; load_model(..., trust_code=True) imports and runs it: do so only "
                         "for a run directory you trust")
    model = models.build(spec, meta["num_classes"])
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.to(device).eval()
    if "tokens" in meta:
        return model, tokenizer_from(meta)
    return model, Transform(tuple(meta["mean"]), tuple(meta["std"]), meta["image_size"], tuple(meta["classes"]))


def tokenizer_from(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a text run recorded (``final_model.json`` or ``tokenizer.json``)."""
    vocab = meta["vocab"]
    return Tokenizer(tuple(vocab) if vocab is not None else None, meta["context"], meta.get("bpe"))


def read_metadata(path: Path) -> dict[str, Any]:
    """``final_model.json``, or a ValueError naming it and what is wrong (cut short, not this format)."""
    meta = read_json(path, "copy it again from the run directory (a finished run writes it whole)")
    needed = ("model", "num_classes") + (("vocab", "context") if isinstance(meta, dict) and "tokens" in meta
                                         else ("mean", "std", "image_size", "classes"))
    missing = [key for key in needed if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a {METADATA} written by fdg_dist")
    return meta
