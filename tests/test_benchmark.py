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
import _workers  # noqa: E402
import throughput  # noqa: E402

pytestmark = pytest.mark.timeout(600)  # nine fresh processes and three split trials: slow on a loaded box
K = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "out.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--model", "tiny", "--k", str(K),
           "--batch-size", "16", "--train-size", "64", "--epochs", "2", "--warmup", "1", "--micro-batches", "2",
           "--channels-last", "--timeout", "240", "--json", str(out),
           "--methods", "bp_single_1thread", "bp_single_allthreads", "fdg", "ddg", "bp", "dp", "gpipe", "1f1b"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.long  # eight variants in fresh processes; the acceptance dry run runs the script by default
def test_every_variant_is_measured_with_the_documented_keys(results: dict) -> None:
    rows = results["results"]
    assert set(rows) == {"bp_single_1thread", "bp_single_allthreads", "fdg", "ddg", "bp", "dp", "gpipe", "1f1b"}
    for name, row in rows.items():
        assert row["samples_per_s"] > 0 and row["epoch_samples_per_s"] > 0, name
        assert row["repeats_samples_per_s"] == [row["samples_per_s"]], name
        ranks = 1 if name.startswith("bp_single") else K
        assert len(row["peak_mem_mb"]) == ranks and all(m > 0 for m in row["peak_mem_mb"]), name
        assert row["speedup_vs_bp_1thread"] == pytest.approx(
            row["samples_per_s"] / rows["bp_single_1thread"]["samples_per_s"]), name
    assert rows["bp_single_allthreads"]["threads_per_rank"] == K
    for name in ("fdg", "ddg", "bp", "dp"):  # steady-state busy from the trace: a fraction of the window
        assert len(rows[name]["busy"]) == K and all(0 < b <= 1.05 for b in rows[name]["busy"]), name


@pytest.mark.long  # eight variants in fresh processes; the acceptance dry run runs the script by default
def test_engine_runs_with_its_own_split_and_the_torch_pipelines_with_measured_time(results: dict) -> None:
    """--split auto (the default): our engine splits as a user's run would and says where; the torch pipelines
    get the split balancing the measured block times."""
    config, rows = results["config"], results["results"]
    assert config["split"] == "auto" and config["engine_bounds"] is None
    assert config["pipelining_bounds"] == throughput.partition.split_points(config["block_costs"], K, "auto")
    for name in ("fdg", "ddg", "bp"):
        bounds = rows[name]["bounds"]
        assert len(bounds) == K + 1 and bounds[0] == 0 and bounds[-1] == len(config["block_costs"]), name
        tried = rows[name].get("split_tried")  # present when the engine's trial compared candidates
        assert tried is None or bounds in [t["bounds"] for t in tried], name


@pytest.mark.long  # eight variants in fresh processes; the acceptance dry run runs the script by default
def test_pipelining_rows_name_their_micro_batches_and_share_the_split(results: dict) -> None:
    bounds = results["config"]["pipelining_bounds"]
    for name in ("gpipe", "1f1b"):
        row = results["results"][name]
        assert row["micro_batches"] == 2 and row["by_micro_batches"] == {"2": row["samples_per_s"]}
        assert row["bounds"] == bounds and len(row["busy"]) == K


def test_repeats_report_the_median_run_whole_and_a_failure_wins() -> None:
    runs = [{"samples_per_s": v, "peak_mem_mb": [v], "bounds": [0, int(v), 9]} for v in (3.0, 1.0, 2.0, 4.0)]
    assert throughput.median_run(runs) == {"samples_per_s": 2.0, "peak_mem_mb": [2.0], "bounds": [0, 2, 9],
                                           "repeats_samples_per_s": [3.0, 1.0, 2.0, 4.0],
                                           "repeats_bounds": [[0, 3, 9], [0, 1, 9], [0, 2, 9], [0, 4, 9]],
                                           "repeats_split_tried": [None] * 4}
    failed = {"samples_per_s": None, "error": "timed out"}
    assert throughput.median_run([runs[0], failed]) is failed


def test_round_speedups_divide_by_the_baseline_of_the_same_round() -> None:
    runs = {"bp_single_1thread": [{"samples_per_s": v} for v in (100.0, 80.0, 120.0)],
            "fdg": [{"samples_per_s": v} for v in (190.0, 160.0, None)]}
    assert throughput.round_speedups(runs, "bp_single_1thread") == {
        "bp_single_1thread": [1.0, 1.0, 1.0], "fdg": [1.9, 2.0, None]}
    assert throughput.round_speedups({"fdg": runs["fdg"]}, "bp_single_1thread") == {}  # no baseline was run


def test_steady_state_is_the_middle_half_and_the_whole_epoch_everything() -> None:
    times = [0.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 20.0]  # a slow first and last batch (fill and drain)
    assert _workers.steady_range(8) == (2, 6)
    whole, steady = _workers.rates(times, [10] * 8)
    assert whole == pytest.approx(80 / 20) and steady == pytest.approx(40 / 4)


def test_cuda_is_refused_clearly_without_enough_gpus(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(throughput.torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit):
        throughput.parse_args(["--device", "cuda", "--methods", "bp_single_1thread"])
    assert "--device cuda: no CUDA GPU is visible here" in capsys.readouterr().err
    monkeypatch.setattr(throughput.torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit):
        throughput.parse_args(["--device", "cuda", "--k", "2", "--methods", "fdg"])
    assert "--k 2 needs 2 GPUs (one per rank) but 1 are visible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        throughput.parse_args(["--device", "cuda", "--k", "1", "--methods", "bp_single_allthreads"])
    assert "bp_single_allthreads is the K-thread CPU baseline" in capsys.readouterr().err
    args = throughput.parse_args(["--device", "cuda", "--k", "1", "--precision", "bf16", "--methods", "fdg"])
    assert (args.device, args.precision, args.k) == ("cuda", "bf16", 1)
