"""Training throughput of FDG and its competitors side by side, on the same model, batches and cores.

    python benchmarks/throughput.py --model resnet20 --k 2 --batch-size 128 --json PATH

Variants (``--methods``): ``bp_single_1thread`` / ``bp_single_allthreads`` (plain back-propagation of the
unsplit model in one process with 1 or K intra-op threads), ``fdg``, ``fdg_recompute`` (FDG with
``method.stash=recompute``: its peak memory beside ``fdg``'s), ``ddg``, ``bp`` (synchronous model
parallel), ``dp`` (K data-parallel replicas) on our engine with one thread per rank, and ``gpipe`` /
``1f1b`` (``torch.distributed.pipelining``, one thread per rank, the best of ``--micro-batches``).
Every pipelined variant uses the same K-way split, chosen once up front by ``--split``: ``time``
balances per-block forward + backward times measured here with one thread (``pipeline.cost=time``),
``flops`` balances counted FLOPs (the engine's default), ``i,j,…`` gives it by hand; ``--channels-last``
runs every variant in NHWC.  Every variant runs in its own fresh process (and process group) under a
timeout, so thread settings and failures never leak from one variant into the next.

samples/s is the median over the epochs after ``--warmup`` (each epoch one timed window of the same
synthetic, augmented batches); with ``--repeats R`` every variant runs R times, the rounds interleaved
(so a slow spell on the machine hits all variants alike), and the run with the median samples/s is
reported.  Prints a markdown table and, with ``--json``, writes
``{"results": {NAME: {"samples_per_s", "speedup_vs_bp_1thread", "peak_mem_mb": [per rank], ...}},
"config": ..., "machine": ...}``.  CPU-only numbers are only as good as the machine is quiet: the load
average is recorded next to every result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _workers
import torch

from fdg_dist import models, partition
from fdg_dist.config import Config, ConfigError, validate

SINGLE = ("bp_single_1thread", "bp_single_allthreads")
ENGINE = ("fdg", "fdg_recompute", "ddg", "bp", "dp")
PIPELINING = ("gpipe", "1f1b")
VARIANTS = SINGLE + ENGINE + PIPELINING
BASELINE = "bp_single_1thread"
PIPELINING_P2P_TIMEOUT_S = 120.0  # a healthy step exchanges within seconds; a stuck pipeline fails fast
IMAGE_SIZE, NUM_CLASSES = 32, 10

Spec = dict[str, Any]
_SPLIT_NAMES = {"time": "balancing measured time", "flops": "balancing counted FLOPs"}


class VariantError(RuntimeError):
    """A variant's process failed or timed out; the message carries the tail of its log."""


# ---------------------------------------------------------------------------------------- inside a variant
def engine_config(spec: Spec) -> Config:
    """Our engine on synthetic data: one thread per rank, nothing written but metrics and the trace."""
    cfg = Config()
    cfg.model.name = spec["model"]
    cfg.data = _workers.data_config(spec)
    cfg.method.name, _, recompute = spec["method"].partition("_")
    cfg.method.stash = recompute or "weights"
    cfg.pipeline.k = spec["k"]
    if cfg.method.name != "dp":
        cfg.pipeline.split = spec["bounds"][1:-1]
    t = cfg.trainer
    t.epochs, t.batch_size, t.eval_batch_size, t.threads, t.seed = (
        spec["epochs"], spec["batch_size"], spec["batch_size"], 1, spec["seed"])
    t.channels_last = spec["channels_last"]
    cfg.sched.name = "constant"
    cfg.dist.timeout_s = spec["timeout_s"]
    cfg.checkpoint.enabled = False
    cfg.logging.tensorboard, cfg.logging.progress, cfg.logging.trace = False, "never", True
    cfg.resume = "never"
    return cfg


def run_engine(spec: Spec) -> Spec:
    """Our engine through torch's elastic agent; windows from metrics.jsonl, busy from the trace."""
    cfg = engine_config(spec)
    validate(cfg)
    with tempfile.TemporaryDirectory(prefix="fdg_bench_") as tmp:
        run_dir = Path(tmp)
        ranks = _workers.launch(_workers.engine_rank, cfg.world_size, cfg.to_dict(), tmp)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in rows if r["epoch"] >= spec["warmup"]]
        train_s = sum(r["epoch_time_s"] for r in timed)
        busy = [_workers.engine_busy(run_dir, r, spec["warmup"], train_s) for r in range(cfg.world_size)]
    return {"windows": [r["samples_per_s"] for r in timed], "peak_mem_mb": [r["peak_mem_mb"] for r in ranks],
            "busy": busy}


def run_pipelining(spec: Spec) -> Spec:
    """A window lasts until the slowest stage has finished it (stages start each window at a barrier)."""
    ranks = _workers.launch(_workers.pipelining_rank, spec["k"], spec)
    window_s = [max(ws) for ws in zip(*(r["window_s"] for r in ranks), strict=True)]
    return {"windows": [spec["train_size"] / w for w in window_s], "peak_mem_mb": [r["peak_mem_mb"] for r in ranks],
            "busy": [r["busy"] for r in ranks], "bounds": ranks[0]["bounds"]}


def worker_main(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    run = {"single": _workers.single_process, "engine": run_engine, "pipelining": run_pipelining}[spec["kind"]]
    Path(spec["out"]).write_text(json.dumps(run(spec)))


# ---------------------------------------------------------------------------------------- orchestration
def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_isolated(spec: Spec, timeout_s: float, work: Path) -> Spec:
    """Run one variant in a fresh interpreter (own session, so a timeout kills its ranks too)."""
    label = spec["label"]
    spec = {**spec, "out": str(work / f"{label}.out.json")}
    spec_path, log_path = work / f"{label}.spec.json", work / f"{label}.log"
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise VariantError(f"timed out after {timeout_s:.0f} s; last lines of its log:\n{_tail(log_path)}") from None
    if rc != 0:
        raise VariantError(f"exited with code {rc}; last lines of its log:\n{_tail(log_path)}")
    return json.loads(Path(spec["out"]).read_text())


def measure(spec: Spec, timeout_s: float, work: Path) -> Spec:
    """One run: median samples/s of its windows, plus the load average around it."""
    load_before, tic = os.getloadavg(), time.perf_counter()
    try:
        raw = run_isolated(spec, timeout_s, work)
    except VariantError as e:
        return {"samples_per_s": None, "error": str(e), "wall_s": time.perf_counter() - tic}
    return {"samples_per_s": statistics.median(raw["windows"]), "windows_samples_per_s": raw["windows"],
            "peak_mem_mb": raw["peak_mem_mb"], "busy": raw["busy"], "wall_s": time.perf_counter() - tic,
            "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
            **({"bounds": raw["bounds"]} if "bounds" in raw else {})}


def measure_variant(name: str, common: Spec, args: argparse.Namespace, work: Path) -> Spec:
    if name in SINGLE:
        threads = 1 if name == BASELINE else args.k
        return {**measure({**common, "kind": "single", "label": name, "threads": threads}, args.timeout, work),
                "ranks": 1, "threads_per_rank": threads}
    if name in ENGINE:
        return {**measure({**common, "kind": "engine", "label": name, "method": name}, args.timeout, work),
                "ranks": args.k, "threads_per_rank": 1}
    by_m: dict[str, Spec] = {}
    failed = None
    for m in args.micro_batches:
        if failed is not None:  # a hang costs a whole P2P timeout; the next M would hang the same way
            by_m[str(m)] = {"samples_per_s": None, "skipped": f"not tried after M={failed} failed"}
            continue
        if args.batch_size % m or (name == "1f1b" and m < args.k):
            by_m[str(m)] = {"samples_per_s": None, "skipped": f"needs M dividing the batch{' and M >= K' * (name == '1f1b')}"}
            continue
        spec = {**common, "kind": "pipelining", "label": f"{name}_m{m}", "schedule": name, "micro_batches": m,
                "timeout_s": min(common["timeout_s"], PIPELINING_P2P_TIMEOUT_S)}
        by_m[str(m)] = measure(spec, args.timeout, work)
        failed = m if by_m[str(m)]["samples_per_s"] is None else None
        _progress(f"{name} M={m}", by_m[str(m)])
    ok = {m: r for m, r in by_m.items() if r["samples_per_s"] is not None}
    if not ok:
        errors = "; ".join(f"M={m}: {r.get('error') or r.get('skipped')}" for m, r in by_m.items())
        return {"samples_per_s": None, "error": errors, "by_micro_batches": by_m}
    best = max(ok, key=lambda m: ok[m]["samples_per_s"])
    return {**ok[best], "micro_batches": int(best), "ranks": args.k, "threads_per_rank": 1,
            "by_micro_batches": {m: r["samples_per_s"] for m, r in by_m.items()}}


def median_run(variant_runs: list[Spec]) -> Spec:
    """The run with the median samples/s (the lower one of an even count), so its memory and busy figures
    belong to it; a variant that failed in any round is reported failed."""
    failed = [r for r in variant_runs if r["samples_per_s"] is None]
    if failed:
        return failed[0]
    ranked = sorted(variant_runs, key=lambda r: r["samples_per_s"])
    chosen = ranked[(len(ranked) - 1) // 2]
    return {**chosen, "repeats_samples_per_s": [r["samples_per_s"] for r in variant_runs]}


def _progress(label: str, r: Spec) -> None:
    if r["samples_per_s"] is None:
        print(f"  {label:>22}: FAILED ({r.get('error', r.get('skipped'))})", file=sys.stderr, flush=True)
    else:
        print(f"  {label:>22}: {r['samples_per_s']:8.1f} samples/s  ({r['wall_s']:.0f} s, load "
              f"{r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f})", file=sys.stderr, flush=True)


def machine_info() -> Spec:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}


def _fmt_list(values: list[float] | None, fmt: str) -> str:
    return "—" if not values else " / ".join(format(v, fmt) for v in values)


def table(results: dict[str, Spec], config: Spec, machine: Spec) -> str:
    k = config["k"]
    rows = ["| variant | samples/s | speedup vs bp_single_1thread | efficiency (speedup / K) | busy per rank "
            "| peak RSS MB per rank | notes |", "|---|---:|---:|---:|---|---|---|"]
    for name, r in results.items():
        if r["samples_per_s"] is None:
            rows.append(f"| {name} | failed | | | | | {r['error'].splitlines()[0][:120]} |")
            continue
        speedup = r["speedup_vs_bp_1thread"]
        eff = "—" if name == BASELINE or speedup is None else f"{speedup / k:.2f}"
        notes = f"{r['ranks']} rank(s) × {r['threads_per_rank']} thread(s)"
        if "micro_batches" in r:
            notes += f", best M={r['micro_batches']} of " + ", ".join(
                f"M={m}: {'—' if v is None else f'{v:.0f}'}" for m, v in r["by_micro_batches"].items())
        rows.append(f"| {name} | {r['samples_per_s']:.1f} | {'—' if speedup is None else f'{speedup:.2f}×'} | {eff} "
                    f"| {_fmt_list(r['busy'], '.2f')} | {_fmt_list(r['peak_mem_mb'], '.0f')} | {notes} |")
    start, end = config["loadavg_start"], config["loadavg_end"]
    repeats = f" (the median of {config['repeats']} interleaved runs)" if config["repeats"] > 1 else ""
    rows += ["", f"{config['model']}{' (channels_last)' * config['channels_last']}, batch {config['batch_size']}, K={k}, {config['train_size']} synthetic images "
             f"({config['train_size'] // config['batch_size']} batches) per epoch, {config['epochs']} epochs of which "
             f"{config['warmup']} warm-up; samples/s = median over the other epochs{repeats}. Split {config['bounds']} "
             f"({_SPLIT_NAMES.get(config['split'], 'by hand')}; slowest / mean module measured time "
             f"{config['balance_ratio']:.3f}). busy: engine = compute spans / "
             "train time (trace), torch pipelining = CPU time / wall time.",
             f"Load average (1/5/15 min): {start[0]:.2f} / {start[1]:.2f} / {start[2]:.2f} at start, "
             f"{end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f} at end, on {machine['cpu_count']} cores ({machine['cpu']}), "
             f"torch {machine['torch']}."]
    return "\n".join(rows)


def choose_bounds(common: Spec, split: str) -> tuple[list[int], list[float]]:
    """The split every pipelined variant uses, and the measured per-block times it is judged by.

    ``split``: ``time`` balances those times, ``flops`` counted FLOPs, ``i,j,…`` is given by hand.
    """
    blocks = models.build_blocks(common["model"], common["num_classes"])
    torch.set_num_threads(1)
    shape = (common["batch_size"], 3, common["image_size"], common["image_size"])
    seconds = partition.measured_block_costs(blocks, shape, torch.device("cpu"), channels_last=common["channels_last"])
    if split == "time":
        return partition.split_points(seconds, common["k"], "auto"), seconds
    if split == "flops":
        flops = partition.block_costs(blocks, (1, *shape[1:]))
        return partition.split_points(flops, common["k"], "auto"), seconds
    return partition.split_points(seconds, common["k"], [int(i) for i in split.split(",")]), seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20", choices=models.names())
    p.add_argument("--k", type=int, default=2, help="pipeline modules = ranks = cores used (default 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs including warm-up (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="leading epochs not timed (default 1)")
    p.add_argument("--train-size", type=int, default=2048, help="synthetic images per epoch (default 2048)")
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="NAME",
                   help=f"variants to run (default all: {' '.join(VARIANTS)})")
    p.add_argument("--micro-batches", nargs="+", type=int, default=[2, 4, 8],
                   help="micro-batch counts tried for gpipe/1f1b; the best is reported (default 2 4 8)")
    p.add_argument("--split", default="time",
                   help="time (balance measured block times, default), flops (balance counted FLOPs) or the "
                        "K-1 block indices where modules 1..K-1 start, e.g. 11")
    p.add_argument("--channels-last", action="store_true",
                   help="every variant in NHWC memory format (trainer.channels_last=true for the engine)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every variant this many times, rounds interleaved; report the median run (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per variant run (default 900)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        problems = [msg for bad, msg in (
            (args.k < 1, f"--k {args.k} must be ≥ 1"),
            (args.warmup < 0 or args.epochs <= args.warmup, f"--epochs {args.epochs} must exceed --warmup {args.warmup}"),
            (args.batch_size < 1 or args.train_size % args.batch_size != 0,
             f"--train-size {args.train_size} must be a multiple of --batch-size {args.batch_size} (equal windows, "
             "whole micro-batches)"),
            (args.batch_size % args.k != 0, f"--batch-size {args.batch_size} must divide over K={args.k} dp replicas"),
            (any(m < 1 for m in args.micro_batches), "--micro-batches must be ≥ 1"),
            (args.repeats < 1, f"--repeats {args.repeats} must be ≥ 1"),
            (args.split not in ("time", "flops") and not all(i.isdigit() for i in args.split.split(",")),
             f"--split {args.split!r} must be time, flops or comma-separated block indices"),
        ) if bad]
        if problems:
            p.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return
    common = {"model": args.model, "k": args.k, "batch_size": args.batch_size, "epochs": args.epochs,
              "warmup": args.warmup, "train_size": args.train_size, "image_size": IMAGE_SIZE,
              "num_classes": NUM_CLASSES, "seed": args.seed, "timeout_s": min(args.timeout, 300.0),
              "channels_last": args.channels_last}
    try:
        common["bounds"], costs = choose_bounds(common, args.split)
    except ValueError as e:
        sys.exit(f"throughput.py: --split {args.split}: {e}")
    try:
        validate(engine_config({**common, "method": "fdg"}))
    except ConfigError as e:
        sys.exit(f"throughput.py: invalid setting: {e}")
    methods = [v for v in VARIANTS if v in args.methods]
    config = {**common, "split": args.split, "block_costs": costs, "balance_ratio": partition.balance_ratio(costs, common["bounds"]),
              "methods": methods, "micro_batches": args.micro_batches, "repeats": args.repeats, "timeout_per_run_s": args.timeout,
              "optimizer": "sgd lr=0.1 momentum=0.9 weight_decay=5e-4", "data": "synthetic, augmented",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "loadavg_start": list(os.getloadavg()),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    machine = machine_info()
    print(f"throughput: {args.model}, batch {args.batch_size}, K={args.k}, {args.epochs} epochs × "
          f"{args.train_size // args.batch_size} batches; split {common['bounds']} by {args.split} "
          f"(balance {config['balance_ratio']:.3f}); load average {config['loadavg_start'][0]:.2f}",
          file=sys.stderr, flush=True)
    runs: dict[str, list[Spec]] = {name: [] for name in methods}
    with tempfile.TemporaryDirectory(prefix="fdg_throughput_") as tmp:
        for round_ in range(args.repeats):
            for name in methods:
                runs[name].append(measure_variant(name, common, args, Path(tmp)))
                _progress(name if args.repeats == 1 else f"{name} ({round_ + 1}/{args.repeats})", runs[name][-1])
    results = {name: median_run(variant_runs) for name, variant_runs in runs.items()}
    base = results.get(BASELINE, {}).get("samples_per_s")
    for r in results.values():
        sps = r["samples_per_s"]
        r["speedup_vs_bp_1thread"] = sps / base if sps is not None and base else None
        r["efficiency"] = r["speedup_vs_bp_1thread"] / args.k if r["speedup_vs_bp_1thread"] is not None else None
    config["loadavg_end"] = list(os.getloadavg())
    print(table(results, config, machine))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "config": config, "machine": machine}, indent=2) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)
    if any(r["samples_per_s"] is None for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
