"""Accept a GPU machine with ONE GPU in at most six minutes, and say what was skipped to stay inside them.

    python benchmarks/gpu_acceptance.py [--out DIR] [--budget-s 360] [--cpu-dry-run]

Checks, most important first; each one that would not fit in what is left of ``--budget-s`` (by its
estimate) is skipped and named in the report:

1. ``versions``: nvidia-smi's GPU and driver, torch, CUDA, cuDNN, NCCL.
2. ``pipeline``: a real NCCL fdg pipeline of ``fdg-train`` at K = 2 and 3 on the one GPU, the ranks
   sharing it (``dist.ranks_per_gpu`` automatic: NCCL ≥ 2.30's multi-rank mode), every rank under
   ``FDG_SYNC_DEBUG=error`` (a host synchronisation inside the steady state fails the run); its final
   weights against the same run on the CPU over gloo (relative L2 distance below ``TOLERANCE``: cuDNN's
   and TF32's rounding differ from the CPU's).  NCCL's communicator inits are counted from
   ``NCCL_DEBUG=INFO`` (``Init COMPLETE`` lines): at most the world's plus one per link and rank, so no
   link created a second, lazy communicator.
3. ``serialised``: the K = 3 pipeline again under ``NCCL_LAUNCH_ORDER_IMPLICIT=1``, then under
   ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (the GPU runs the ranks' P2P kernels one after another: an issue order
   without one global launch order hangs here); a timeout bounds each, and a hang is a failure.
4. ``kill``: SIGKILL of module 1 mid-epoch at K = 3; every rank must end within ``dist.timeout_s`` + 10 s,
   and fdg-train's one closing line (``fdg-train: …``) must name module 1.
5. ``overhead``: K = 1, the engine's stage (forward, backward, step with its checks) against a plain
   PyTorch loop on ResNet-56 in bf16 + NHWC: wall ms per step of both, their ratio, host CPU ms per step.
6. ``fabric``: the emulated fabric (tests/emulated.py, the suite's NCCL-rules harness) on CUDA for every
   method at K = 2..4 against the same pipeline on the CPU (relative L2 of the final weights).

``--only CHECK …`` runs the named checks alone.  Writes ``DIR/acceptance.json`` and ``DIR/acceptance.md``.  Multi-GPU speed needs N ≥ 2 GPUs and is not
part of this one-GPU check.  ``--cpu-dry-run`` runs the same logic on the CPU over gloo with tiny sizes
(K = 2 only), where the NCCL-only parts (communicator count, NCCL variables) have nothing to count: how
the test suite checks this script.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the emulated fabric harness lives with the suite
from emulated import merged_state, run_emulated  # noqa: E402

from fdg_dist import models  # noqa: E402
from fdg_dist.config import Config  # noqa: E402
from fdg_dist.run.trainer import build_stage  # noqa: E402

SMOKE = ["model=tiny", "data=synthetic", "data.train_size=256", "data.test_size=64", "trainer.batch_size=32",
         "trainer.eval_batch_size=48", "trainer.epochs=2", "trainer.seed=0", "checkpoint.enabled=false",
         "logging.tensorboard=false", "logging.progress=never", "resume=never", "dist.timeout_s=60",
         "pipeline.cost=flops", "trainer.channels_last=false"]  # both sides split and lay out alike
TOLERANCE = 1e-2  # relative L2 distance of all weights between a GPU run and its CPU run
KILL_TIMEOUT_S = 30  # dist.timeout_s of the kill check
METHODS = ["fdg", "bp", "ddg", "fr", "dgl", "adl"]
# estimated seconds per check on an H100 (GPU) and on a loaded CPU (dry run): a check is skipped unless it fits
ESTIMATE = {"versions": (5, 1), "pipeline": (40, 20), "serialised": (40, 20), "kill": (45, 45),
            "overhead": (30, 5), "fabric": (6, 2)}


class Budget:
    """Seconds left of ``--budget-s``; ``fits`` says whether a check of the given estimate still does."""

    def __init__(self, seconds: float, dry: bool, only: list[str] | None = None) -> None:
        self.end, self.dry, self.only, self.skipped = time.monotonic() + seconds, dry, only, []

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, check: str, what: str, times: int = 1) -> bool:
        need = ESTIMATE[check][self.dry] * times
        if self.only is not None and check not in self.only:
            return False  # not asked for (--only): not a skip for want of time
        if need <= self.left():
            return True
        self.skipped.append(f"{check} {what}: needs ~{need} s, {max(0, self.left()):.0f} s of the budget left")
        print(f"skipped {self.skipped[-1]}", file=sys.stderr, flush=True)
        return False


def versions(dry: bool) -> dict[str, str]:
    smi = "—"
    if not dry:
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip() or "—"
        except (OSError, subprocess.TimeoutExpired) as e:
            smi = f"nvidia-smi failed: {e}"
    cuda = torch.cuda.is_available() and not dry
    return {"gpu": smi if cuda else "CPU (dry run)", "torch": torch.__version__, "cuda": torch.version.cuda or "—",
            "cudnn": str(torch.backends.cudnn.version()) if cuda else "—",
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else "—"}


def train(run_dir: Path, overrides: list[str], env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """``fdg-train`` (our launcher, torch's elastic agent) in a subprocess: ok, wall s, result or error tail."""
    cmd = [sys.executable, "-m", "fdg_dist.train", *SMOKE, *overrides, f"hydra.run.dir={run_dir}"]
    tic = time.perf_counter()
    out: dict[str, Any] = {"command": " ".join(cmd[2:]), "env": env}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=max(timeout_s, 1))
        out.update(ok=proc.returncode == 0, error=None if proc.returncode == 0 else proc.stderr[-2000:])
    except subprocess.TimeoutExpired:
        out.update(ok=False, error=f"no result after {timeout_s:.0f} s (a hang, or the budget's end): a failure")
    out["wall_s"] = round(time.perf_counter() - tic, 1)
    return out


def weight_distance(a: Path, b: Path) -> float:
    """‖w_a − w_b‖ / ‖w_b‖ over every floating-point tensor of two final_model.pt files."""
    wa, wb = (torch.load(p / "final_model.pt", weights_only=True, map_location="cpu") for p in (a, b))
    return _distance(wa, wb)


def _distance(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor]) -> float:
    keys = [k for k in wb if wb[k].is_floating_point()]
    diff = torch.cat([(wa[k].float().cpu() - wb[k].float().cpu()).flatten() for k in keys])
    ref = torch.cat([wb[k].float().cpu().flatten() for k in keys])
    return float(diff.norm() / ref.norm())


def nccl_inits(folder: Path) -> list[int]:
    """``Init COMPLETE`` lines per process of NCCL's debug files (NCCL_DEBUG_FILE=folder/nccl.%p.log)."""
    return sorted(p.read_text(errors="replace").count("Init COMPLETE") for p in folder.glob("nccl.*.log"))


def pipeline(out: Path, ks: list[int], backend: str, budget: Budget) -> list[dict[str, Any]]:
    rows = []
    for k in ks:
        if not budget.fits("pipeline", f"K={k}"):
            continue
        gpu, cpu, logs = out / f"{backend}-k{k}", out / f"cpu-gloo-k{k}", out / f"nccl-logs-k{k}"
        logs.mkdir(parents=True, exist_ok=True)
        env = {"FDG_SYNC_DEBUG": "error", "NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT",
               "NCCL_DEBUG_FILE": str(logs / "nccl.%p.log")}
        row = {"check": "pipeline", "k": k,
               "device": train(gpu, [f"pipeline.k={k}", f"dist.backend={backend}"], env, budget.left()),
               "cpu": train(cpu, [f"pipeline.k={k}", "dist.backend=gloo", "trainer.threads=1"],
                            {"OMP_NUM_THREADS": "1"}, budget.left())}
        row["inits"] = nccl_inits(logs)
        row["max_inits"] = k + 4 * (k - 1)  # the world's per rank, plus one per link and rank (2 per hop each way)
        ok = row["device"]["ok"] and row["cpu"]["ok"]
        if ok:
            row["distance"] = weight_distance(gpu, cpu)
            ok = row["distance"] < TOLERANCE and (backend != "nccl" or 0 < sum(row["inits"]) <= row["max_inits"])
        rows.append({**row, "ok": ok})
        _say(rows[-1], f"pipeline K={k}: distance {row.get('distance', float('nan')):.1e}, inits {row['inits']}")
    return rows


def serialised(out: Path, k: int, backend: str, budget: Budget) -> list[dict[str, Any]]:
    rows = []
    for name, value in (("NCCL_LAUNCH_ORDER_IMPLICIT", "1"), ("CUDA_DEVICE_MAX_CONNECTIONS", "1")):
        if not budget.fits("serialised", f"{name}={value} K={k}"):
            continue
        run = train(out / f"{backend}-k{k}-{name.lower()}", [f"pipeline.k={k}", f"dist.backend={backend}"],
                    {name: value, "FDG_SYNC_DEBUG": "error"}, min(budget.left(), 4 * ESTIMATE["serialised"][0]))
        rows.append({"check": "serialised", "k": k, "setting": f"{name}={value}", "device": run, "ok": run["ok"]})
        _say(rows[-1], f"serialised {name}={value} K={k}: {run['wall_s']} s")
    return rows


def kill(out: Path, k: int, backend: str, budget: Budget) -> list[dict[str, Any]]:
    """Start a long K-module run, SIGKILL module 1 once training runs, time until every rank has ended."""
    if not budget.fits("kill", f"SIGKILL of module 1 at K={k}"):
        return []
    run_dir = out / f"{backend}-k{k}-kill"
    cmd = [sys.executable, "-m", "fdg_dist.train", *SMOKE, f"pipeline.k={k}", f"dist.backend={backend}",
           "trainer.epochs=1000", f"dist.timeout_s={KILL_TIMEOUT_S}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    row: dict[str, Any] = {"check": "kill", "k": k, "command": " ".join(cmd[2:]), "ok": False}
    pid = _pid_of_rank(run_dir / "train.log", 1, proc, deadline=time.monotonic() + budget.left())
    if pid is None:
        proc.kill()
        row["error"] = "module 1 never reported its pid in train.log"
    else:
        time.sleep(2)  # into the steady state (an epoch of the smoke run lasts well under a second)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            _, err = proc.communicate(timeout=KILL_TIMEOUT_S + 10)
            row["ended_s"] = round(time.monotonic() - killed, 1)
            verdict = [line for line in err.splitlines() if line.startswith("fdg-train: ")]  # the CLI's one line
            row["error_line"] = verdict[-1] if verdict else err[-300:]
            row["named"] = bool(verdict) and "module 1" in verdict[-1]
            row["ok"] = row["named"] and proc.returncode != 0
        except subprocess.TimeoutExpired:
            proc.kill()
            row["error"] = f"ranks still running {KILL_TIMEOUT_S + 10} s after the kill"
    _say(row, f"kill of module 1: ended in {row.get('ended_s', '—')} s, named: {row.get('named')}")
    return [row]


def _pid_of_rank(log: Path, rank: int, proc: subprocess.Popen, deadline: float) -> int | None:
    pattern = re.compile(rf"rank {rank}/\d+: .* pid (\d+)")
    while time.monotonic() < deadline and proc.poll() is None:
        found = pattern.search(log.read_text()) if log.exists() else None
        if found:
            return int(found.group(1))
        time.sleep(0.2)
    return None


def overhead(dry: bool, budget: Budget) -> list[dict[str, Any]]:
    """K = 1: the engine's stage against a plain PyTorch loop, same model, data and optimizer."""
    if not budget.fits("overhead", "K=1 engine against a plain loop"):
        return []
    cfg = Config()
    cfg.model.name, cfg.data.name, cfg.trainer.batch_size = ("tiny", "synthetic", 32) if dry else \
        ("resnet56", "synthetic", 128)
    cfg.trainer.precision, cfg.trainer.channels_last = ("fp32", False) if dry else ("bf16", True)
    device = torch.device("cpu" if dry else "cuda")
    steps = 5 if dry else 100
    stage, boundary, _ = build_stage(cfg, 1, 0, device)
    plain = copy.deepcopy(stage.module)  # the same weights and layout, parameters of its own
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    fmt = models.memory_format(cfg.trainer.channels_last)
    x = torch.randn(cfg.trainer.batch_size, *boundary.in_shape, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, cfg.data.num_classes, (cfg.trainer.batch_size,), device=device)

    def plain_step(i: int) -> None:
        with stage.autocast:
            loss = torch.nn.functional.cross_entropy(plain(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def engine_step(i: int) -> None:
        stage.forward(i, x, y, train=True, keep_for_backward=False)
        stage.step()

    row: dict[str, Any] = {"check": "overhead", "model": cfg.model.name, "precision": cfg.trainer.precision,
                           "batch": cfg.trainer.batch_size, "steps": steps}
    for name, step in (("plain", plain_step), ("engine", engine_step), ("plain_again", plain_step)):
        row[name] = _timed(step, steps, device)
    stage.finite.flush()
    plain_ms = min(row["plain"]["wall_ms"], row["plain_again"]["wall_ms"])
    row["ratio"] = round(row["engine"]["wall_ms"] / plain_ms, 3)
    row["ok"] = True  # a measurement: reported, not judged
    _say(row, f"overhead K=1: engine/plain wall {row['ratio']}")
    return [row]


def _timed(step: Callable[[int], None], steps: int, device: torch.device) -> dict[str, float]:
    for i in range(3):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.thread_time()
    for i in range(steps):
        step(i)
    host = time.thread_time() - cpu
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"wall_ms": round(1e3 * (time.perf_counter() - wall) / steps, 3), "host_ms": round(1e3 * host / steps, 3)}


def fabric(ks: list[int], dry: bool, budget: Budget) -> list[dict[str, Any]]:
    rows = []
    for k in ks:
        for method in METHODS:
            if not budget.fits("fabric", f"{method} K={k}", times=1):
                continue
            cfg = Config()
            cfg.model.name, cfg.data.name, cfg.data.train_size, cfg.data.test_size = "tiny", "synthetic", 96, 32
            cfg.trainer.batch_size = cfg.trainer.eval_batch_size = 16
            cfg.trainer.epochs, cfg.checkpoint.enabled, cfg.logging.tensorboard = 1, False, False
            cfg.trainer.channels_last, cfg.pipeline.cost, cfg.method.name, cfg.pipeline.k = False, "flops", method, k
            cfg.method.accum_steps = 2 if method == "adl" else 1
            tic = time.perf_counter()
            try:
                dev = merged_state(run_emulated(cfg, device="cpu" if dry else "cuda:0"))  # the fabric compares devices exactly
                cpu = merged_state(run_emulated(cfg, device="cpu"))
                row = {"check": "fabric", "method": method, "k": k, "distance": _distance(dev, cpu)}
                row["ok"] = row["distance"] < TOLERANCE
            except Exception as e:  # any failure of a cell is that cell's result
                row = {"check": "fabric", "method": method, "k": k, "ok": False, "error": f"{type(e).__name__}: {e}"}
            row["wall_s"] = round(time.perf_counter() - tic, 1)
            rows.append(row)
            _say(row, f"fabric {method} K={k}: distance {row.get('distance', float('nan')):.1e}")
    return rows


def _say(row: dict[str, Any], text: str) -> None:
    print(f"{'ok  ' if row['ok'] else 'FAIL'} {text}", file=sys.stderr, flush=True)


def report(results: dict[str, Any]) -> str:
    v = results["versions"]
    lines = [f"GPU acceptance on {v['gpu']} (torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, NCCL "
             f"{v['nccl']}), {results['started']}, {results['wall_s']} s of a {results['budget_s']} s budget", "",
             "| check | K | setting | weights vs CPU (rel. L2) | NCCL inits (per process; bound) | wall s | result |",
             "|---|---:|---|---:|---|---:|---|"]
    for r in results["checks"]:
        setting = r.get("setting") or r.get("method") or r.get("model") or ""
        dist = r.get("distance")
        inits = f"{r['inits']}; ≤ {r['max_inits']} in all" if r.get("inits") else "—"
        wall = r.get("wall_s") or r.get("device", {}).get("wall_s") or r.get("ended_s") or "—"
        if r["check"] == "overhead":
            setting = (f"{r['model']} {r['precision']} batch {r['batch']}: engine {r['engine']['wall_ms']} ms/step "
                       f"(host {r['engine']['host_ms']}), plain {r['plain']['wall_ms']} ms/step "
                       f"(host {r['plain']['host_ms']}), ratio {r['ratio']}")
        if r["check"] == "kill":
            setting = f"ended {r.get('ended_s', '—')} s after the kill: {r.get('error_line', r.get('error', ''))}"
        lines.append(f"| {r['check']} | {r.get('k', 1)} | {setting} | {'—' if dist is None else f'{dist:.1e}'} | "
                     f"{inits} | {wall} | {'pass' if r['ok'] else 'FAIL'} |")
    lines += [""] + [f"Skipped: {s}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_acceptance")
    p.add_argument("--budget-s", type=float, default=360.0, help="wall-clock budget; checks that would not fit are skipped")
    p.add_argument("--cpu-dry-run", action="store_true", help="the same logic on the CPU over gloo, tiny sizes")
    p.add_argument("--only", nargs="+", choices=list(ESTIMATE), help="run these checks only (default: all)")
    args = p.parse_args(argv)
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_acceptance: no CUDA GPU visible; nothing to accept (use --cpu-dry-run to check the script)",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    budget = Budget(args.budget_s, dry, args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    backend, ks = ("gloo", [2]) if dry else ("nccl", [2, 3])
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": args.budget_s,
                               "versions": versions(dry) if budget.fits("versions", "") else {}}
    checks = pipeline(args.out, ks, backend, budget)
    checks += serialised(args.out, max(ks), backend, budget)
    checks += kill(args.out, max(ks), backend, budget)
    checks += overhead(dry, budget)
    checks += fabric([2] if dry else [2, 3, 4], dry, budget)
    results.update(checks=checks, skipped=budget.skipped, wall_s=round(time.perf_counter() - started, 1))
    results["versions"] = results["versions"] or {k: "—" for k in ("gpu", "torch", "cuda", "cudnn", "nccl")}
    (args.out / "acceptance.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "acceptance.md").write_text(report(results))
    print(report(results))
    verdict = "FAIL" if not all(r["ok"] for r in checks) else "PASS" if checks else "NOTHING RAN (budget)"
    print(f"gpu_acceptance: {verdict} ({len(checks)} checks, {len(budget.skipped)} skipped); wrote "
          f"{args.out}/acceptance.md and acceptance.json", file=sys.stderr)
    return {"PASS": 0, "FAIL": 1}.get(verdict, 3)


if __name__ == "__main__":
    sys.exit(main())
