"""Memory of a run's processes, read from outside: what the soaks report beside the ranks' own progress lines.

A sampler thread reads ``VmRSS`` of the launching process and of its worker processes every few seconds:
under torchrun the workers are found through ``/proc/<pid>/task/*/children`` and the ``RANK`` /
``TORCHELASTIC_RESTART_COUNT`` of their environment (``workers``); ``fdg-train``'s own launch spawns them with
that environment set only inside, so there they are found by the pid each rank logs at its start
(``logged_workers``).  The ranks' own view (each from ``/proc/self/statm``, with the batches done) comes from
the reporting rank's progress lines (``fdg_dist.observe.memory.parse``).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fdg_dist.observe import memory

_BATCH = re.compile(r" batch (\d+)/(\d+) ")


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def workers(agent: int) -> dict[tuple[int, int], int]:
    """{(attempt, rank): pid} of the agent's live worker processes, from their environment."""
    found = {}
    for task in Path(f"/proc/{agent}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for pid in children:
            try:
                env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
                           if "=" in item)
            except OSError:
                continue
            if "RANK" in env and "TORCHELASTIC_RESTART_COUNT" in env:
                found[(int(env["TORCHELASTIC_RESTART_COUNT"]), int(env["RANK"]))] = pid
    return found


_STARTED = re.compile(r"rank (\d+)/\d+: module .* pid (\d+)$")


def logged_workers(train_log: Path) -> dict[tuple[int, int], int]:
    """{(0, rank): pid} of the ranks that logged their start in ``train_log`` (the latest start of each)."""
    found = {}
    if train_log.exists():
        for line in train_log.read_text().splitlines():
            if (m := _STARTED.search(line)) is not None:
                found[(0, int(m.group(1)))] = int(m.group(2))
    return found


@dataclass
class Sampler:
    """Samples ``agent``'s RSS and that of the workers ``find`` names every ``every_s`` seconds on a thread, until
    ``stop``; kills the agent's process group (its own session) when a worker holds more than ``stop_above_mb``."""

    agent: int
    find: Callable[[], dict[tuple[int, int], int]]
    every_s: float = 2.0
    stop_above_mb: float | None = None
    launcher: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB)
    ranks: dict[tuple[int, int], list[tuple[float, float]]] = field(default_factory=dict)  # (attempt, rank)
    stopped: str | None = None  # why the run was killed

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - self._start
            if (mb := rss_mb(self.agent)) is not None:
                self.launcher.append((now, mb))
            for key, pid in self.find().items():
                if (mb := rss_mb(pid)) is not None:
                    self.ranks.setdefault(key, []).append((now, mb))
                    if self.stop_above_mb is not None and mb > self.stop_above_mb and self.stopped is None:
                        self.stopped = f"killed after {now:.0f} s: rank {key[1]} held {mb:.0f} MB"
                        os.killpg(self.agent, signal.SIGKILL)
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def progress_memory(train_log: Path) -> tuple[int, dict[str, list[tuple[int, float]]]]:
    """(batches of the epoch, per rank the (batches done, resident MB) of every progress line that shows memory)."""
    total, out = 0, {}
    for line in train_log.read_text().splitlines():
        if (usages := memory.parse(line)) is None or (m := _BATCH.search(line)) is None:
            continue
        total = int(m.group(2))
        for name, usage in usages.items():
            out.setdefault(name, []).append((int(m.group(1)), usage.rss_mb))
    return total, out


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
