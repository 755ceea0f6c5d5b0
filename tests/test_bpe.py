"""Byte-level BPE (issue 30): ``data.tokens=bpe data.vocab_size=N`` learns its merges on the training text only,
is kept in the run directory, and a BPE run trains, reports bits per byte, samples and resumes bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_same_weights, final_state, lm_config, write_text
from test_checkpoint import _fit, world1  # noqa: F401  (world1 is a fixture)

import fdg_dist
from fdg_dist import data, inference
from fdg_dist.config import Config, ConfigError
from fdg_dist.data.text import bpe_tokenizer
from fdg_dist.run import checkpoint
from fdg_dist.validation import validate

VOCAB = 300


def _bpe_config(text: Path, **kw: object) -> Config:
    return lm_config(text, **{"data.tokens": "bpe", "data.vocab_size": VOCAB, "data.num_classes": VOCAB,
                              "pipeline.k": 1, "checkpoint.enabled": True, **kw})


def test_bpe_is_learned_on_the_training_text_and_reads_it_back(tmp_path: Path) -> None:
    path = write_text(tmp_path / "input.txt")
    cfg = _bpe_config(path)
    validate(cfg)
    train, val = data.load(cfg.data, 0)
    text = path.read_text()
    cut = int(len(text) * (1 - cfg.data.val_fraction))
    assert train.bpe == val.bpe == bpe_tokenizer(text[:cut], VOCAB).to_str()  # the training part only
    assert train.num_classes == VOCAB and train.bytes_per_token > 1.5  # merges: several bytes per token
    tokenizer = inference.tokenizer_from({"vocab": None, "context": 16, "bpe": train.bpe})
    assert tokenizer.decode(train.tokens) == text[:cut] and tokenizer.decode(val.tokens) == text[cut:]
    assert Config.from_dict({"data": {"name": "text", "tokens": "bpe", "vocab_size": 400}}).data.num_classes == 400
    for size in (256, None):  # a vocabulary of bytes only, or none given
        cfg.data.vocab_size = size
        with pytest.raises(ConfigError, match=rf"data\.vocab_size: {size} must be > 256"):
            validate(cfg)


def test_a_bpe_run_reports_bits_per_byte_samples_and_resumes_bitwise(world1, tmp_path: Path,  # noqa: F811
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _bpe_config(write_text(tmp_path / "input.txt"))
    cfg.resume = "auto"
    straight = tmp_path / "straight"
    _fit(cfg, world1, straight)
    result = json.loads((straight / "result.json").read_text())
    record = json.loads((straight / "tokenizer.json").read_text())
    assert record["tokens"] == "bpe" and record["bpe"] == json.loads((straight / "final_model.json").read_text())["bpe"]
    assert result["final_test_bits_per_byte"] == pytest.approx(result["final_test_bpc"] / record["val_bytes_per_token"])
    sample = fdg_dist.sample(straight, "the king", 20, seed=3)
    assert sample.startswith("the king") and sample == fdg_dist.sample(straight, "the king", 20, seed=3,
                                                                        checkpoint="checkpoints")
    save = checkpoint.save

    def save_then_die(*args: object) -> None:
        save(*args)
        raise RuntimeError("killed after the checkpoint")

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(cfg, world1, resumed)
    monkeypatch.setattr(checkpoint, "save", save)
    _fit(cfg, world1, resumed)  # the tokenizer is learned again, the same
    assert_same_weights(final_state(resumed), final_state(straight))
    assert (resumed / "tokenizer.json").read_text() == (straight / "tokenizer.json").read_text()
