"""GPT dropout (issue 30): ``model.dropout`` drops after the embedding, on the attention weights and on the residual
branches, and ``stash=recompute`` replays a forward's masks exactly: its sent activations, input gradients and
weight gradients equal the stored stash's bit for bit, with other random draws between forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fdg_dist import models
from fdg_dist.config import ModelConfig
from fdg_dist.engine.stage import Stage

GPT = {"context": 16, "layers": 2, "width": 32, "heads": 4}


def _stage(stash: str, dropout: float) -> Stage:
    """The two transformer blocks of a small GPT as module 1 of 3 (it receives activations, sends gradients)."""
    torch.manual_seed(0)
    blocks = models.build_blocks(ModelConfig("gpt", args={**GPT, "dropout": dropout}), 40)
    module = nn.Sequential(*blocks[1:3])
    return Stage(module, 1, 3, torch.optim.SGD(module.parameters(), lr=0.1), None, stash=stash)


def _two_forwards_then_backwards(stage: Stage) -> list[torch.Tensor]:
    """FDG's order on one module: two forwards in flight, other random work, then their backwards."""
    torch.manual_seed(1)
    x = [torch.randn(3, 16, 32) for _ in range(2)]
    g = [torch.randn(3, 16, 32) for _ in range(2)]
    labels = torch.zeros(3, 16, dtype=torch.long)
    outs = [stage.forward(b, x[b], labels, train=True, keep_for_backward=True)[0] for b in range(2)]
    torch.rand(1000)  # the generator moves on before the gradients return
    grads_in = [stage.backward(b, g[b]) for b in range(2)]
    return outs + grads_in + [p.grad for p in stage.module.parameters()]


def test_recompute_equals_the_stored_stash_bitwise_with_dropout() -> None:
    stored = _two_forwards_then_backwards(_stage("weights", 0.2))
    recomputed = _two_forwards_then_backwards(_stage("recompute", 0.2))
    assert len(stored) == len(recomputed)
    for a, b in zip(stored, recomputed, strict=True):
        assert torch.equal(a, b)
    plain = _two_forwards_then_backwards(_stage("weights", 0.0))
    assert not torch.equal(stored[0], plain[0])  # dropout acted on what was sent
    assert not torch.equal(stored[-1], plain[-1])


def test_dropout_places_and_evaluation_is_deterministic() -> None:
    blocks = models.build_blocks(ModelConfig("gpt", args={**GPT, "dropout": 0.5}), 40)
    model = nn.Sequential(*blocks).eval()
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 + 2 * 2 and all(m.p == 0.5 for m in dropouts)  # embedding, then attention and MLP outputs
    assert all(b.attn.dropout == 0.5 for b in blocks[1:3])  # the attention weights' own dropout
    ids = torch.randint(0, 40, (2, 16))
    assert torch.equal(model(ids), model(ids))
    with pytest.raises(ValueError, match=r"model\.dropout=1\.0"):
        models.build_blocks(ModelConfig("gpt", args={**GPT, "dropout": 1.0}), 40)
