"""The throughput benchmark runs every variant end to end and writes the JSON interface scripts read.

Not a speed test (numbers on a shared CI box mean nothing): it checks that each variant trains and is
measured. A torch-pipelining stage that never trains (for example one built without a loss function,
which then posts no gradient receives) hangs or fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark is a script directory, not a package
import throughput  # noqa: E402

K = 2
# the eight variants in three benchmark runs, so that each run fits its test's 300 s on a loaded machine
# (one run of all eight did not); the baseline runs with the first group only
GROUPS = {"single": ("bp_single_1thread", "bp_single_allthreads", "fdg"), "engine": ("ddg", "bp", "dp"),
          "pipelining": ("gpipe", "1f1b")}


@pytest.fixture(scope="module", params=list(GROUPS))
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "out.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--model", "tiny", "--k", str(K),
           "--batch-size", "16", "--train-size", "64", "--epochs", "2", "--warmup", "1", "--micro-batches", "2",
           "--channels-last", "--timeout", "240", "--json", str(out), "--methods", *GROUPS[request.param]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_variant_is_measured_with_the_documented_keys(results: dict) -> None:
    rows = results["results"]
    assert tuple(rows) in GROUPS.values()
    base = rows.get("bp_single_1thread", {}).get("samples_per_s")
    for name, row in rows.items():
        assert row["samples_per_s"] > 0, name
        assert row["repeats_samples_per_s"] == [row["samples_per_s"]], name
        ranks = 1 if name.startswith("bp_single") else K
        assert len(row["peak_mem_mb"]) == ranks and all(m > 0 for m in row["peak_mem_mb"]), name
        if base is None:  # no baseline measured in this run: no speedup to report
            assert row["speedup_vs_bp_1thread"] is None, name
        else:
            assert row["speedup_vs_bp_1thread"] == pytest.approx(row["samples_per_s"] / base), name
    if "bp_single_allthreads" in rows:
        assert rows["bp_single_allthreads"]["threads_per_rank"] == K


@pytest.mark.parametrize("results", ["pipelining"], indirect=True)
def test_pipelining_rows_name_their_micro_batches_and_share_the_split(results: dict) -> None:
    bounds = results["config"]["bounds"]
    for name in ("gpipe", "1f1b"):
        row = results["results"][name]
        assert row["micro_batches"] == 2 and row["by_micro_batches"] == {"2": row["samples_per_s"]}
        assert row["bounds"] == bounds and len(row["busy"]) == K


def test_repeats_report_the_median_run_whole_and_a_failure_wins() -> None:
    runs = [{"samples_per_s": v, "peak_mem_mb": [v]} for v in (3.0, 1.0, 2.0, 4.0)]
    assert throughput.median_run(runs) == {"samples_per_s": 2.0, "peak_mem_mb": [2.0],
                                           "repeats_samples_per_s": [3.0, 1.0, 2.0, 4.0]}
    failed = {"samples_per_s": None, "error": "timed out"}
    assert throughput.median_run([runs[0], failed]) is failed
