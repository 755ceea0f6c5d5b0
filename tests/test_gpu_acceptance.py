"""The GPU acceptance script runs end to end (on the CPU over gloo: ``--cpu-dry-run``), so the one
command a GPU owner runs is not broken code; on a GPU machine it runs over NCCL instead.  Its budget is
kept: what would not fit is skipped and named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

SCRIPT = str(REPO / "benchmarks" / "gpu_acceptance.py")


def test_what_does_not_fit_the_budget_is_skipped_and_named(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu-dry-run", "--budget-s", "0", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]  # nothing ran: neither a pass nor a failure
    results = json.loads((tmp_path / "acceptance.json").read_text())
    assert results["checks"] == []
    assert [s.split(" ")[0] for s in results["skipped"]] == ["versions", "pipeline", "serialised", "serialised",
                                                             "kill", "overhead", *["fabric"] * 6]
    assert "Skipped: kill SIGKILL of module 1 at K=2: needs ~45 s" in (tmp_path / "acceptance.md").read_text()


def test_the_in_process_checks_run_on_the_cpu_in_seconds(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu-dry-run", "--only", "versions", "overhead", "fabric",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "acceptance.json").read_text())
    checks = results["checks"]
    assert [(c["check"], c.get("method")) for c in checks] == [("overhead", None), *[("fabric", m) for m in
                                                               ["fdg", "bp", "ddg", "fr", "dgl", "adl"]]]
    assert all(c["distance"] == 0.0 for c in checks[1:])  # the CPU against the CPU: the same pipeline
    assert checks[0]["engine"]["wall_ms"] > 0 and checks[0]["ratio"] > 0 and results["skipped"] == []
    assert results["versions"]["torch"] == torch.__version__
    assert "| fabric | 2 | adl | 0.0e+00 |" in (tmp_path / "acceptance.md").read_text()


@pytest.mark.long
@pytest.mark.timeout(900)
def test_the_acceptance_script_runs_every_check_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "acceptance"
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu-dry-run", "--budget-s", "840", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "acceptance.json").read_text())
    checks = results["checks"]
    assert [c["check"] for c in checks] == ["pipeline", "serialised", "serialised", "kill", "overhead",
                                            *["fabric"] * 6] and results["skipped"] == []
    assert checks[0]["distance"] == 0.0  # gloo against gloo: the same run
    assert all(c["distance"] == 0.0 for c in checks if c["check"] == "fabric")  # CPU against CPU
    kill = checks[3]
    assert kill["named"] and kill["ended_s"] <= 30 + 10, kill
    assert checks[4]["engine"]["wall_ms"] > 0 and checks[4]["ratio"] > 0
    md = (out / "acceptance.md").read_text()
    assert "| pipeline | 2 |" in md and "| serialised | 2 | CUDA_DEVICE_MAX_CONNECTIONS=1 |" in md
