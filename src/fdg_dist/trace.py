"""Chrome/Perfetto timeline of what each rank did at every tick (``logging.trace=true``).

One JSON file per rank under ``trace/``; open them in https://ui.perfetto.dev or chrome://tracing.
Each action is a span ("forward 12", "backward 9", "step"), split into the time it waited for its
input and the time it computed, with the tick, batch, stash depth and applied batches as arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

from fdg_dist.checkpoint import atomic_write
from fdg_dist.executor import Event


def events_to_chrome(events: list[Event], *, rank: int, module: int, epoch: int, phase: str, t0: float) -> list[dict]:
    out = []
    for e in events:
        a = e.action
        name = a.kind.value if a.kind.value == "step" else f"{a.kind.value} {a.batch}"
        args = {"tick": a.tick, "batch": a.batch, "epoch": epoch, "phase": phase, "stash": e.stash}
        if e.batches:
            args["applied_batches"] = list(e.batches)
        start_us = (e.start - t0) * 1e6
        if e.wait_s > 0:
            out.append({"name": f"wait {name}", "cat": "wait", "ph": "X", "pid": rank, "tid": module,
                        "ts": start_us, "dur": e.wait_s * 1e6, "args": args})
        out.append({"name": name, "cat": a.kind.value, "ph": "X", "pid": rank, "tid": module,
                    "ts": start_us + e.wait_s * 1e6, "dur": e.compute_s * 1e6, "args": args})
    return out


class TraceWriter:
    """Collects a rank's spans over the run and rewrites its file at each epoch end (cheap, off the hot path)."""

    def __init__(self, run_dir: Path, rank: int, module: int, t0: float) -> None:
        self.path = run_dir / "trace" / f"rank{rank}.json"
        self.rank, self.module, self.t0 = rank, module, t0
        self.spans: list[dict] = [{"name": "process_name", "ph": "M", "pid": rank,
                                   "args": {"name": f"rank {rank} (module {module})"}}]

    def add(self, events: list[Event], *, epoch: int, phase: str) -> None:
        self.spans += events_to_chrome(events, rank=self.rank, module=self.module, epoch=epoch, phase=phase, t0=self.t0)
        # atomically: a crash mid-write still leaves the previous epochs' timeline to look at
        atomic_write(json.dumps({"traceEvents": self.spans, "displayTimeUnit": "ms"}).encode(), self.path)
