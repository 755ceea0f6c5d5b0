"""The files a finished run leaves for inference: ``final_model.pt`` (the unsplit model's ``state_dict``) and
``final_model.json`` (how to build the model and feed it: its config, the classes or the vocabulary, the
normalisation).  The trainer writes them when a run finishes; ``fdg_dist.load_model`` (``inference``) reads them.
A text run also writes ``tokenizer.json`` at its start, so that its checkpoints can be sampled before it ends.

Must not build or load a model: it only names the files and says what the JSON holds.
"""

from __future__ import annotations

from typing import Any

from fdg_dist.config import Config
from fdg_dist.data import ImageSet, TextSet

WEIGHTS = "final_model.pt"
METADATA = "final_model.json"
TOKENIZER = "tokenizer.json"  # a text run's tokenizer, written at its start: sampling a checkpoint reads it
FORMAT = 2  # 2: "model" is the whole model config (custom, torchvision, gpt, variants); 1: a zoo name


def metadata(cfg: Config, train: ImageSet | TextSet) -> dict[str, Any]:
    """What ``final_model.json`` holds: how to build the model and how to feed it."""
    common = {"format": FORMAT, "model": cfg.model.to_dict(), "num_classes": train.num_classes,
              "data": cfg.data.name}
    if isinstance(train, TextSet):
        return {**common, **tokenizer(cfg, train)}
    return {**common, "classes": list(train.classes), "image_size": cfg.data.image_size, "mean": list(train.mean),
            "std": list(train.std), "input": "RGB, (x/255 - mean)/std per channel, NCHW float32"}


def tokenizer(cfg: Config, train: TextSet, test: TextSet | None = None) -> dict[str, Any]:
    """How a text run turns text into ids and back (``tokenizer.json``, and part of ``final_model.json``);
    with ``test``, the validation text's bytes per token (bits per byte are reported from it)."""
    return {"tokens": cfg.data.tokens, "vocab": train.vocab, "context": cfg.data.context,
            "input": f"int64 token ids (N, T), T <= {cfg.data.context}",
            **({"bpe": train.bpe} if train.bpe is not None else {}),
            **({"val_bytes_per_token": test.bytes_per_token} if test is not None else {})}
