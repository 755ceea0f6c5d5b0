"""Decoder-only language models on text (issue 19): data, every method's equality, the per-batch LR
schedule, bits per character in the run's records, and the GPU path's rules for (N, T) token batches.

The equality tests run a 2-layer GPT on a small generated text through the emulated fabric (every module
a thread, NCCL's rules enforced) and compare with the single-process references bit for bit, with AdamW
and the per-batch warm-up + cosine schedule; one run goes through the real launcher.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_weights,
    data_parallel_reference,
    final_state,
    lm_config,
    reference_state,
    run_pipeline,
    write_text,
)
from emulated import merged_state, run_emulated
from test_checkpoint import _fit, world1  # noqa: F401  (world1 is a fixture)
from torch import nn

import fdg_dist
from fdg_dist import data, models
from fdg_dist.config import ConfigError, DataConfig, ModelConfig, OptimConfig, SchedConfig
from fdg_dist.engine import loss, optim
from fdg_dist.engine.stage import Stage
from fdg_dist.run import checkpoint
from fdg_dist.run.trainer import split_table
from fdg_dist.validation import validate

METHODS = ["fdg", "bp", "ddg", "fr", "dgl", "adl"]


@pytest.fixture
def text(tmp_path: Path) -> Path:
    return write_text(tmp_path / "input.txt")


def _cfg(text: Path, method: str, K: int, **kw: object):
    extra: dict[str, object] = {"method.accum_steps": 3} if method == "adl" else {}
    if method == "fdg":
        extra["method.beta"] = 0.7
    # 9 batches, then 1: two drains crossed, the second after a cut epoch
    return lm_config(text, **{"method.name": method, "pipeline.k": K, "trainer.max_steps": 10, **extra, **kw})


# ------------------------------------------------------------------------------------------------- data
def test_text_is_split_in_file_order_and_read_as_shifted_sequences(text: Path) -> None:
    cfg = DataConfig(name="text", root=str(text), tokens="char", num_classes=40, context=16)
    train, test = data.load(cfg, 0)
    ids, vocab = data.text_tokens(cfg)
    source = text.read_text()
    assert "".join(vocab[i] for i in ids.tolist()) == source and vocab == sorted(set(source))
    cut = int(len(source) * 0.9)  # the first 90 % trains, the rest validates, in file order
    assert torch.equal(train.tokens, ids[:cut]) and torch.equal(test.tokens, ids[cut:])
    assert len(train) == (cut - 16) // 16 and len(test) == (len(source) - cut - 16) // 16

    def decode(t: torch.Tensor) -> str:
        return "".join(vocab[i] for i in t.tolist())

    loader = data.Batches(train, 8, train=True, augment=False, seed=0)
    offsets = set()
    for epoch in range(4):
        x, y = next(loader.epoch(epoch))
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        offsets.add(source.index(decode(x[0]) + decode(y[0, -1:])) % 16)  # where the epoch cuts the stream
    assert len(offsets) > 1, "every epoch cuts the text at the same offset"
    x, y = next(data.Batches(test, 4, train=False, augment=False, seed=0).epoch(0))
    assert decode(x[0]) == source[cut:cut + 16] and decode(x[1]) == source[cut + 16:cut + 32]  # in order, offset 0
    again = next(data.Batches(train, 8, train=True, augment=False, seed=0).epoch(3))
    assert torch.equal(again[0], next(loader.epoch(3))[0])  # (seed, epoch) decide the batch


def test_byte_level_reads_any_file_and_vocabulary_mismatches_name_the_key(text: Path, tmp_path: Path) -> None:
    byte = DataConfig(name="text", root=str(text), tokens="byte", num_classes=256, context=16)
    train, _ = data.load(byte, 0)
    assert train.num_classes == 256 and bytes(train.tokens[:20].tolist()) == text.read_bytes()[:20]
    with pytest.raises(ValueError, match=r"data\.num_classes=40"):
        data.load(DataConfig(name="text", root=str(text), tokens="char", num_classes=65, context=16), 0)
    cfg = lm_config(text)
    cfg.data.num_classes = 65
    with pytest.raises(ConfigError, match=r"data\.num_classes=40"):
        validate(cfg)
    cfg = lm_config(text, **{"data.root": str(tmp_path / "missing.txt")})
    with pytest.raises(ConfigError, match=r"data\.root"):
        validate(cfg)
    cfg = lm_config(text, **{"data.context": 2000})  # longer than the validation text
    with pytest.raises(ConfigError, match=r"data\.context"):
        validate(cfg)
    cfg = lm_config(text, **{"data.name": "synthetic"})
    cfg.data.num_classes = 10
    with pytest.raises(ConfigError, match=r"model\.name: gpt is a language model"):
        validate(cfg)


# ------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_text_equals_its_reference(text: Path, method: str, K: int) -> None:
    """Weights bitwise; the last evaluation's summed loss equals the unsplit model's on the validation text."""
    cfg = _cfg(text, method, K)
    runs = run_emulated(cfg)
    state = merged_state(runs)
    want = data_parallel_reference(cfg, replicas=1) if method == "bp" else reference_state(cfg)
    assert_same_weights(state, want)
    model = models.build(cfg.model, cfg.data.num_classes)
    model.load_state_dict(state)
    model.eval()
    _, test_set = data.load(cfg.data, cfg.trainer.seed)
    total = torch.zeros(())
    with torch.no_grad():
        for x, y in data.Batches(test_set, cfg.trainer.eval_batch_size, train=False, augment=False, seed=0).epoch(0):
            total += loss.cross_entropy(model(x), y) * y.numel()
    assert torch.equal(runs[-1].evals[-1].loss_sum, total)
    assert runs[-1].evals[-1].samples == len(test_set) * cfg.data.context  # counted per token


def test_bp_with_two_modules_equals_one_module_bitwise(text: Path) -> None:
    one = merged_state(run_emulated(_cfg(text, "bp", 1), evaluate=False))
    two = merged_state(run_emulated(_cfg(text, "bp", 2), evaluate=False))
    assert_same_weights(two, one)


def test_recompute_on_text_equals_its_reference(text: Path) -> None:
    cfg = _cfg(text, "fdg", 3, **{"method.stash": "recompute"})
    assert_same_weights(merged_state(run_emulated(cfg, evaluate=False)), reference_state(cfg))


def test_steady_state_with_token_batches_reads_no_device_value(text: Path) -> None:
    """(N, T) int64 tokens and (N, T) targets on the meta device through every module: nothing is read."""
    cfg = _cfg(text, "fdg", 3)
    T = cfg.data.context

    def batches(epoch: int, train: bool):
        for n in [16] * 8 + [6] if train else [14]:
            yield torch.empty(n, T, dtype=torch.int64, device="meta"), torch.empty(n, T, dtype=torch.int64,
                                                                                  device="meta")

    runs = run_emulated(cfg, device="meta", batches=batches)
    assert runs[-1].train[-1].loss_sum.device.type == "meta" and all(r.stage.steps > 0 for r in runs)
    assert runs[0].executor.boundary.out_shape == (T, 16) and runs[0].executor.boundary.label_shape == (T,)


# ------------------------------------------------------------------------------------- LR per batch
def test_step_cosine_warms_up_then_decays_to_the_floor() -> None:
    cfg = SchedConfig(name="step_cosine", warmup_steps=4, min_lr_ratio=0.1)
    f = [optim.step_factor(cfg, b, 20) for b in range(22)]
    assert f[:4] == [0.2, 0.4, 0.6, 0.8] and f[4] == 1.0
    assert all(a > b for a, b in zip(f[4:20], f[5:20])) and f[12] == pytest.approx(0.55)
    assert f[20] == f[21] == pytest.approx(0.1)


def test_per_batch_lr_counts_batches_so_adl_and_fdg_agree(text: Path) -> None:
    """adl steps once per 3 batches, fdg once per batch; both end every module at the LR of the run's last
    batch, and each adl step used the LR of its first batch."""
    for method in ("fdg", "adl"):
        runs = run_emulated(_cfg(text, method, 2), evaluate=False)
        assert [r.stage.optimizer.param_groups[0]["lr"] for r in runs] == [pytest.approx(3e-3 * 0.1)] * 2
    p = nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([p], lr=1.0)
    schedule = optim.build_scheduler(SchedConfig(name="step_cosine", warmup_steps=4), opt, 1, total_batches=10)
    seen = []
    for applied in (3, 3, 3, 1):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.advance(applied)
        schedule.step()  # an epoch end does not move a per-batch schedule
    # positions 0, 3, 6, 9: warm-up (b+1)/5, then cosine over the 6 batches left
    assert seen == pytest.approx([0.2, 0.8, 0.75, 0.5 * (1 + math.cos(5 * math.pi / 6))])


def test_adamw_decays_matrices_only() -> None:
    gpt = ModelConfig("gpt", args={"context": 16, "layers": 1, "width": 16, "heads": 2})
    block = models.build_blocks(gpt, 40)[1]
    opt = optim.build_optimizer(OptimConfig(name="adamw", weight_decay=0.1), block.parameters())
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and {p.dim() for p in plain["params"]} == {1}  # biases, LayerNorm


# ----------------------------------------------------------------------------------- stage behaviour
def test_recompute_replays_the_forwards_random_numbers() -> None:
    """With dropout inside a module, the replayed forward draws the same mask as the forward whose output was
    sent on, so the gradient is that of the activation the next module received."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    stage = Stage(module, 0, 2, torch.optim.SGD(module.parameters(), lr=0.1), None, stash="recompute")
    x = torch.randn(4, 8)
    out, _, _ = stage.forward(0, x, torch.zeros(4, dtype=torch.long), train=True, keep_for_backward=True)
    torch.rand(100)  # other work moves the generator on before the gradient returns
    stage.backward(0, torch.ones_like(out))
    mask = (out != 0).float()  # where the forward's dropout kept units
    want = (2 * mask).t() @ x  # d(sum(dropout(xW^T + b)))/dW with the forward's mask, scale 1/(1-p) = 2
    torch.testing.assert_close(module[0].weight.grad, want)


# ------------------------------------------------------------------------------------------ reporting
def test_split_table_shows_batch_context_width_on_the_wire(text: Path) -> None:
    cfg = lm_config(text, **{"pipeline.k": 2})
    table = split_table(cfg, [0, 2, 4])
    assert "(16, 16, 16)" in table  # (batch, context, width) sent by module 0
    assert "(16, 16, 40)" in table  # the head's logits per token
    assert "Embedding" not in table and "0 .. 1" in table and "2 .. 3" in table


def test_measured_split_times_token_inputs() -> None:
    """pipeline.cost=time feeds block 0 integer tokens (a float input would fail the embedding)."""
    from fdg_dist.split import partition

    blocks = models.build_blocks(ModelConfig("gpt", args={"context": 16, "layers": 2, "width": 16, "heads": 2}), 40)
    seconds = partition.measured_block_costs(blocks, (4, 16), torch.device("cpu"), repeats=1, warmup=0,
                                             dtype=torch.int64)
    assert len(seconds) == 4 and all(s > 0 for s in seconds)


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_pipeline_on_text_equals_reference_and_reports_bits_per_char(text: Path, run_dir: Path) -> None:
    """fdg K=2 through the real launcher: bitwise the reference; metrics.jsonl, result.json and TensorBoard
    carry bits per character and perplexity; the log's split table shows (batch, context, width)."""
    cfg = _cfg(text, "fdg", 2, **{"logging.tensorboard": True, "logging.trace": True, "checkpoint.enabled": True})
    result = run_pipeline(cfg, run_dir)
    reference = reference_state(cfg)
    assert_same_weights(final_state(run_dir), reference)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["test_bpc"] == pytest.approx(row["test_loss"] / math.log(2))
        assert row["train_bpc"] == pytest.approx(row["train_loss"] / math.log(2))
        assert row["test_perplexity"] == pytest.approx(math.exp(row["test_loss"]))
    assert result is not None and result["final_test_bpc"] == rows[-1]["test_bpc"]
    log = (run_dir / "train.log").read_text()
    assert "(16, 16, 16)" in log and "bits/char train" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb" / "module1"))
    events.Reload()
    assert {"train/bpc", "test/bpc", "test/perplexity"} <= set(events.Tags()["scalars"])
    # the exported model and its tokenizer: the run's own validation loss on the last validation sequence
    model, tokenizer = fdg_dist.load_model(run_dir)
    _, val = data.load(cfg.data, cfg.trainer.seed)
    ids, targets = val.sequences(torch.tensor([len(val) - 1]), 0)
    assert torch.equal(tokenizer(tokenizer.decode(ids)), ids) and tokenizer.context == cfg.data.context
    with torch.no_grad():
        got = loss.cross_entropy(model(ids), targets)
    simulated = models.build(cfg.model, cfg.data.num_classes)
    simulated.load_state_dict(reference)
    with torch.no_grad():
        assert torch.equal(got, loss.cross_entropy(simulated.eval()(ids), targets))
    # its last checkpoint joins the two modules' weights into the final model: the same sample
    assert fdg_dist.sample(run_dir, "the ", 30, checkpoint="checkpoints") == fdg_dist.sample(run_dir, "the ", 30)


SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="tinyshakespeare is not in ../shared/data")
def test_shakespeare_preset_is_what_readme_says() -> None:
    """The preset composes and validates on the real corpus (65 characters); its model and data as documented."""
    from hydra import compose, initialize_config_dir

    from fdg_dist.cli import config_from_hydra

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = config_from_hydra(compose("train", overrides=["experiment=shakespeare_char_gpt",
                                                            f"data.root={SHAKESPEARE}"]))
    validate(cfg)
    assert (cfg.model.name, cfg.model.args) == ("gpt", {"layers": 4, "width": 128, "heads": 4, "dropout": 0.0,
                                                     "context": 64})
    assert (cfg.data.tokens, cfg.data.num_classes, cfg.data.context, cfg.pipeline.k) == ("char", 65, 64, 2)
    assert (cfg.optim.name, cfg.optim.lr, cfg.sched.name, cfg.method.name) == ("adamw", 2e-3, "step_cosine", "fdg")
    train, _ = data.load(cfg.data, 0)
    assert len(train) // cfg.trainer.batch_size + 1 == 491  # batches per epoch, as the preset's comment says
    assert sum(p.numel() for p in models.build(cfg.model, 65).parameters()) == 818_176


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="tinyshakespeare is not in ../shared/data")
def test_nanogpt_cpu_preset_is_their_recipe() -> None:
    """experiment=shakespeare_char_cpu: nanoGPT's CPU recipe (its README), and 2,000 batches of 12 as the run."""
    from hydra import compose, initialize_config_dir

    from fdg_dist.cli import config_from_hydra

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = config_from_hydra(compose("train", overrides=["experiment=shakespeare_char_cpu",
                                                            f"data.root={SHAKESPEARE}", "method=bp", "pipeline.k=1"]))
    validate(cfg)
    assert cfg.model.args == {"layers": 4, "width": 128, "heads": 4, "dropout": 0.0, "context": 64}
    assert (cfg.data.tokens, cfg.data.context, cfg.data.val_fraction, cfg.trainer.batch_size) == ("char", 64, 0.1, 12)
    o, s = cfg.optim, cfg.sched
    assert (o.name, o.lr, o.betas, o.weight_decay, o.clip_norm) == ("adamw", 1e-3, (0.9, 0.99), 0.1, 1.0)
    assert (s.name, s.warmup_steps, s.min_lr_ratio) == ("step_cosine", 100, 0.1)  # cosine to 1e-4
    train, _ = data.load(cfg.data, 0)
    assert cfg.trainer.max_steps == 2000 < cfg.trainer.epochs * (len(train) // 12 + 1)  # max_steps ends the run


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_data_parallel_on_text_equals_full_batch_training(text: Path, run_dir: Path) -> None:
    """method=dp: two replicas of the whole GPT, 8 of every 16 sequences each, mean gradient (bitwise the
    unsplit model on whole batches for two replicas; the GPT has no batch statistics)."""
    cfg = lm_config(text, **{"method.name": "dp", "pipeline.k": 2, "trainer.max_steps": 4})
    run_pipeline(cfg, run_dir)
    assert_same_weights(final_state(run_dir), data_parallel_reference(cfg, replicas=2))


def test_resume_continues_the_per_batch_schedule_bitwise(world1, text: Path, tmp_path: Path,  # noqa: F811
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that dies right after its first epoch's checkpoint and is started again ends equal to one that
    never stopped: the per-batch LR schedule resumes at its batch, AdamW's moments and the text's epoch
    offsets with it."""
    cfg = lm_config(text, **{"pipeline.k": 1, "checkpoint.enabled": True})
    cfg.resume = "auto"
    _fit(cfg, world1, tmp_path / "straight")
    save = checkpoint.save

    def save_then_die(*args: object) -> None:
        save(*args)
        raise RuntimeError("killed after the checkpoint")

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(cfg, world1, tmp_path / "resumed")
    monkeypatch.setattr(checkpoint, "save", save)
    _fit(cfg, world1, tmp_path / "resumed")
    assert_same_weights(final_state(tmp_path / "resumed"), final_state(tmp_path / "straight"))
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["lr"] == pytest.approx(3e-4)
