"""Language-model metrics where users look (issue 30): bits per character and perplexity in the end-of-run
summary, result.json, the sweep summary and fdg-report; tokens/s and MFU in the console, metrics.jsonl and
TensorBoard.  One RunLog is driven by hand with known losses and seconds, and every record is read back."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import lm_config, write_text

from fdg_dist import models
from fdg_dist.config import ModelConfig
from fdg_dist.engine.executor import EpochResult
from fdg_dist.observe import report, throughput
from fdg_dist.observe.metrics import EpochRecord, RunLog, Stop
from fdg_dist.sweep import sweep_summary
from fdg_dist.validation import validate


def test_flops_per_token_is_six_weights_plus_attention(tmp_path: Path) -> None:
    cfg = lm_config(write_text(tmp_path / "input.txt"))
    cfg.model = ModelConfig("gpt", args={"context": 64, "layers": 4, "width": 128, "heads": 4})
    cfg.data.num_classes, cfg.data.context = 65, 64
    weights = sum(p.numel() for p in models.build(cfg.model, 65).parameters()) - 64 * 128  # no position rows
    assert throughput.flops_per_token(cfg) == 6 * weights + 12 * 4 * 128 * 64
    assert throughput.peak_flops(cfg, torch.device("cpu")) is None  # a CPU's peak is not guessed
    cfg.logging.peak_tflops = 0.5
    assert throughput.peak_flops(cfg, torch.device("cpu")) == 0.5e12 * cfg.world_size


def test_bits_per_char_perplexity_tokens_per_s_and_mfu_reach_every_record(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = lm_config(write_text(tmp_path / "input.txt"), **{"logging.tensorboard": True, "logging.peak_tflops": 0.001})
    validate(cfg)
    run_dir = tmp_path / "sweep" / "0_k=2"
    run_dir.mkdir(parents=True)
    log = RunLog(cfg, run_dir, module=1, replica=0, reporter=True)
    tokens = 9 * 16 * cfg.data.context  # 9 batches of 16 sequences of 16 characters
    train = EpochResult(loss_sum=2.0 * tokens, samples=tokens)
    test = EpochResult(loss_sum=1.5 * 1000, samples=1000)
    with caplog.at_level(logging.INFO, logger="fdg_dist"):
        log.epoch(0, lr=1e-3, train=train, test=test, seconds=2.0, samples=9 * 16, record=EpochRecord(0, torch.device("cpu")),
                  steps=9)
        result = log.finish(wall_s=3.0, best_error=0.5, steps=9, stop=Stop(1, 9, "done"), bounds=[0, 2, 4])
    row = json.loads((run_dir / "metrics.jsonl").read_text())
    flops = throughput.flops_per_token(cfg)
    assert row["tokens_per_s"] == tokens / 2.0
    assert row["mfu"] == pytest.approx(tokens / 2.0 * flops / (0.001e12 * cfg.world_size))
    assert row["test_bpc"] == 1.5 / math.log(2) and row["test_perplexity"] == pytest.approx(math.exp(1.5))
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved == result
    assert (saved["final_test_bpc"], saved["final_test_perplexity"], saved["tokens_per_s"], saved["mfu"],
            saved["tokens"]) == (row["test_bpc"], row["test_perplexity"], row["tokens_per_s"], row["mfu"], "char")
    text = caplog.text
    assert f"{tokens / 2.0:.0f} tokens/s  MFU {100 * row['mfu']:.2f} %" in text  # the epoch line
    assert f"test bits/char final {row['test_bpc']:.3f} (1.500 nats/char), perplexity 4.48" in text  # the summary
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb" / "module1"))
    events.Reload()
    assert [e.value for e in events.Scalars("perf/tokens_per_s")] == [pytest.approx(tokens / 2.0)]
    assert [e.value for e in events.Scalars("perf/mfu")] == [pytest.approx(row["mfu"])]
    assert f"{row['test_bpc']:.3f} bits/char" in sweep_summary(tmp_path / "sweep")
    table = report.report([tmp_path / "sweep"], tmp_path / "report")
    assert "final test bpc (bits/token)" in table and f"| {row['test_bpc']:.2f} split [2] |" in table
