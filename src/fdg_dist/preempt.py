"""Preemption: SIGTERM or SIGINT anywhere stops every rank after the same tick, mid-epoch.

A signal only sets a flag.  Every tick in which all ranks work (``executor``), each rank adds its flag
to an asynchronous all-reduce (MAX, on a gloo group, so it never touches a GPU) and reads the result of
the vote it started ``lag`` ticks earlier — normally long finished, so nobody waits.  Every rank reads
the same vote at the same tick, so all of them stop after the same tick: a consistent cut through the
pipeline, which the trainer saves (stashes and messages in flight included) and the same command resumes
bit for bit.  ``lag`` exceeds how far ranks drift apart (module 0 runs up to K-1 ticks ahead of the
last module), so the vote adds no coupling between them.
"""

from __future__ import annotations

import signal
from collections import deque
from types import FrameType

import torch
import torch.distributed as dist

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; the same command resumes it."""


class Preemption:
    """This rank's stop flag (set by a signal) and the rolling vote that turns it into an agreed tick."""

    def __init__(self, group: dist.ProcessGroup | None, lag: int) -> None:
        self.group = group
        self.lag = lag
        self.signal: str | None = None  # name of the first signal received
        self._votes: deque[tuple[dist.Work, torch.Tensor]] = deque()

    def install(self) -> None:
        """Catch SIGTERM (SLURM, torchrun stopping its workers) and SIGINT (Ctrl-C).  Repeats are ignored: a
        Ctrl-C reaches a worker twice (from the terminal and from the launcher), and a launcher that stops
        waiting kills its workers after 30 s anyway."""
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = self.signal or signal.Signals(signum).name

    def at(self, tick: int) -> bool:
        """Post this tick's vote; True if the vote of ``lag`` ticks ago says stop (the same on every rank)."""
        flag = torch.tensor([int(self.signal is not None)])
        self._votes.append((dist.all_reduce(flag, dist.ReduceOp.MAX, group=self.group, async_op=True), flag))
        if len(self._votes) <= self.lag:
            return False
        return self._read(*self._votes.popleft())

    def close(self) -> None:
        """Read the votes still open at the end of a pass (every rank holds the same ones)."""
        while self._votes:
            self._read(*self._votes.popleft())

    def agree(self) -> bool:
        """A blocking vote at a point every rank reaches (an epoch end): does anyone want to stop?"""
        flag = torch.tensor([int(self.signal is not None)])
        dist.all_reduce(flag, dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    @staticmethod
    def _read(work: dist.Work, flag: torch.Tensor) -> bool:
        work.wait()
        return bool(flag.item())  # a CPU tensor: no device sync
