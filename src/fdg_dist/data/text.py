"""Text (``data=text``) as one token stream in memory, cut into sequences of ``data.context`` tokens, each paired
with the same tokens shifted by one (next-token prediction): bytes, the file's characters, or byte-level BPE
tokens (Hugging Face ``tokenizers``, trained on the training part of the file only, deterministically: the same
file gives the same tokenizer in every process and at every resume).

Must not know about batches, pipelines or process groups; only pipeline module 0 reads the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as bpe_models

from fdg_dist.config import DataConfig


@dataclass
class TextSet:
    """A token stream read as sequences of ``context`` tokens: sequence i is tokens [o + iT, o + (i+1)T) and its
    targets the tokens one further, for an epoch's offset o in [0, T) (so training sees every cut)."""

    tokens: torch.Tensor  # uint8 (vocabulary ≤ 256) or int32, one dimension
    context: int
    vocab: list[str] | None  # character-level: the characters, in id order; byte-level and BPE: None
    bpe: str | None = None  # data.tokens=bpe: the trained tokenizer (Hugging Face JSON)
    bpe_vocab: int = 0  # data.tokens=bpe: the vocabulary size the model has (data.vocab_size)
    bytes_per_token: float = 1.0  # UTF-8 bytes of this text per token: bits per byte = bits per token / this

    def __len__(self) -> int:
        """Sequences per epoch, the same for every offset."""
        return max((len(self.tokens) - self.context) // self.context, 0)

    @property
    def num_classes(self) -> int:
        if self.bpe is not None:
            return self.bpe_vocab
        return 256 if self.vocab is None else len(self.vocab)

    def sequences(self, idx: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, next tokens) of sequences ``idx`` at ``offset``, each int64 (len(idx), context)."""
        starts = offset + idx * self.context
        window = self.tokens[starts[:, None] + torch.arange(self.context + 1)].long()
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def text_tokens(cfg: DataConfig) -> tuple[torch.Tensor, list[str] | None]:
    """The file ``data.root`` as token ids, and its vocabulary (None for bytes), checked against the config.

    Character level: the file's distinct characters, sorted, over the whole file (train and validation).
    """
    path = Path(cfg.root) if cfg.root else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"data.root: {cfg.root!r} is not a file; data=text needs data.root to be a text file")
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"data.root: {cfg.root!r} is empty; data=text trains on the text of that file")
    if cfg.tokens == "byte":
        ids, vocab = torch.frombuffer(bytearray(raw), dtype=torch.uint8), None
        size = 256
    else:
        try:
            codes = np.frombuffer(raw.decode("utf-8").encode("utf-32-le"), dtype=np.uint32)
        except UnicodeDecodeError as e:
            raise ValueError(f"data.root: {cfg.root!r} is not UTF-8 text ({e}); use data.tokens=byte") from None
        points, inverse = np.unique(codes, return_inverse=True)
        vocab = [chr(c) for c in points]
        size = len(vocab)
        ids = torch.from_numpy(inverse.astype(np.uint8 if size <= 256 else np.int32))
    if cfg.num_classes != size:
        what = "bytes" if vocab is None else f"distinct characters in {path.name}"
        raise ValueError(f"data.num_classes={cfg.num_classes} but the vocabulary is {size} {what}; "
                         f"set data.num_classes={size}")
    return ids, vocab


def bpe_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2's kind: every byte is a token, merges learned on ``text``) of ``vocab_size`` tokens."""
    tokenizer = Tokenizer(bpe_models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def bpe_parts(cfg: DataConfig) -> tuple[list[torch.Tensor], str, list[float]]:
    """data.tokens=bpe: the training and validation text (cut by characters) as ids of a BPE trained on the
    training text only; the tokenizer's JSON; each part's UTF-8 bytes per token."""
    path = Path(cfg.root) if cfg.root else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"data.root: {cfg.root!r} is not a file; data=text needs data.root to be a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data.root: {cfg.root!r} is not UTF-8 text ({e}); use data.tokens=byte") from None
    cut = int(len(text) * (1 - cfg.val_fraction))
    tokenizer = bpe_tokenizer(text[:cut], cfg.vocab_size)
    parts, ratios = [], []
    for part in (text[:cut], text[cut:]):
        ids = tokenizer.encode(part).ids
        parts.append(torch.tensor(ids, dtype=torch.int32))
        ratios.append(len(part.encode()) / max(len(ids), 1))
    return parts, tokenizer.to_str(), ratios


def load_text(cfg: DataConfig) -> tuple[TextSet, TextSet]:
    """The first (1 - val_fraction) of the file trains, the rest validates (file order, no shuffling);
    ``train_subset``/``test_subset`` keep the first N sequences of each."""
    bpe: str | None = None
    if cfg.tokens == "bpe":
        parts, bpe, ratios = bpe_parts(cfg)
        vocab = None
    else:
        ids, vocab = text_tokens(cfg)
        cut = int(len(ids) * (1 - cfg.val_fraction))
        parts, ratios = [ids[:cut], ids[cut:]], [1.0, 1.0]
    sets = []
    for part, subset, split, ratio in zip(parts, (cfg.train_subset, cfg.test_subset), ("training", "validation"),
                                          ratios, strict=True):
        if subset is not None:
            part = part[:(subset + 1) * cfg.context]
        text = TextSet(part.clone(), cfg.context, vocab, bpe, cfg.vocab_size or 0, ratio)
        if len(text) < 1:
            raise ValueError(f"data.context={cfg.context}: the {split} text ({len(part)} tokens of {cfg.root}) holds "
                             f"no sequence of that length plus one; lower data.context or data.val_fraction")
        sets.append(text)
    return sets[0], sets[1]
