"""The training loss and error count of every model: one label per sample (N, C) or per token (N, T, V).

One definition for the stages, the reference simulation and the tests, so a language model is trained
and checked with the same arithmetic as an image classifier: the mean cross-entropy over every
predicted label, and errors counted per label (a token-level error rate for language models).

Must not know models, stages or the schedule: logits and labels in, sums out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all labels; logits (..., classes), labels of the leading shape."""
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten())


def errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many labels the arg-max prediction misses (an int64 device tensor: no host sync)."""
    return (logits.argmax(dim=-1) != labels).sum()


def bits(nats: float) -> float:
    """A loss in nats per token in bits per token: bits per character for character- and byte-level text."""
    return nats / math.log(2)
