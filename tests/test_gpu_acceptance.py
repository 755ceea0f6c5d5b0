"""The GPU acceptance script runs end to end (on the CPU over gloo: ``--cpu-dry-run``), so the one
command a GPU owner runs is not broken code; on a GPU machine it runs over NCCL instead."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_the_acceptance_script_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "acceptance"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_acceptance.py"), "--cpu-dry-run",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "acceptance.json").read_text())
    smoke = results["smoke"]
    assert [r["k"] for r in smoke] == [2, 2] and all(r["ok"] for r in smoke)
    assert smoke[0]["weight_distance"] == 0.0  # gloo against gloo: the same run
    assert [b["model"] for b in results["benchmark"]] == ["tiny"] and results["benchmark"][0]["ok"]
    md = (out / "acceptance.md").read_text()
    assert "| fdg fp32 | 2 |" in md and "| fdg trainer.precision=bf16 trainer.channels_last=true | 2 |" in md
    assert "fdg" in results["benchmark"][0]["table"]
