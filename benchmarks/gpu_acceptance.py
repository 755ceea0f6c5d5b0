"""One command that accepts the GPU path on any machine with N ≥ 1 GPUs (NCCL), and says what it skipped.

    python benchmarks/gpu_acceptance.py [--out DIR] [--skip-benchmark]

1. Smoke: our engine over NCCL for K = 1, 2 (N ≥ 2) and min(N, 4): fdg on the tiny model, two epochs (a
   drain crossed), every rank with ``FDG_SYNC_DEBUG=error`` (any host synchronisation inside the steady
   state fails the run).  Each is compared with the same run on the CPU over gloo, which the test suite
   proves equal to the reference simulation bit for bit: the GPU's weights must agree to float
   tolerance (cuDNN's and TF32's rounding differ from the CPU's).  Then bf16 + channels_last at the
   largest K must train to finite numbers.
2. Benchmark: ``benchmarks/throughput.py`` on the GPUs (bf16, channels_last) for ResNet-56 and
   WRN-28-10: single-GPU BP, fdg, bp, dp, GPipe and 1F1B at K = min(N, 4).
3. Writes ``DIR/acceptance.json`` and ``DIR/acceptance.md`` (README-ready).

With one GPU only K = 1 runs over NCCL (NCCL refuses two ranks on one GPU, NVIDIA/nccl #418): the
pipelined smoke runs and the benchmark's pipelines are skipped, and the report says so.
``--cpu-dry-run`` runs the same steps on the CPU over gloo with tiny sizes: how CI checks this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["model=tiny", "data=synthetic", "data.train_size=256", "data.test_size=64", "trainer.batch_size=32",
         "trainer.eval_batch_size=64", "trainer.epochs=2", "trainer.seed=0", "checkpoint.enabled=false",
         "logging.tensorboard=false", "logging.progress=never", "resume=never", "dist.timeout_s=120",
         "pipeline.cost=flops"]  # the GPU and the CPU run must split alike: a measured split could differ
TOLERANCE = 1e-2  # relative L2 distance of all weights between the GPU run and the CPU run


def run_train(run_dir: Path, overrides: list[str], env: dict[str, str]) -> dict[str, Any]:
    """``fdg-train`` (our own launcher) in a subprocess; its result.json, or the tail of its error."""
    cmd = [sys.executable, "-m", "fdg_dist.train", *SMOKE, *overrides, f"hydra.run.dir={run_dir}"]
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
    out: dict[str, Any] = {"command": " ".join(cmd[1:]), "wall_s": round(time.perf_counter() - tic, 1),
                           "ok": proc.returncode == 0}
    if proc.returncode != 0:
        out["error"] = proc.stderr[-3000:]
    else:
        out["result"] = json.loads((run_dir / "result.json").read_text())
    return out


def weight_distance(a: Path, b: Path) -> float:
    """‖w_a − w_b‖ / ‖w_b‖ over every floating-point tensor of two final_model.pt files."""
    wa, wb = (torch.load(p / "final_model.pt", weights_only=True, map_location="cpu") for p in (a, b))
    keys = [k for k in wb if wb[k].is_floating_point()]
    diff = torch.cat([(wa[k].float() - wb[k].float()).flatten() for k in keys])
    ref = torch.cat([wb[k].float().flatten() for k in keys])
    return float(diff.norm() / ref.norm())


def smoke(out: Path, ks: list[int], backend: str, precise: list[str]) -> list[dict[str, Any]]:
    rows = []
    cpu_env = {"OMP_NUM_THREADS": "1"}
    for k in ks:
        # Named for the side, not the backend: the CPU dry run uses gloo on both sides.
        gpu_dir, cpu_dir = out / "smoke" / f"device-{backend}-k{k}", out / "smoke" / f"cpu-gloo-k{k}"
        row = {"k": k, "backend": backend,
               "gpu": run_train(gpu_dir, [f"pipeline.k={k}", f"dist.backend={backend}"], {"FDG_SYNC_DEBUG": "error"}),
               "cpu": run_train(cpu_dir, [f"pipeline.k={k}", "dist.backend=gloo", "trainer.threads=1"], cpu_env)}
        if row["gpu"]["ok"] and row["cpu"]["ok"]:
            row["weight_distance"] = weight_distance(gpu_dir, cpu_dir)
            row["ok"] = row["weight_distance"] < TOLERANCE
        else:
            row["ok"] = False
        rows.append(row)
        print(f"smoke K={k}: {'ok' if row['ok'] else 'FAILED'} "
              f"(distance {row.get('weight_distance', float('nan')):.2e})", file=sys.stderr, flush=True)
    k = max(ks)
    fast = run_train(out / "smoke" / f"device-{backend}-k{k}-bf16-nhwc",
                     [f"pipeline.k={k}", f"dist.backend={backend}", *precise], {"FDG_SYNC_DEBUG": "error"})
    finite = fast["ok"] and fast["result"]["final_test_loss"] is not None and fast["result"]["final_test_loss"] < 1e6
    rows.append({"k": k, "backend": backend, "settings": precise, "gpu": fast, "ok": finite})
    return rows


def benchmark(out: Path, k: int, dry_run: bool) -> list[dict[str, Any]]:
    rows = []
    if dry_run:
        runs = [("tiny", ["--train-size", "256", "--batch-size", "32", "--epochs", "2", "--methods",
                          "bp_single_1thread", "fdg"])]
    else:
        runs = [(model, ["--device", "cuda", "--precision", "bf16", "--channels-last", "--methods", "bp_single_1thread",
                         "fdg", "bp", "dp", "gpipe", "1f1b", "--repeats", "3"]) for model in ("resnet56", "wrn28_10")]
    for model, flags in runs:
        path = out / f"throughput-{model}.json"
        cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--model", model, "--k", str(k), *flags,
               "--json", str(path)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3 * 3600)
        rows.append({"model": model, "command": " ".join(cmd[1:]), "ok": proc.returncode == 0,
                     "table": proc.stdout, **({"error": proc.stderr[-3000:]} if proc.returncode else {})})
        print(f"benchmark {model}: {'ok' if proc.returncode == 0 else 'FAILED'}", file=sys.stderr, flush=True)
    return rows


def report(results: dict[str, Any]) -> str:
    lines = [f"GPU acceptance on {results['machine']['gpus']} ({results['machine']['torch']}, NCCL "
             f"{results['machine']['nccl']}), {results['started']}", "",
             "| smoke | K | weights vs CPU (rel. L2) | test error | wall s | result |", "|---|---:|---:|---:|---:|---|"]
    for r in results["smoke"]:
        name = "fdg " + " ".join(r.get("settings", [])) if r.get("settings") else "fdg fp32"
        res = r["gpu"].get("result") or {}
        err = res.get("final_test_error")
        dist = r.get("weight_distance")
        lines.append(f"| {name} | {r['k']} | {'—' if dist is None else f'{dist:.1e}'} | "
                     f"{'—' if err is None else f'{100 * err:.1f} %'} | {r['gpu']['wall_s']} | "
                     f"{'pass' if r['ok'] else 'FAIL'} |")
    for skipped in results["skipped"]:
        lines.append(f"\nSkipped: {skipped}")
    for b in results["benchmark"]:
        lines += ["", f"`{b['command']}`", "", b["table"] if b["ok"] else f"FAILED:\n{b['error']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_acceptance")
    p.add_argument("--skip-benchmark", action="store_true")
    p.add_argument("--cpu-dry-run", action="store_true", help="the same steps on the CPU over gloo, tiny sizes")
    args = p.parse_args(argv)
    n = torch.cuda.device_count()
    if n == 0 and not args.cpu_dry_run:
        print("gpu_acceptance: no CUDA GPU visible; nothing to accept (use --cpu-dry-run to check the script)",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    backend = "gloo" if args.cpu_dry_run else "nccl"
    ks = [2] if args.cpu_dry_run else sorted({1, min(n, 2), min(n, 4)})
    skipped = [] if n >= 2 or args.cpu_dry_run else [
        "K ≥ 2 over NCCL and the pipelined benchmark variants: one GPU, and NCCL refuses two ranks on one GPU"]
    machine = {"gpus": f"{n} × {torch.cuda.get_device_name(0)}" if n else "CPU (dry run)", "torch": torch.__version__,
               "nccl": ".".join(map(str, torch.cuda.nccl.version())) if n else "—"}
    precise = ["trainer.precision=bf16", "trainer.channels_last=true"]
    if n and not torch.cuda.is_bf16_supported():
        precise, skipped = ["trainer.channels_last=true"], [*skipped, "bf16: this GPU has no bfloat16"]
    results: dict[str, Any] = {"machine": machine, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "skipped": skipped,
                               "smoke": smoke(args.out, ks, backend, precise), "benchmark": []}
    if not args.skip_benchmark:
        results["benchmark"] = benchmark(args.out, max(ks), args.cpu_dry_run)
    (args.out / "acceptance.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "acceptance.md").write_text(report(results))
    print(report(results))
    ok = all(r["ok"] for r in results["smoke"] + results["benchmark"])
    print(f"gpu_acceptance: {'PASS' if ok else 'FAIL'}; wrote {args.out}/acceptance.md and acceptance.json",
          file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
