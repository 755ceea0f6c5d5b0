"""``trainer.nan_policy=stop`` without a host synchronisation per step.

Asking "is this loss finite?" on the host makes the CPU wait for the GPU, so it can never run ahead and
every bit of Python overhead becomes idle device time.  Instead each step's finiteness flags stay on the
device, are copied to the host without blocking, and are read one step later, when the copy has long
finished: a NaN or inf stops the run at most one step after it appeared, and the error names the step
where it appeared.  ``flush`` reads the last flags at once; the trainer calls it at every epoch end,
before evaluation and checkpoints, so a non-finite model is never saved.

Must not make the host wait for the device at any step, nor decide more than ``trainer.nan_policy`` says.
"""

from __future__ import annotations

import torch


class NonFiniteError(FloatingPointError):
    """A NaN/inf loss or gradient: the run stops with the step and module named."""


_HINT = "; lower optim.lr or set trainer.nan_policy=skip_step"


class FiniteWatch:
    """Device-side finiteness flags of one stage, published per step and read one step late."""

    def __init__(self, device: torch.device, *, enabled: bool = True) -> None:
        self.device = device
        self.enabled = enabled and device.type != "meta"  # meta tensors hold no values to check
        self._pending: list[tuple[torch.Tensor, str]] = []  # this step's flags (device) and what each checks
        self._published: tuple[torch.Tensor, list[str], torch.cuda.Event | None] | None = None

    def watch(self, value: torch.Tensor, what: str) -> None:
        """Remember whether ``value`` is finite (a device op, no sync); ``what`` names it in the error."""
        if self.enabled:
            self._pending.append((torch.isfinite(value.detach()).all(), what))

    def publish(self) -> None:
        """Start moving this step's flags to the host and check the previous step's (already there)."""
        if not self._pending:
            return
        flags = torch.stack([f for f, _ in self._pending])
        names = [w for _, w in self._pending]
        self._pending = []
        event = None
        if flags.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flags = host
        previous, self._published = self._published, (flags, names, event)
        if previous is not None:
            _check(*previous)

    def flush(self) -> None:
        """Read every outstanding flag now (epoch end: a sync there costs nothing)."""
        self.publish()
        previous, self._published = self._published, None
        if previous is not None:
            _check(*previous)


def _check(flags: torch.Tensor, names: list[str], event: torch.cuda.Event | None) -> None:
    if event is not None:
        event.synchronize()  # a step old: normally done already
    ok = flags.tolist()
    if not all(ok):
        raise NonFiniteError(names[ok.index(False)] + _HINT)
