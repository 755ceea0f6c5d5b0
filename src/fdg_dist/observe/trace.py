"""Chrome/Perfetto timeline of what each rank did at every tick (``logging.trace=true``).

One JSON file per rank under ``trace/``; open them in https://ui.perfetto.dev or chrome://tracing.
Each action is a span ("forward 12", "backward 9", "step"), split into the time it waited for its
input and the time it computed, with the tick, batch, stash depth and applied batches as arguments.

Spans are written as their actions' times resolve, one line each, to ``rank{r}.part`` beside the trace,
and ``flush`` (at every epoch end) appends them to the trace file: the timeline of a long run never sits
in memory, and a crash mid-epoch leaves the previous epochs' timeline readable.

Must not time anything itself nor hold a whole epoch in memory: the executor's clock times, this only writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from fdg_dist.engine.executor import Event

_HEAD = b'{"traceEvents": [\n'
_TAIL = b'\n], "displayTimeUnit": "ms"}'
_CHUNK = 1 << 20


def event_to_chrome(e: Event, *, rank: int, module: int, epoch: int, phase: str, t0: float) -> list[dict]:
    """The spans of one action: its wait for its input (if it waited) and its compute."""
    a = e.action
    name = a.kind.value if a.kind.value == "step" else f"{a.kind.value} {a.batch}"
    args = {"tick": a.tick, "batch": a.batch, "epoch": epoch, "phase": phase, "stash": e.stash}
    if e.batches:
        args["applied_batches"] = list(e.batches)
    start_us = (e.start - t0) * 1e6
    out = []
    if e.wait_s > 0:
        out.append({"name": f"wait {name}", "cat": "wait", "ph": "X", "pid": rank, "tid": module,
                    "ts": start_us, "dur": e.wait_s * 1e6, "args": args})
    out.append({"name": name, "cat": a.kind.value, "ph": "X", "pid": rank, "tid": module,
                "ts": start_us + e.wait_s * 1e6, "dur": e.compute_s * 1e6, "args": args})
    return out


class TraceWriter:
    """A rank's timeline for this attempt of the run: ``hook`` gives the executor's ``on_timed`` callback of a
    pass, which writes each action's spans as they come; ``flush`` adds them to the trace file."""

    def __init__(self, run_dir: Path, rank: int, module: int, t0: float) -> None:
        self.path = run_dir / "trace" / f"rank{rank}.json"
        self.part = self.path.with_suffix(".part")
        self.rank, self.module, self.t0 = rank, module, t0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.started = False  # the trace file holds this attempt's timeline (a previous attempt's is replaced)
        self._part = open(self.part, "w")  # noqa: SIM115 - open for the run; flush closes and reopens it
        self._write({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank} (module {module})"}})

    def hook(self, epoch: int, phase: str) -> Callable[[Event], None]:
        def add(e: Event) -> None:
            for span in event_to_chrome(e, rank=self.rank, module=self.module, epoch=epoch, phase=phase, t0=self.t0):
                self._write(span)
        return add

    def _write(self, span: dict) -> None:
        self._part.write(json.dumps(span) + "\n")

    def flush(self) -> None:
        """Append the spans written since the last flush: the old content and the new spans go to a new file,
        synced and renamed over the old one (a crash leaves the old timeline or the new one, never half)."""
        self._part.close()
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as out:
                separator = self._copy_old(out)
                with open(self.part, "rb") as new:
                    for line in new:
                        out.write(separator + line.rstrip(b"\n"))
                        separator = b",\n"
                out.write(_TAIL)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.started = True
        self._part = open(self.part, "w")  # noqa: SIM115

    def close(self) -> None:
        """End of the run: the spans are all in the trace file; the side file goes."""
        self._part.close()
        self.part.unlink(missing_ok=True)

    def _copy_old(self, out) -> bytes:
        """Write the trace so far without its closing tail (a new head at the first flush, whose first span then
        needs no separator); returns the separator for the next span."""
        if not self.started:
            out.write(_HEAD)
            return b""
        with open(self.path, "rb") as old:
            left = os.fstat(old.fileno()).st_size - len(_TAIL)
            while left > 0:
                chunk = old.read(min(left, _CHUNK))
                out.write(chunk)
                left -= len(chunk)
        return b",\n"
