"""Kill soak: SIGKILL a random rank of one K=3 run at random times, over and over, under plain
``torchrun --standalone --max-restarts=N`` (no environment variable), and compare the final weights with the
same run uninterrupted.

    python benchmarks/kill_soak.py [--kills 20] [--seed 0] [--out DIR]

Each cycle waits until every rank of the current attempt has its process group up, waits a random time
(uniform in [0, --max-delay] s: the kill lands in a forward/backward tick, the drain, the evaluation, a
checkpoint write or the resume of the next epoch), then SIGKILLs one rank chosen at random (first, middle or
last module).  torchrun restarts all ranks, which resume from the newest complete checkpoint.  A recovery is
the time from a kill until every rank of the next attempt has its process group up again.

Memory per rank over time: every rank's resident memory is sampled from outside every 2 s (and torchrun's
agent's); the summary gives, per rank, its memory in the first and the last attempt, and per epoch the
memory every rank reported at its end (``metrics.jsonl``): restarts must not ratchet it up.

Not part of the test suite: about 10 minutes on 2 CPU cores.  Ends with one line, e.g.

    soak: kills 20, recoveries 20, slowest recovery 9.1 s, bitwise equal yes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _memory import Sampler, workers

REPO = Path(__file__).resolve().parents[1]
K = 3
OVERRIDES = [f"pipeline.k={K}", "model=tiny", "data=synthetic", "data.test_size=64", "trainer.batch_size=16",
             "trainer.eval_batch_size=32", "trainer.threads=1", "optim.lr=0.05", "logging.tensorboard=false",
             "logging.progress=never", "checkpoint.enabled=true", "checkpoint.every_epochs=1", "resume=auto",
             "dist.timeout_s=60"]


def torchrun(run_dir: Path, restarts: int, epochs: int, train_size: int) -> subprocess.Popen:
    """The command a user types, in a user's environment (TCPStore sharing on)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={K}",
           f"--max-restarts={restarts}", "-m", "fdg_dist.train", *OVERRIDES, f"trainer.epochs={epochs}",
           f"data.train_size={train_size}", f"hydra.run.dir={run_dir}"]
    log = open(run_dir.parent / f"{run_dir.name}.out", "w")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def groups_up(run_dir: Path) -> int:
    """How many ranks have logged that their process group is up, over all attempts so far."""
    log = run_dir / "train.log"
    return log.read_text().count(f"/{K}: module") if log.exists() else 0


def wait_until(condition, proc: subprocess.Popen, what: str, limit_s: float = 300) -> bool:  # noqa: ANN001
    """Poll ``condition`` until true (True) or the run ends (False); fail after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise SystemExit(f"soak: {what} took over {limit_s:.0f} s: hung")
        time.sleep(0.05)
    return True


def memory_summary(sampler: Sampler, run_dir: Path) -> str:
    """Per rank: peak RSS in its first and last attempt (sampled from outside); per epoch, every rank's RSS at
    its end (metrics.jsonl); the agent's peak."""
    lines = []
    for rank in range(K):
        attempts = sorted(a for a, r in sampler.ranks if r == rank)
        if attempts:
            first, last = (max(mb for _, mb in sampler.ranks[(a, rank)]) for a in (attempts[0], attempts[-1]))
            lines.append(f"memory: rank {rank}: peak {first:.0f} MB in attempt {attempts[0]}, {last:.0f} MB in "
                         f"attempt {attempts[-1]} ({len(attempts)} attempts sampled)")
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    for row in rows:
        usage = " ".join(f"{name} {u['rss_mb']:.0f}" for name, u in row.get("memory", {}).items())
        lines.append(f"memory: epoch {row['epoch'] + 1} end: MB {usage}")
    lines.append(f"memory: torchrun's agent peak {max((mb for _, mb in sampler.launcher), default=0):.0f} MB")
    return "\n".join(lines)


def bitwise_equal(a: Path, b: Path) -> bool:
    x, y = (torch.load(p / "final_model.pt", weights_only=True) for p in (a, b))
    return sorted(x) == sorted(y) and all(torch.equal(x[n], y[n]) for n in x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30, help="long enough that the run outlives every kill")
    p.add_argument("--train-size", type=int, default=384)
    p.add_argument("--max-delay", type=float, default=4.0, help="seconds after an attempt is up, at most")
    p.add_argument("--out", type=Path, default=None, help="keep the two run directories here")
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="fdg-kill-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    started = time.monotonic()

    reference = out / "reference"
    if torchrun(reference, 0, args.epochs, args.train_size).wait() != 0:
        raise SystemExit(f"soak: the uninterrupted run failed, see {out / 'reference.out'}")
    print(f"uninterrupted run: {time.monotonic() - started:.0f} s", flush=True)

    run_dir = out / "killed"
    proc = torchrun(run_dir, args.kills, args.epochs, args.train_size)
    sampler = Sampler(proc.pid, lambda: workers(proc.pid))
    recoveries: list[float] = []
    killed_at = None
    kills = 0
    try:
        for attempt in range(args.kills + 1):
            if not wait_until(lambda a=attempt: groups_up(run_dir) >= K * (a + 1), proc, f"attempt {attempt}'s start"):
                break  # the run ended
            if killed_at is not None:
                recoveries.append(time.monotonic() - killed_at)
                print(f"  recovered in {recoveries[-1]:.1f} s", flush=True)
            if attempt == args.kills:
                break
            delay, rank = rng.uniform(0, args.max_delay), rng.randrange(K)
            time.sleep(delay)
            pid = workers(proc.pid).get((attempt, rank))
            if pid is None:
                break  # the run ended meanwhile
            os.kill(pid, signal.SIGKILL)
            killed_at, kills = time.monotonic(), kills + 1
            print(f"kill {kills}/{args.kills}: rank {rank} (module {rank}) {delay:.2f} s after attempt {attempt} "
                  f"was up", flush=True)
        code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        sampler.stop()
    print(memory_summary(sampler, run_dir))
    equal = code == 0 and bitwise_equal(reference, run_dir)
    slowest = f"{max(recoveries):.1f} s" if recoveries else "-"
    print(f"soak: {time.monotonic() - started:.0f} s, torchrun exit {code}, run dirs under {out}")
    print(f"soak: kills {kills}, recoveries {len(recoveries)}, slowest recovery {slowest}, "
          f"bitwise equal {'yes' if equal else 'no'}")
    return 0 if equal and kills == len(recoveries) == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
