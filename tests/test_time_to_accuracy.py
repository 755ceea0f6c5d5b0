"""The time-to-accuracy benchmark reads each run's test error per epoch against its cumulative training time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark is a script directory, not a package
import time_to_accuracy  # noqa: E402


def _fake(out: Path, name: str, epochs: list[tuple[float, float]]) -> None:
    run = out / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i, "test_error": e, "epoch_time_s": s}) + "\n"
                                               for i, (s, e) in enumerate(epochs)))


def test_time_to_bp_final_error_and_error_at_bp_time(tmp_path: Path) -> None:
    _fake(tmp_path, "bp_2threads", [(100, 0.5), (100, 0.4), (100, 0.3)])  # target 0.3 after 300 s
    _fake(tmp_path, "fdg_k2", [(60, 0.45), (60, 0.35), (60, 0.3), (60, 0.28)])  # reaches it at 180 s
    _fake(tmp_path, "dp_2replicas", [(80, 0.5), (80, 0.45), (80, 0.4), (80, 0.35)])  # never; 0.4 at 240 s ≤ 300 s
    runs = {name: {"reused": True} for name in ("bp_2threads", "fdg_k2", "dp_2replicas")}
    table, data = time_to_accuracy.summarise(runs, tmp_path)
    assert data["target_error"] == 0.3
    fdg, dp, bp = (data["runs"][n] for n in ("fdg_k2", "dp_2replicas", "bp_2threads"))
    assert (fdg["time_to_bp_final_s"], fdg["speedup_to_accuracy"], fdg["error_at_bp_time"]) == (180, 300 / 180, 0.28)
    assert (dp["time_to_bp_final_s"], dp["speedup_to_accuracy"], dp["error_at_bp_time"]) == (None, None, 0.4)
    assert (bp["time_to_bp_final_s"], bp["speedup_to_accuracy"]) == (300, 1.0)
    assert "| fdg_k2 | 28.00 | 240 | 180 (1.67×) | 28.00 | 45.00 @ 60s → 35.00 @ 120s → 30.00 @ 180s → 28.00 @ 240s |" \
        in table
    assert "| dp_2replicas | 35.00 | 320 | not reached | 40.00 |" in table


@pytest.mark.long  # three short trainings in fresh processes
def test_the_script_trains_the_three_and_writes_its_table(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / "time_to_accuracy.py"), "--out", str(tmp_path), "--preset", "quick_synthetic", "--fdg-train", f"{sys.executable} -m fdg_dist.train",
           "--fdg", "optim.spike_compensation=true", "--", "data.train_size=128", "data.test_size=32",
           "trainer.batch_size=16", "pipeline.cost=flops", "trainer.channels_last=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    assert set(data["runs"]) == {"bp_2threads", "dp_2replicas", "fdg_k2"}
    assert all(len(r["epochs"]) == 2 and not r["reused"] for r in data["runs"].values())
    assert json.loads((tmp_path / "fdg_k2" / "result.json").read_text())["options"] == ["spike"]
