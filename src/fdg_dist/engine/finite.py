"""``trainer.nan_policy=stop`` without a host wait per step.

Asking "is this loss finite?" on the host makes the CPU wait for the GPU, so it can never run ahead and
every bit of Python overhead becomes idle device time.  Instead each step's finiteness flags stay on the
device and are copied to the host without blocking; at every later step the host *polls* the copies
(``Event.query``, no wait) and reads those that have arrived.  Only a copy more than ``LAG`` steps old is
waited for, so a NaN or inf stops the run at most ``LAG`` steps after it appeared (one step on the CPU,
where the flags are on the host at once), and the error names the step where it appeared.  ``flush``
reads every outstanding flag at once; the trainer calls it at every epoch end, before evaluation and
checkpoints, so a non-finite model is never saved.

Must not make the host wait for the device at any step, nor decide more than ``trainer.nan_policy`` says.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import torch


class NonFiniteError(FloatingPointError):
    """A NaN/inf loss or gradient: the run stops with the step and module named."""


_HINT = "; lower optim.lr or set trainer.nan_policy=skip_step"

LAG = 4  # steps a flag may stay unread while its copy is in flight; the host waits only beyond that


class Arrival(Protocol):
    """What ``torch.cuda.Event`` offers: has the copy arrived (no wait), and wait for it."""

    def query(self) -> bool: ...
    def synchronize(self) -> None: ...


class FiniteWatch:
    """Device-side finiteness flags of one stage, published per step and read when they have arrived."""

    def __init__(self, device: torch.device, *, enabled: bool = True) -> None:
        self.device = device
        self.enabled = enabled and device.type != "meta"  # meta tensors hold no values to check
        self._pending: list[tuple[torch.Tensor, str]] = []  # this step's flags (device) and what each checks
        # published steps, oldest first: host flags, what each checks, the copy's arrival (None: on the host)
        self._published: deque[tuple[torch.Tensor, list[str], Arrival | None]] = deque()

    def watch(self, value: torch.Tensor, what: str) -> None:
        """Remember whether ``value`` is finite (a device op, no sync); ``what`` names it in the error."""
        if self.enabled:
            self._pending.append((torch.isfinite(value.detach()).all(), what))

    def publish(self) -> None:
        """Start moving this step's flags to the host and read the earlier steps' flags that are there.

        A step is read once a newer one is published and its copy has arrived, or unconditionally (a wait)
        once ``LAG`` newer steps are: the bound on how late a stop comes.
        """
        if not self._pending:
            return
        flags = torch.stack([f for f, _ in self._pending])
        names = [w for _, w in self._pending]
        self._pending = []
        host, arrival = self._to_host(flags)
        self._published.append((host, names, arrival))
        while len(self._published) > 1 and (len(self._published) > LAG or _arrived(self._published[0][2])):
            _check(*self._published.popleft())

    def flush(self) -> None:
        """Read every outstanding flag now (epoch end: a wait there costs nothing)."""
        self.publish()
        while self._published:
            _check(*self._published.popleft())

    def _to_host(self, flags: torch.Tensor) -> tuple[torch.Tensor, Arrival | None]:
        """A host copy of ``flags`` and the event that says it has arrived (None: already on the host)."""
        if flags.device.type != "cuda":
            return flags, None
        host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event


def _arrived(arrival: Arrival | None) -> bool:
    return arrival is None or arrival.query()


def _check(flags: torch.Tensor, names: list[str], arrival: Arrival | None) -> None:
    if arrival is not None:
        arrival.synchronize()  # returns at once when the poll saw it arrive; a wait only past LAG
    ok = flags.tolist()
    if not all(ok):
        raise NonFiniteError(names[ok.index(False)] + _HINT)
