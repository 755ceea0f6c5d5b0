"""Long-epoch soak: one epoch of thousands of batches, with every rank's resident memory over the epoch.

What a user's run looks like to memory: a buffer that outlives its step (SPEC §7) shows as resident memory
growing with the batches, which tests of a few batches never see.  By default a K = 4 FDG pipeline of the
tiny model on synthetic images, 3000 batches of 8 in one epoch; any ``fdg-train`` overrides after ``--``
replace or extend that (the CIFAR-10 measurement of the docs: ``-- model=resnet20 data=imagefolder
data.root=../shared/data/cifar10 data.train_size=null`` with ``--k 3`` or ``--k 4`` and ``--batch-size 128``).

    python benchmarks/long_epoch_soak.py [--k 4] [--batches 3000] [--batch-size 8] [--out DIR] [-- OVERRIDES]

``fdg-train`` runs as users run it (its own process launching the workers).  Memory is read two ways:
by each rank from its own ``/proc/self/statm``, shown with the batches done in the reporting rank's
progress lines (every ``--every-s`` seconds), and from outside, ``VmRSS`` of every worker and of the launcher
every ``--sample-s`` seconds.  Reported per rank: resident MB after the first 20 batches, the peak of the
epoch, their ratio, and the slope (KiB per batch) from a quarter of the epoch on; the launcher's RSS.
``soak.json`` (every sample) and ``soak.md`` (the table) go to ``--out``.  Ends with one line, e.g.

    soak: K=4, 3000 batches of 8 in 412 s; worst peak / after 20 batches 1.02 (module0), steepest 3.1 KiB/batch

and exits 1 when a rank's peak exceeds its memory after 20 batches by more than ``--tolerance`` (10 %), or
when a rank held more than ``--stop-above-mb`` (8000), at which point the run is killed (a leak measured
without hurting a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _memory import Sampler, logged_workers, progress_memory, slope

REPO = Path(__file__).resolve().parents[1]
AFTER = 20  # batches: warm-up done, the reference point of the ratio


def command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """``python -m fdg_dist.train`` with the soak's settings, each replaced by an override of the same key (the
    synthetic set's sizes go with another ``data=``)."""
    own_data = any(item.startswith("data=") for item in args.overrides)
    synthetic = [] if own_data else ["data=synthetic", f"data.train_size={args.batches * args.batch_size}",
                                     f"data.test_size={args.batch_size}"]
    settings = [f"pipeline.k={args.k}", "method=fdg", "model=tiny", *synthetic,
                f"trainer.batch_size={args.batch_size}", f"trainer.eval_batch_size={args.batch_size}",
                "trainer.epochs=1", "trainer.threads=1", "pipeline.cost=flops", "checkpoint.enabled=false",
                "logging.tensorboard=false", "logging.progress=lines", f"logging.progress_every_s={args.every_s}",
                f"dist.timeout_s={args.timeout_s}", *args.overrides, f"hydra.run.dir={run_dir}"]
    merged = {item.split("=", 1)[0]: item for item in settings}  # later wins, in the first one's place
    return [sys.executable, "-m", "fdg_dist.train", *merged.values()]


def report(run_dir: Path, sampler: Sampler, wall_s: float, args: argparse.Namespace) -> dict:
    """Per rank: progress-line memory after AFTER batches, peak, ratio, slope; the outside samples; the launcher."""
    total, series = progress_memory(run_dir / "train.log")
    ranks = {}
    for name, points in sorted(series.items()):
        after = next((mb for b, mb in points if b >= AFTER), points[0][1])
        peak = max(mb for _, mb in points)
        ranks[name] = {"after_20_mb": after, "peak_mb": peak, "ratio": peak / after,
                       "slope_kib_per_batch": 1024 * slope([p for p in points if p[0] >= total // 4]),
                       "series": points}
    outside = {f"attempt{a}/rank{r}": {"peak_mb": max(mb for _, mb in s), "series": s}
               for (a, r), s in sorted(sampler.ranks.items())}
    launcher = [mb for _, mb in sampler.launcher]
    return {"command": command(args, run_dir), "batches": total, "wall_s": wall_s, "ranks": ranks,
            "outside": outside, "launcher": {"median_mb": sorted(launcher)[len(launcher) // 2] if launcher else None,
                                             "peak_mb": max(launcher, default=None), "series": sampler.launcher}}


def table(result: dict) -> str:
    rows = ["| rank | MB after 20 batches | peak MB | peak / after 20 | slope after ¼ epoch (KiB/batch) | outside peak MB |",
            "|---|---|---|---|---|---|"]
    for name, r in result["ranks"].items():
        k = int(name.removeprefix("module").split("-")[0])
        outside = max((o["peak_mb"] for key, o in result["outside"].items() if key.endswith(f"/rank{k}")), default=0)
        rows.append(f"| {name} | {r['after_20_mb']:.0f} | {r['peak_mb']:.0f} | {r['ratio']:.3f} | "
                    f"{r['slope_kib_per_batch']:.1f} | {outside:.0f} |")
    launcher = result["launcher"]
    rows.append(f"\nlauncher (`fdg-train` itself): median {launcher['median_mb']:.0f} MB, peak {launcher['peak_mb']:.0f} MB")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batches", type=int, default=3000, help="batches of the synthetic epoch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--every-s", type=float, default=2.0, help="seconds between progress lines")
    p.add_argument("--sample-s", type=float, default=2.0, help="seconds between outside samples")
    p.add_argument("--timeout-s", type=int, default=300, help="dist.timeout_s (module 0 builds the data first)")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--stop-above-mb", type=float, default=8000, help="kill the run when a rank holds more")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="fdg-train overrides (after --)")
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="fdg-long-epoch-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    with open(out / "run.out", "w") as log:
        proc = subprocess.Popen(command(args, run_dir), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sampler = Sampler(proc.pid, lambda: logged_workers(run_dir / "train.log"), args.sample_s,
                          stop_above_mb=args.stop_above_mb)
        code = proc.wait()
        sampler.stop()
    wall = time.monotonic() - started
    if code != 0 and not sampler.stopped:
        raise SystemExit(f"soak: fdg-train exited {code}, see {out / 'run.out'}")
    result = report(run_dir, sampler, wall, args)
    if sampler.stopped:
        result["stopped"] = sampler.stopped
        print(f"soak: {sampler.stopped}: the table covers the batches before")
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "soak.md").write_text(table(result))
    print(table(result))
    worst = max(result["ranks"].items(), key=lambda item: item[1]["ratio"])
    steepest = max(r["slope_kib_per_batch"] for r in result["ranks"].values())
    print(f"soak: K={args.k}, {result['batches']} batches in {wall:.0f} s; worst peak / after {AFTER} batches "
          f"{worst[1]['ratio']:.3f} ({worst[0]}), steepest {steepest:.1f} KiB/batch; {out}")
    return 0 if worst[1]["ratio"] <= 1 + args.tolerance and not sampler.stopped else 1


if __name__ == "__main__":
    sys.exit(main())
