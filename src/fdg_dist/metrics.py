"""What a run reports: one console line and one ``metrics.jsonl`` line per epoch, ``result.json`` at the end.

Only the reporting rank (the last module of replica 0, which sees the losses) writes these files.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from fdg_dist.config import Config
from fdg_dist.executor import EpochResult, Event

log = logging.getLogger("fdg_dist")


class RunLog:
    def __init__(self, cfg: Config, run_dir: Path, *, module: int, replica: int, reporter: bool) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.module = module
        self.replica = replica
        self.reporter = reporter
        self.metrics_path = run_dir / "metrics.jsonl"
        self.last: dict | None = None

    def best_error(self) -> float:
        """Best test error so far (from metrics.jsonl, so a resumed run remembers it)."""
        best = math.inf
        if self.reporter and self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                best = min(best, json.loads(line)["test_error"])
        return best

    def epoch(self, epoch: int, *, lr: float, train: EpochResult, test: EpochResult, seconds: float,
              samples: int, events: list[Event]) -> None:
        if not self.reporter:
            return
        row = {"epoch": epoch, "lr": lr, "train_loss": train.loss, "train_error": train.error,
               "test_loss": test.loss, "test_error": test.error, "epoch_time_s": seconds,
               "samples_per_s": samples / seconds if seconds > 0 else 0.0}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.last = row
        log.info("epoch %3d  lr %.4g  train loss %.4f err %.2f%%  test loss %.4f err %.2f%%  %.1fs  %.0f samples/s",
                 epoch, lr, train.loss, 100 * train.error, test.loss, 100 * test.error, seconds,
                 row["samples_per_s"])

    def finish(self, *, wall_s: float, best_error: float) -> dict | None:
        if not self.reporter:
            return None
        cfg = self.cfg
        result = {
            "final_test_error": self.last["test_error"] if self.last else None,
            "best_test_error": best_error if math.isfinite(best_error) else None,
            "final_test_loss": self.last["test_loss"] if self.last else None,
            "wall_time_s": wall_s,
            "k": cfg.pipeline.k, "replicas": cfg.pipeline.replicas, "beta": cfg.method.beta,
            "method": cfg.method.name, "model": cfg.model.name, "data": cfg.data.name,
            "seed": cfg.trainer.seed, "epochs": cfg.trainer.epochs, "batch_size": cfg.trainer.batch_size,
        }
        (self.run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return result
