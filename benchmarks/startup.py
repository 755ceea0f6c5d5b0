"""Where a short run's seconds go before and after training: the smoke test and a two-job sweep, timed from
outside, for this source tree and (optionally) another one, interleaved.

Run: ``python benchmarks/startup.py [--rounds 3] [--baseline-src OTHER/src] [--json out.json]``.
Each round starts ``python -m fdg_dist.train experiment=quick_synthetic`` (and, with ``--sweep``, the sweep
``-m … method.beta=0.5,1``) in a fresh process per variant, the variants alternating so that load from other
processes hits them alike.  A reader thread stamps every console line as it arrives: the first worker line
(``rank 0/``: imports, the configuration check, spawning or forking, process groups), the run's summary
(training done), and the exit.  A sweep job's overhead is its wall time (from its ``=== sweep job`` header to
the next one, or to the exit) less the training time its summary reports.  ``--baseline-src`` is another
checkout's ``src`` (``git worktree add /tmp/base <commit>``) run with the same interpreter, e.g. the code
before a start-up change.  Medians per variant, with the load average and the processor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from time_to_accuracy import processor  # benchmarks/ is this script's directory

SRC = Path(__file__).resolve().parents[1] / "src"
SMOKE = ["experiment=quick_synthetic", "logging.progress=never"]
SWEEP = ["-m", *SMOKE, "method.beta=0.5,1"]
_TRAINING = re.compile(r"training time\s+([0-9.]+) s")


def stamped(src: Path, args: list[str], run_dir: Path, timeout: float) -> list[tuple[float, str]]:
    """``(seconds since start, line)`` for every console line of ``python -m fdg_dist.train ARGS``, then the
    launcher's exit (what a shell's prompt waits for) and its output's end (what a pipe waits for: the warm
    server, which holds the console for the workers it forks, leaves a moment after the launcher)."""
    key = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fdg_dist.train", *args, f"{key}={run_dir}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=run_dir.parent)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.perf_counter() - start, line.rstrip())
                                                          for line in proc.stdout))  # type: ignore[union-attr]
    reader.start()
    code = proc.wait(timeout=timeout)
    exited = time.perf_counter() - start
    reader.join()
    if code != 0:
        raise SystemExit(f"{src}: {' '.join(args)} exited {code}:\n" + "\n".join(line for _, line in lines[-20:]))
    return [*lines, (exited, "<exit>"), (time.perf_counter() - start, "<output closed>")]


def first(lines: list[tuple[float, str]], text: str) -> float:
    return next(t for t, line in lines if text in line)


def smoke_phases(lines: list[tuple[float, str]]) -> dict[str, float]:
    exit_s, closed_s = first(lines, "<exit>"), first(lines, "<output closed>")
    worker, done = first(lines, "rank 0/"), first(lines, "run finished")
    return {"wall_s": exit_s, "first_worker_line_s": worker, "worker_line_to_finished_s": done - worker,
            "finished_to_exit_s": exit_s - done, "output_closed_s": closed_s}


def sweep_overheads(lines: list[tuple[float, str]]) -> list[float]:
    """Per job: its wall time less the training time its summary reports."""
    starts = [t for t, line in lines if line.startswith("=== sweep job")]
    ends = [*starts[1:], first(lines, "<exit>")]
    trained = [float(m.group(1)) for _, line in lines if (m := _TRAINING.search(line))]
    return [end - begin - train for begin, end, train in zip(starts, ends, trained, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-src", type=Path, help="another checkout's src/, run interleaved with this one")
    parser.add_argument("--sweep", action="store_true", help="also time the two-job sweep")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    variants = {"this tree": SRC, **({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})}
    results: dict[str, dict[str, list]] = {name: {"smoke": [], "sweep_overhead_s": []} for name in variants}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="fdg-startup-") as tmp:
        for round_ in range(args.rounds):
            for name, src in variants.items():
                lines = stamped(src, SMOKE, Path(tmp) / f"{name}-{round_}".replace(" ", "_"), args.timeout)
                results[name]["smoke"].append(smoke_phases(lines))
                if args.sweep:
                    lines = stamped(src, SWEEP, Path(tmp) / f"{name}-sweep-{round_}".replace(" ", "_"), args.timeout)
                    results[name]["sweep_overhead_s"] += sweep_overheads(lines)
                load.append(os.getloadavg()[0])
    cpu = processor()
    print(f"{cpu}, {os.cpu_count()} cores, load average (1 min) {min(load):.2f}-{max(load):.2f}, "
          f"{args.rounds} rounds, medians:")
    for name, r in results.items():
        phases = {key: statistics.median(p[key] for p in r["smoke"]) for key in r["smoke"][0]}
        print(f"  {name:<10} smoke test " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) +
              (f"; sweep job overhead {statistics.median(r['sweep_overhead_s']):.2f} s" if r["sweep_overhead_s"] else ""))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "load": load, "results": results}, indent=1))


if __name__ == "__main__":
    main()
