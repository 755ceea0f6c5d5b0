"""Time to accuracy: how long each way of using the machine's cores takes to reach back-propagation's final test error.

What a user choosing FDG for speed reads: the wall time until the test error first reaches the error plain
back-propagation ends with (or, where a run never reaches it, its error at back-propagation's training time).
One invocation trains, one after the other on the same machine, the same recipe (default: the longer budget,
``experiment=budget_long_cifar10_resnet20``) as

- ``bp_2threads``: back-propagation in one process with two intra-op threads (``pipeline.k=1 trainer.threads=2``);
- ``dp_2replicas``: two data-parallel replicas, one thread each (``method=dp pipeline.k=2``);
- ``fdg_k2``: FDG with two modules, one thread each (``pipeline.k=2``, plus ``--fdg`` overrides: the setting
  README recommends at K = 2),

reads each run's ``metrics.jsonl`` (test error after every epoch, the epoch's training time) and writes
``OUT/time_to_accuracy.md`` and ``.json``: per run the cumulative training time at each epoch and its test error,
the time to back-propagation's final error, and the load average before and after it (``uptime``).  Training time
counts the epochs' training passes (``epoch_time_s``), not start-up or evaluation, which are the same work for
all three.  A run whose ``result.json`` exists in OUT is read, not run again (the table says so); speed
comparisons hold only between runs of one invocation on a machine with nothing else running.

    python benchmarks/time_to_accuracy.py --data-root /path/to/cifar10 --out runs/tta \\
        [--fdg "corrector=lr_by_delay ..."] [--seed 0] [--preset budget_long_cifar10_resnet20] [-- overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "bp_2threads": ["pipeline.k=1", "trainer.threads=2"],
    "dp_2replicas": ["method=dp", "pipeline.k=2", "trainer.threads=1"],
    "fdg_k2": ["pipeline.k=2", "trainer.threads=1"],
}
BASELINE = "bp_2threads"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def processor() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def train(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    """Run one variant (unless its result exists); what happened around it."""
    run_dir = args.out / name
    if (run_dir / "result.json").exists():
        return {"reused": True}
    before, start = load_average(), time.time()
    root = [f"data.root={args.data_root}"] if args.data_root else []
    cmd = [*shlex.split(args.fdg_train), f"experiment={args.preset}", *root, f"hydra.run.dir={run_dir}", "logging.progress=never", f"trainer.seed={args.seed}", *overrides,
           *args.overrides]
    print(f"{time.strftime('%H:%M:%S')} {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    return {"reused": False, "load_before": before, "load_after": load_average(), "elapsed_s": time.time() - start}


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(cumulative training seconds, test error) after every epoch."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out, seconds = [], 0.0
    for row in rows:
        seconds += row["epoch_time_s"]
        out.append((seconds, row["test_error"]))
    return out


def time_to(points: list[tuple[float, float]], error: float) -> float | None:
    """Training seconds until the test error is first at or below ``error`` (None: never)."""
    return next((s for s, e in points if e <= error), None)


def error_at(points: list[tuple[float, float]], seconds: float) -> float | None:
    """The test error of the last epoch finished within ``seconds`` of training (None: none was)."""
    done = [e for s, e in points if s <= seconds]
    return done[-1] if done else None


def summarise(runs: dict[str, dict], out: Path) -> tuple[str, dict]:
    curves = {name: curve(out / name) for name in runs}
    target = curves[BASELINE][-1][1]
    bp_time = curves[BASELINE][-1][0]
    rows, table = {}, []
    for name, points in curves.items():
        reached = time_to(points, target)
        rows[name] = {**runs[name], "overrides": VARIANTS[name], "epochs": points, "final_error": points[-1][1],
                      "training_s": points[-1][0], "time_to_bp_final_s": reached,
                      "error_at_bp_time": error_at(points, bp_time),
                      "speedup_to_accuracy": bp_time / reached if reached else None}
        r = rows[name]
        when = "reused from an earlier invocation" if r["reused"] else f"{r['load_before']} → {r['load_after']}"
        to = f"{reached:.0f} ({r['speedup_to_accuracy']:.2f}×)" if reached else "not reached"
        at = "–" if r["error_at_bp_time"] is None else f"{100 * r['error_at_bp_time']:.2f}"
        epochs = " → ".join(f"{100 * e:.2f} @ {s:.0f}s" for s, e in points)
        table.append(f"| {name} | {100 * r['final_error']:.2f} | {r['training_s']:.0f} | {to} | {at} | {epochs} | {when} |")
    head = ["| run | final test error (%) | training time (s) | time to BP's final error (s, speed-up) | "
            "error at BP's training time (%) | per epoch: error @ cumulative training time | load average "
            "(1/5/15 min) before → after |", "|---|---:|---:|---:|---:|---|---|"]
    return "\n".join(head + table) + "\n", {"target_error": target, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", help="the preset's data.root (an ImageFolder with train/ and val/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="budget_long_cifar10_resnet20")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fdg", default="", help="overrides for fdg_k2 (the recommended K = 2 setting)")
    parser.add_argument("--fdg-train", default="fdg-train", help="the command that trains")
    parser.add_argument("overrides", nargs="*", help="for every run (after --)")
    args = parser.parse_args()
    VARIANTS["fdg_k2"] = VARIANTS["fdg_k2"] + shlex.split(args.fdg)
    runs = {name: train(name, overrides, args) for name, overrides in VARIANTS.items()}
    table, data = summarise(runs, args.out)
    data |= {"processor": processor(), "cpus": os.cpu_count(), "preset": args.preset, "seed": args.seed}
    (args.out / "time_to_accuracy.json").write_text(json.dumps(data, indent=2) + "\n")
    header = (f"{args.preset}, seed {args.seed}, on {data['processor']} ({data['cpus']} CPUs); target: "
              f"{BASELINE}'s final test error {100 * data['target_error']:.2f} %\n\n")
    (args.out / "time_to_accuracy.md").write_text(header + table)
    print(header + table)


if __name__ == "__main__":
    main()
