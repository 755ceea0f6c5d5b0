"""Preemption: SIGTERM or SIGINT anywhere stops every rank after the same tick, mid-epoch.

A signal only sets a flag.  Every ``VOTE_EVERY``-th tick in which all ranks work (``executor``), each rank
adds its flag to an asynchronous all-reduce (MAX, on a gloo group, so it never touches a GPU) and reads the
result of the vote it started at least ``lag`` ticks earlier — normally long finished, so nobody waits.
Voting every tick cost a gloo collective per tick and rank (host work comparable to a fast GPU tick);
the price of voting less often is a bounded delay: a stop lands at most
``VOTE_EVERY · (⌈lag / VOTE_EVERY⌉ + 1)`` ticks after the signal (16 ticks for K ≤ 7).  Every rank reads
the same vote at the same tick, so all of them stop after the same tick: a consistent cut through the
pipeline, which the trainer saves (stashes and messages in flight included) and the same command resumes
bit for bit.  ``lag`` exceeds how far ranks drift apart (module 0 runs up to K-1 ticks ahead of the
last module), so the vote adds no coupling between them.

The same vote carries every rank's memory (``memory.Usage``; each rank fills its own slots, the others
are zero, MAX keeps them): the reporting rank's progress lines show every rank's resident memory, ``lag``
ticks old, without a message of their own.

Must not save or exit itself: it only makes every rank agree when to stop; the trainer saves and the worker
exits.
"""

from __future__ import annotations

import signal
from collections import deque
from types import FrameType

import torch
import torch.distributed as dist

from fdg_dist.observe.memory import FIELDS, Usage

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
VOTE_EVERY = 8  # ticks between votes: a tick number divisible by it, the same ticks on every rank


class Stopped(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; the same command resumes it.  Processes end
    with 128 + the signal's number, as if killed by it."""

    SAME_COMMAND = "the same command resumes it"  # the launcher replaces it by the command (hydra.run.dir included)

    def __init__(self, message: str, signum: signal.Signals) -> None:
        super().__init__(message)
        self.signum = signum


class Preemption:
    """This rank's stop flag (set by a signal) and the rolling vote that turns it into an agreed tick.

    A vote carries the signal's number (0: none), reduced with MAX, so every rank also learns which signal
    stopped the run, whichever rank received it.
    """

    def __init__(self, group: dist.ProcessGroup | None, lag: int, device: torch.device, *,
                 every: int = VOTE_EVERY) -> None:
        self.group = group
        self.every = every
        self.lag = -(-lag // every)  # in votes: at least ``lag`` ticks between posting a vote and reading it
        self.device = device  # whose memory this rank reports
        self.received: signal.Signals | None = None  # the first signal this rank received
        self.agreed: signal.Signals | None = None  # the signal every rank agreed to stop on
        self.memory: list[Usage] | None = None  # every rank's (by rank in the group) as of the last vote read
        self._votes: deque[tuple[dist.Work, torch.Tensor]] = deque()

    def install(self) -> None:
        """Catch SIGTERM (SLURM, torchrun stopping its workers) and SIGINT (Ctrl-C).  Repeats are ignored: a
        Ctrl-C reaches a worker twice (from the terminal and from the launcher), and a launcher that stops
        waiting kills its workers after 30 s anyway."""
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum)

    def at(self, tick: int) -> bool:
        """Post this tick's vote (on every ``every``-th tick only); True if the vote of at least ``lag`` ticks ago
        says stop (the same on every rank)."""
        if tick % self.every:
            return False
        flag = self._flag()
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
        flag = self._flag()
        dist.all_reduce(flag, dist.ReduceOp.MAX, group=self.group)
        return self._read(None, flag)

    def _flag(self) -> torch.Tensor:
        """[signal number or 0, then every rank's memory slots: this rank's filled, the others zero]."""
        flag = torch.zeros(1 + FIELDS * dist.get_world_size(self.group), dtype=torch.int64)
        flag[0] = 0 if self.received is None else int(self.received)
        mine = 1 + FIELDS * dist.get_rank(self.group)
        flag[mine:mine + FIELDS] = torch.tensor(Usage.now(self.device).to_ints())
        return flag

    def _read(self, work: dist.Work | None, flag: torch.Tensor) -> bool:
        if work is not None:
            work.wait()
        values = flag.tolist()  # a CPU tensor: no device sync
        self.memory = [Usage.from_ints(values[i:i + FIELDS]) for i in range(1, len(values), FIELDS)]
        if values[0]:
            self.agreed = self.agreed or signal.Signals(values[0])
        return bool(values[0])
