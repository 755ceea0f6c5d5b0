"""fdg-sample and fdg_dist.sample (issue 30): deterministic for a seed, from the final model or a checkpoint
(the same weights give the same text), and a briefly trained model's samples are far likelier under it than
chance."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import lm_config, write_text
from test_checkpoint import _fit, world1  # noqa: F401  (world1 is a fixture)

import fdg_dist
from fdg_dist import sampling
from fdg_dist.run import final_model


@pytest.fixture
def trained(world1, tmp_path: Path) -> Path:  # noqa: F811
    """A 2-layer character GPT trained 4 epochs (36 batches, AdamW at 2e-2) on a 40-character text, with checkpoints."""
    text = write_text(tmp_path / "input.txt")
    cfg = lm_config(text, **{"pipeline.k": 1, "trainer.epochs": 4, "checkpoint.enabled": True, "optim.lr": 2e-2,
                             "checkpoint.keep": 4})
    _fit(cfg, world1, tmp_path / "run")
    return tmp_path / "run"


def test_one_seed_one_text_and_a_trained_model_beats_chance(trained: Path) -> None:
    first = fdg_dist.sample(trained, "the ", 120, seed=5)
    assert first == fdg_dist.sample(trained, "the ", 120, seed=5)
    assert first.startswith("the ") and len(first) == 4 + 120
    assert first != fdg_dist.sample(trained, "the ", 120, seed=6)
    model, tokenizer = sampling.load(trained)
    nats = sampling.nats_per_token(model, tokenizer(first), tokenizer.context)
    chance = math.log(len(tokenizer.vocab))  # 3.69 nats for 40 characters
    assert nats < 0.6 * chance, f"{nats:.3f} nats/char under the model, chance is {chance:.3f}"
    greedy = sampling.generate(model, tokenizer, "the ", 30, temperature=0)
    assert torch.equal(greedy, sampling.generate(model, tokenizer, "the ", 30, temperature=0, seed=99))


def test_the_last_checkpoint_samples_as_the_final_model_and_earlier_ones_differ(trained: Path) -> None:
    final = fdg_dist.sample(trained, "the ", 60, seed=1)
    assert sampling.sample(trained, "the ", 60, seed=1, checkpoint="epoch0003") == final
    assert sampling.sample(trained, "the ", 60, seed=1, checkpoint="checkpoints") == final  # the newest
    assert sampling.sample(trained, "the ", 60, seed=1, checkpoint=trained / "checkpoints" / "epoch0000") != final


def test_the_command_prints_the_sample_and_names_what_is_missing(trained: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    sampling.main([str(trained), "--prompt", "the ", "--tokens", "40", "--seed", "5", "--device", "cpu"])
    assert capsys.readouterr().out == fdg_dist.sample(trained, "the ", 40, seed=5) + "\n"
    with pytest.raises(SystemExit) as stop:
        sampling.main([str(tmp_path / "nowhere")])
    assert stop.value.code == 2 and "final_model.pt not found" in capsys.readouterr().err
    (trained / final_model.TOKENIZER).unlink()
    with pytest.raises(SystemExit):
        sampling.main([str(trained), "--checkpoint", "epoch0003"])
    assert "tokenizer.json not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'Z'"):  # a character the text never had
        fdg_dist.sample(trained, "Zebra", 5)
