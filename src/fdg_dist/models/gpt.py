"""A GPT-style decoder as blocks: token + position embedding, N pre-LN transformer blocks, final norm and head.

Block 0 takes int64 tokens (N, T) and every later boundary carries a (N, T, width) activation, so any
split point sends (batch, context, width) on the wire.  The head is not tied to the token embedding
(GPT-2 ties them): tied weights could not live on two pipeline modules.  ``dropout`` (default 0) drops as
GPT-2 does: after the embedding, on the attention weights, and on each residual branch's output.  Dropout
draws from the process's generator, so ``stash=recompute`` replays a forward exactly (the stage keeps the
generator's state with the stash), but runs that split the model differently draw different masks.

Must not know pipelines, splits or process groups: it only builds blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INIT_STD = 0.02  # GPT-2's initialisation


class Embedding(nn.Module):
    """Tokens (N, T) → token embedding + learned position embedding (N, T, width)."""

    def __init__(self, vocab: int, context: int, width: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.tokens(idx) + self.positions(positions))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions ≤ t (scaled_dot_product_attention)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        q, k, v = (y.view(n, t, self.heads, c // self.heads).transpose(1, 2) for y in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.proj(y.transpose(1, 2).reshape(n, t, c)))


class TransformerBlock(nn.Module):
    """Pre-LN residual block: x + attention(LN(x)), then x + MLP(LN(x)) with a 4x wide GELU MLP."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm and the projection to next-token logits (N, T, vocab)."""

    def __init__(self, width: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.ln(x))


def gpt_blocks(num_classes: int, *, context: int, layers: int = 4, width: int = 128, heads: int = 4,
               dropout: float = 0.0) -> list[nn.Module]:
    """Embedding, ``layers`` transformer blocks, head; ``num_classes`` is the vocabulary size; ``dropout`` the
    probability of every dropout (GPT-2's places).

    GPT-2 initialisation: N(0, 0.02) for embeddings and linear layers, the two residual projections of
    each block scaled by 1/sqrt(2·layers) so the residual stream's variance does not grow with depth.
    """
    if width % heads:
        raise ValueError(f"model.width={width} must be divisible by model.heads={heads}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
    blocks: list[nn.Module] = [Embedding(num_classes, context, width, dropout),
                               *(TransformerBlock(width, heads, dropout) for _ in range(layers)),
                               Head(width, num_classes)]
    for block in blocks:
        for m in block.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=INIT_STD)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if isinstance(block, TransformerBlock):
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=INIT_STD / math.sqrt(2 * layers))
    return blocks
