"""How much memory a rank holds: what the progress lines, ``metrics.jsonl`` and TensorBoard report per rank.

Resident memory (RSS) is what the kernel's OOM killer counts, read from ``/proc/self/statm`` (a few
microseconds: cheap enough for every tick).  Workers keep freed memory for reuse (``worker.keep_freed_memory``),
so RSS is the peak working set so far rather than what is in use this instant: a leak shows as RSS that keeps
rising with the batches, a healthy run as RSS that levels off after warm-up.  On a GPU the device memory that
matters is the caching allocator's peak of allocated memory.

Must not allocate, free or move memory: it only reads the counters.
"""

from __future__ import annotations

import os
import re
import resource
import sys
from dataclasses import asdict, dataclass

import torch

MB = 2**20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory now (its peak where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return peak_resident_bytes()


def peak_resident_bytes() -> int:
    """The most this process has held resident since it started."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024


@dataclass(frozen=True)
class Usage:
    """One rank's memory in MB: resident now, its peak, and on CUDA the peak of allocated device memory."""

    rss_mb: float
    peak_rss_mb: float
    cuda_peak_mb: float | None = None

    @classmethod
    def now(cls, device: torch.device) -> Usage:
        cuda = torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None
        rss = resident_bytes()
        return cls(rss / MB, max(rss, peak_resident_bytes()) / MB, cuda)  # the kernel updates the peak lazily

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in asdict(self).items() if v is not None}

    def to_ints(self) -> list[int]:
        """As non-negative whole KiB (device peak + 1; 0: no device), for a MAX all-reduce over zeros."""
        return [int(self.rss_mb * 1024), int(self.peak_rss_mb * 1024),
                0 if self.cuda_peak_mb is None else int(self.cuda_peak_mb * 1024) + 1]

    @classmethod
    def from_ints(cls, values: list[int]) -> Usage:
        rss, peak, cuda = values
        return cls(rss / 1024, peak / 1024, None if cuda == 0 else (cuda - 1) / 1024)


FIELDS = len(Usage.__dataclass_fields__)


_HOST, _CUDA = "memory MB now/peak", "cuda peak MB"
_FIELD = re.compile(rf"{_HOST}((?: \S+ \d+/\d+)+)(?:  {_CUDA}((?: \S+ \d+)+))?")


def describe(usages: dict[str, Usage]) -> str:
    """``memory MB now/peak module0 1923/2010 module1 1201/1250`` (and ``cuda peak MB`` per rank on a GPU): one
    progress-line field over the ranks named by the keys."""
    text = _HOST + "".join(f" {name} {u.rss_mb:.0f}/{u.peak_rss_mb:.0f}" for name, u in usages.items())
    cuda = {name: u.cuda_peak_mb for name, u in usages.items() if u.cuda_peak_mb is not None}
    if cuda:
        text += f"  {_CUDA}" + "".join(f" {name} {mb:.0f}" for name, mb in cuda.items())
    return text


def parse(line: str) -> dict[str, Usage] | None:
    """The ranks' memory in a line holding a ``describe`` field (whole MB), None if it holds none: how the
    memory test and the soak benchmark read the progress lines of ``train.log``."""
    m = _FIELD.search(line)
    if m is None:
        return None
    host = m.group(1).split()
    cuda = m.group(2).split() if m.group(2) else []
    device = {name: float(mb) for name, mb in zip(cuda[::2], cuda[1::2], strict=True)}
    out = {}
    for name, value in zip(host[::2], host[1::2], strict=True):
        now, peak = value.split("/")
        out[name] = Usage(float(now), float(peak), device.get(name))
    return out
