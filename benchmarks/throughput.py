"""Training throughput of FDG and its competitors side by side, on the same model, batches and devices.

    python benchmarks/throughput.py --model resnet20 --k 2 --json PATH

Variants (``--methods``): ``bp_single_1thread`` (plain back-propagation of the unsplit model in one
process: one CPU thread, or one GPU with ``--device cuda``), ``bp_single_allthreads`` (the same with K
intra-op threads; CPU only), ``fdg``, ``fdg_recompute`` (FDG with ``method.stash=recompute``: its peak
memory beside ``fdg``'s), ``ddg``, ``bp`` (synchronous model parallel), ``dp`` (K data-parallel replicas)
on our engine with one thread (or one GPU) per rank, and ``gpipe`` / ``1f1b``
(``torch.distributed.pipelining``, the best of ``--micro-batches``).

What users run: by default our engine runs with its own defaults (``pipeline.split=auto`` with the
default ``pipeline.cost``, the memory format the engine picks for the device), and every other variant
in the same memory format; the torch pipelines get the split that balances per-block forward + backward
times measured here (``--split auto``).  ``--split time|flops|i,j,…`` gives every pipelined variant one
split instead (balanced measured time, balanced counted FLOPs, or by hand); ``--channels-last`` /
``--no-channels-last`` force a format for all.  Every variant runs in its own fresh process (and process
group) under a timeout, so thread settings and failures never leak from one variant into the next.

Two rates per variant: **steady state** (``samples_per_s``: the middle half of each timed epoch's
batches, away from allocator warm-up and our pipeline's fill and drain — what a long epoch runs at) and
**whole epoch** (``epoch_samples_per_s``: every batch, our engine's fill and drain included; at 32 batches
per epoch the K=2 drain alone is 2 of 34 ticks, on CIFAR-10's 352 it is 0.6 %).  Each is the median over
the epochs after ``--warmup``; with ``--repeats R`` every variant runs R times, the rounds interleaved (so a
slow spell on the machine hits all variants alike), and the run with the median steady rate is reported,
beside each round's own speedup over the baseline's run in that round (``repeats_speedup_vs_bp_1thread``).
Prints a markdown table and, with ``--json``, writes
``{"results": {NAME: {"samples_per_s", "epoch_samples_per_s", "speedup_vs_bp_1thread", "peak_mem_mb": [per rank], ...}},
"config": ..., "machine": ...}``.  CPU-only numbers are only as good as the machine is quiet: the load
average is recorded next to every result.

``--device cuda`` (one GPU per rank, ``cuda:LOCAL_RANK``; NCCL for our engine and the torch pipelines;
single-process BP on ``cuda:0``) and ``--precision bf16`` (``trainer.precision=bf16`` for our engine,
``torch.autocast`` elsewhere) are what ``gpu_acceptance.py`` runs.
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

from fdg_dist import models
from fdg_dist.config import Config, ConfigError
from fdg_dist.run import devices
from fdg_dist.split import partition
from fdg_dist.validation import validate

SINGLE = ("bp_single_1thread", "bp_single_allthreads")
ENGINE = ("fdg", "fdg_recompute", "ddg", "bp", "dp")
PIPELINING = ("gpipe", "1f1b")
VARIANTS = SINGLE + ENGINE + PIPELINING
BASELINE = "bp_single_1thread"
PIPELINING_P2P_TIMEOUT_S = 120.0  # a healthy step exchanges within seconds; a stuck pipeline fails fast
IMAGE_SIZE, NUM_CLASSES = 32, 10

Spec = dict[str, Any]
_SPLIT_NAMES = {"auto": "our engine: its default; torch pipelines: balanced measured time",
                "time": "balancing measured time", "flops": "balancing counted FLOPs"}


class VariantError(RuntimeError):
    """A variant's process failed or timed out; the message carries the tail of its log."""


# ---------------------------------------------------------------------------------------- inside a variant
def engine_config(spec: Spec) -> Config:
    """Our engine on synthetic data: one thread (or GPU) per rank, nothing written but metrics, split and trace.

    ``spec["engine_bounds"]`` None leaves the split to the engine's defaults (what users run)."""
    cfg = Config()
    cfg.model.name = spec["model"]
    cfg.data = _workers.data_config(spec)
    cfg.method.name, _, recompute = spec["method"].partition("_")
    cfg.method.stash = recompute or "weights"
    cfg.pipeline.k = spec["k"]
    if cfg.method.name != "dp" and spec["engine_bounds"] is not None:
        cfg.pipeline.split = spec["engine_bounds"][1:-1]
    t = cfg.trainer
    t.epochs, t.batch_size, t.eval_batch_size, t.threads, t.seed = (
        spec["epochs"], spec["batch_size"], spec["batch_size"], 1, spec["seed"])
    t.channels_last, t.precision = spec["channels_last"], spec["precision"]
    cfg.sched.name = "constant"
    cfg.dist.backend = "nccl" if spec["device"] == "cuda" else "gloo"
    cfg.dist.timeout_s = spec["timeout_s"]
    cfg.checkpoint.enabled = False
    cfg.logging.tensorboard, cfg.logging.progress, cfg.logging.trace = False, "never", True
    cfg.resume = "never"
    return cfg


def run_engine(spec: Spec) -> Spec:
    """Our engine through torch's elastic agent; whole epochs from metrics.jsonl, steady state and busy from the
    trace (the last module's forwards pace the pipeline; ``dp`` has one module per rank)."""
    cfg = engine_config(spec)
    validate(cfg)
    n = spec["train_size"] // spec["batch_size"]
    timed = range(spec["warmup"], spec["epochs"])
    lo, hi = _workers.steady_range(n)
    with tempfile.TemporaryDirectory(prefix="fdg_bench_") as tmp:
        run_dir = Path(tmp)
        ranks = _workers.launch(_workers.engine_rank, cfg.world_size, cfg.to_dict(), tmp)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steady = [_workers.engine_steady(run_dir, r, timed, n) for r in range(cfg.world_size)]
        bounds = None if cfg.method.name == "dp" else json.loads((run_dir / "split.json").read_text())["bounds"]
        choice = run_dir / "split_choice.json"  # why the engine chose its split (its trial, without the samples)
        tried = ([{**{k: t[k] for k in ("bounds", "predicted_s", "median_s", "se_s")}, "batches": len(t["trial_s"])}
                  for t in json.loads(choice.read_text())["tried"]] if choice.is_file() else None)
    last = 0 if cfg.method.name == "dp" else cfg.pipeline.k - 1
    return {"windows": [r["samples_per_s"] for r in rows if r["epoch"] in timed],
            "steady": [spec["batch_size"] * (hi - lo) / s for s in steady[last][0]],
            "peak_mem_mb": [r["peak_mem_mb"] for r in ranks],
            "busy": [statistics.mean(busy) for _, busy in steady], "bounds": bounds, "split_tried": tried}


def run_pipelining(spec: Spec) -> Spec:
    """A window lasts until the slowest stage has finished it (stages start each window at a barrier)."""
    ranks = _workers.launch(_workers.pipelining_rank, spec["k"], spec)
    lo, hi = _workers.steady_range(spec["train_size"] // spec["batch_size"])
    window_s = [max(ws) for ws in zip(*(r["window_s"] for r in ranks), strict=True)]
    steady_s = [max(ws) for ws in zip(*(r["steady_s"] for r in ranks), strict=True)]
    busy = None if ranks[0]["busy"] is None else [r["busy"] for r in ranks]
    return {"windows": [spec["train_size"] / w for w in window_s],
            "steady": [spec["batch_size"] * (hi - lo) / w for w in steady_s],
            "peak_mem_mb": [r["peak_mem_mb"] for r in ranks], "busy": busy, "bounds": ranks[0]["bounds"]}


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
    """One run: median steady-state and whole-epoch samples/s of its timed epochs, plus the load average around it."""
    load_before, tic = os.getloadavg(), time.perf_counter()
    try:
        raw = run_isolated(spec, timeout_s, work)
    except VariantError as e:
        return {"samples_per_s": None, "error": str(e), "wall_s": time.perf_counter() - tic}
    return {"samples_per_s": statistics.median(raw["steady"]), "epoch_samples_per_s": statistics.median(raw["windows"]),
            "steady_samples_per_s": raw["steady"], "windows_samples_per_s": raw["windows"],
            "peak_mem_mb": raw["peak_mem_mb"], "busy": raw["busy"], "wall_s": time.perf_counter() - tic,
            "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
            **{k: raw[k] for k in ("bounds", "split_tried") if raw.get(k)}}


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
                "bounds": common["pipelining_bounds"], "timeout_s": min(common["timeout_s"], PIPELINING_P2P_TIMEOUT_S)}
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
    """The run with the median steady-state samples/s (the lower one of an even count), so its other figures
    belong to it; a variant that failed in any round is reported failed."""
    failed = [r for r in variant_runs if r["samples_per_s"] is None]
    if failed:
        return failed[0]
    ranked = sorted(variant_runs, key=lambda r: r["samples_per_s"])
    chosen = ranked[(len(ranked) - 1) // 2]
    return {**chosen, "repeats_samples_per_s": [r["samples_per_s"] for r in variant_runs],
            "repeats_bounds": [r.get("bounds") for r in variant_runs],
            "repeats_split_tried": [r.get("split_tried") for r in variant_runs]}


def round_speedups(runs: dict[str, list[Spec]], baseline: str) -> dict[str, list[float | None]]:
    """Each variant's steady rate over the baseline's in the same round: the two ran minutes apart, so a slow
    spell on a shared machine moves both, and the spread of these ratios shows how far one round can be trusted."""
    base = runs.get(baseline, [])
    return {name: [r["samples_per_s"] / b["samples_per_s"] if r["samples_per_s"] and b["samples_per_s"] else None
                   for r, b in zip(variant_runs, base, strict=True)]
            for name, variant_runs in runs.items() if len(base) == len(variant_runs)}


def _progress(label: str, r: Spec) -> None:
    if r["samples_per_s"] is None:
        print(f"  {label:>22}: FAILED ({r.get('error', r.get('skipped'))})", file=sys.stderr, flush=True)
    else:
        print(f"  {label:>22}: {r['samples_per_s']:8.1f} samples/s steady, {r['epoch_samples_per_s']:8.1f} whole epoch "
              f"({r['wall_s']:.0f} s, load {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f})",
              file=sys.stderr, flush=True)


def machine_info(device: str) -> Spec:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device == "cuda" else []
    return {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "gpus": gpus, "python": platform.python_version(), "torch": torch.__version__}


def _fmt_list(values: list[float] | None, fmt: str) -> str:
    return "—" if not values else " / ".join(format(v, fmt) for v in values)


def _speedup(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def table(results: dict[str, Spec], config: Spec, machine: Spec) -> str:
    k = config["k"]
    cuda = config["device"] == "cuda"
    rows = ["| variant | steady samples/s | speedup vs bp_single_1thread | whole epoch samples/s | speedup "
            "| busy per rank | peak MB per rank | split | notes |", "|---|---:|---:|---:|---:|---|---|---|---|"]
    for name, r in results.items():
        if r["samples_per_s"] is None:
            rows.append(f"| {name} | failed | | | | | | | {r['error'].splitlines()[0][:120]} |")
            continue
        notes = f"{r['ranks']} rank(s) × " + ("1 GPU" if cuda else f"{r['threads_per_rank']} thread(s)")
        if len({str(b) for b in r.get("repeats_bounds", [])}) > 1:
            notes += ", split per repeat: " + " ".join(str(b) for b in r["repeats_bounds"])
        if name != BASELINE and r.get("repeats_speedup_vs_bp_1thread"):
            notes += ", speedup per round " + " / ".join(f"{v:.2f}" for v in r["repeats_speedup_vs_bp_1thread"])
        if "micro_batches" in r:
            notes += f", best M={r['micro_batches']} of " + ", ".join(
                f"M={m}: {'—' if v is None else f'{v:.0f}'}" for m, v in r["by_micro_batches"].items())
        rows.append(f"| {name} | {r['samples_per_s']:.1f} | {_speedup(r['speedup_vs_bp_1thread'])} "
                    f"| {r['epoch_samples_per_s']:.1f} | {_speedup(r['epoch_speedup_vs_bp_1thread'])} "
                    f"| {_fmt_list(r['busy'], '.2f')} | {_fmt_list(r['peak_mem_mb'], '.0f')} "
                    f"| {r.get('bounds', '—')} | {notes} |")
    start, end = config["loadavg_start"], config["loadavg_end"]
    n = config["train_size"] // config["batch_size"]
    lo, hi = _workers.steady_range(n)
    repeats = f" Median run of {config['repeats']} interleaved rounds." if config["repeats"] > 1 else ""
    where = f"{k} × {machine['gpus'][0]}" if cuda else f"{machine['cpu_count']} cores ({machine['cpu']})"
    rows += ["", f"{config['model']} in {'NHWC' if config['channels_last'] else 'NCHW'}, {config['precision']}, "
             f"batch {config['batch_size']}, K={k}, {config['train_size']} synthetic images ({n} batches) per epoch, "
             f"{config['epochs']} epochs of which {config['warmup']} warm-up. Steady = batches {lo}..{hi - 1} of each "
             f"epoch; whole epoch = all of them (our engine's fill and drain included); medians over the timed "
             f"epochs.{repeats} Split: {_SPLIT_NAMES.get(config['split'], 'by hand')} (the split column says which "
             "each variant ran). busy: engine = compute spans / steady-state time (trace), torch pipelining = CPU "
             "time / wall time (— on GPUs); memory: " + ("max_memory_allocated." if cuda else "peak RSS."),
             f"Load average (1/5/15 min): {start[0]:.2f} / {start[1]:.2f} / {start[2]:.2f} at start, "
             f"{end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f} at end, on {where}, torch {machine['torch']}."]
    return "\n".join(rows)


def choose_bounds(common: Spec, split: str) -> tuple[list[int] | None, list[int], list[float]]:
    """(our engine's bounds — None: its own default choice —, the torch pipelines' bounds, measured per-block times).

    ``split``: ``auto`` leaves our engine to its defaults and balances measured time for the torch pipelines,
    ``time`` balances measured time, ``flops`` counted FLOPs, ``i,j,…`` is given by hand.
    """
    blocks = models.build_blocks(common["model"], common["num_classes"])
    torch.set_num_threads(1)
    shape = (common["batch_size"], 3, common["image_size"], common["image_size"])
    device = torch.device("cuda", 0) if common["device"] == "cuda" else torch.device("cpu")
    seconds = partition.measured_block_costs(blocks, shape, device, precision=common["precision"],
                                             channels_last=common["channels_last"])
    if split in ("auto", "time"):
        bounds = partition.split_points(seconds, common["k"], "auto")
    elif split == "flops":
        bounds = partition.split_points(partition.block_costs(blocks, (1, *shape[1:])), common["k"], "auto")
    else:
        bounds = partition.split_points(seconds, common["k"], [int(i) for i in split.split(",")])
    return (None if split == "auto" else bounds), bounds, seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20", choices=models.names())
    p.add_argument("--k", type=int, default=2, help="pipeline modules = ranks = cores (or GPUs) used (default 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="epochs including warm-up (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="leading epochs not timed (default 1)")
    p.add_argument("--train-size", type=int, default=4096, help="synthetic images per epoch (default 4096)")
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="NAME",
                   help=f"variants to run (default all: {' '.join(VARIANTS)})")
    p.add_argument("--micro-batches", nargs="+", type=int, default=[2, 4, 8],
                   help="micro-batch counts tried for gpipe/1f1b; the best is reported (default 2 4 8)")
    p.add_argument("--split", default="auto",
                   help="auto (default: our engine chooses as users get it, torch pipelines balance measured time), "
                        "time (everyone: balance measured block times), flops (everyone: balance counted FLOPs) or "
                        "the K-1 block indices where modules 1..K-1 start, e.g. 11")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="every variant in NHWC (or NCHW with --no-channels-last); default: what our engine picks for "
                        "the device (trainer.channels_last=auto)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu (one thread per rank, gloo) or cuda (one GPU per rank, NCCL); default cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="fp32 or bf16 (autocast; trainer.precision=bf16 for our engine); default fp32")
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
            (args.batch_size >= 1 and args.train_size // args.batch_size < 4,
             f"--train-size {args.train_size} must hold at least 4 batches of {args.batch_size} (a steady state "
             "between the first and last quarter of the epoch)"),
            (args.batch_size % args.k != 0, f"--batch-size {args.batch_size} must divide over K={args.k} dp replicas"),
            (any(m < 1 for m in args.micro_batches), "--micro-batches must be ≥ 1"),
            (args.repeats < 1, f"--repeats {args.repeats} must be ≥ 1"),
            (args.split not in ("auto", "time", "flops") and not all(i.isdigit() for i in args.split.split(",")),
             f"--split {args.split!r} must be auto, time, flops or comma-separated block indices"),
            *_device_problems(args),
        ) if bad]
        if problems:
            p.error("; ".join(problems))
    return args


def _device_problems(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """--device cuda needs a GPU per rank; the K-thread baseline is a CPU variant."""
    if args.device != "cuda":
        return []
    gpus = torch.cuda.device_count()
    ranks = max(1, args.k) if set(args.methods) - set(SINGLE) else 1
    return [(gpus == 0, "--device cuda: no CUDA GPU is visible here (torch.cuda.device_count() == 0); run on a GPU "
                        "machine or use --device cpu"),
            (0 < gpus < ranks, f"--device cuda: --k {args.k} needs {ranks} GPUs (one per rank) but {gpus} are visible"),
            ("bp_single_allthreads" in args.methods,
             "--device cuda: bp_single_allthreads is the K-thread CPU baseline; bp_single_1thread is one GPU")]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return
    channels_last = args.channels_last
    if channels_last is None:
        channels_last = devices.fastest("trainer.channels_last", args.device)
    common = {"model": args.model, "k": args.k, "batch_size": args.batch_size, "epochs": args.epochs,
              "warmup": args.warmup, "train_size": args.train_size, "image_size": IMAGE_SIZE,
              "num_classes": NUM_CLASSES, "seed": args.seed, "timeout_s": min(args.timeout, 300.0),
              "channels_last": channels_last, "device": args.device, "precision": args.precision}
    try:
        common["engine_bounds"], common["pipelining_bounds"], costs = choose_bounds(common, args.split)
    except ValueError as e:
        sys.exit(f"throughput.py: --split {args.split}: {e}")
    try:
        validate(engine_config({**common, "method": "fdg"}))
    except ConfigError as e:
        sys.exit(f"throughput.py: invalid setting: {e}")
    methods = [v for v in VARIANTS if v in args.methods]
    balance = partition.balance_ratio(costs, common["pipelining_bounds"])
    config = {**common, "split": args.split, "block_costs": costs, "balance_ratio": balance,
              "methods": methods, "micro_batches": args.micro_batches, "repeats": args.repeats, "timeout_per_run_s": args.timeout,
              "optimizer": "sgd lr=0.1 momentum=0.9 weight_decay=5e-4", "data": "synthetic, augmented",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "loadavg_start": list(os.getloadavg()),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    machine = machine_info(args.device)
    print(f"throughput: {args.model} on {args.device} ({args.precision}, {'NHWC' if channels_last else 'NCHW'}), "
          f"batch {args.batch_size}, K={args.k}, {args.epochs} epochs × {args.train_size // args.batch_size} batches; "
          f"torch pipelines split {common['pipelining_bounds']} (balance {balance:.3f}), our engine "
          f"{common['engine_bounds'] or 'its default'}; load average {config['loadavg_start'][0]:.2f}",
          file=sys.stderr, flush=True)
    runs: dict[str, list[Spec]] = {name: [] for name in methods}
    with tempfile.TemporaryDirectory(prefix="fdg_throughput_") as tmp:
        for round_ in range(args.repeats):
            for name in methods:
                runs[name].append(measure_variant(name, common, args, Path(tmp)))
                _progress(name if args.repeats == 1 else f"{name} ({round_ + 1}/{args.repeats})", runs[name][-1])
    results = {name: median_run(variant_runs) for name, variant_runs in runs.items()}
    for name, ratios in round_speedups(runs, BASELINE).items():
        if len(ratios) > 1 and None not in ratios:
            results[name]["repeats_speedup_vs_bp_1thread"] = ratios
    base = results.get(BASELINE, {})
    for r in results.values():
        for rate, speedup in (("samples_per_s", "speedup_vs_bp_1thread"), ("epoch_samples_per_s", "epoch_speedup_vs_bp_1thread")):
            r[speedup] = r[rate] / base[rate] if r.get(rate) is not None and base.get(rate) else None
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
