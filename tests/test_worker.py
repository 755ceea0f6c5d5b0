"""Per-process settings a worker makes before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

STEPS = """
import json, resource, sys, torch
from fdg_dist.run.worker import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(1 << 20) for _ in range(20)]  # one step's activations: 20 x 4 MB, freed together
    del held
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _steps(mode: str) -> dict:
    # glibc starts at a 128 KiB mmap threshold and raises it as mmapped chunks are freed, so whether a plain
    # process faults again depends on its heap's layout (it did not, in one full-suite run); pinning the start
    # value switches that adaptation off and makes the plain side deterministic, and keep_freed_memory's
    # mallopt must override it
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120, check=True,
                         env=env)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again_every_step() -> None:
    """Without it glibc (at its 128 KiB mmap threshold) hands a step's freed activations back to the kernel and
    the next step faults and zeroes every page again (20,000 faults for these 80 MB); with it, after the first
    steps, none."""
    plain, kept = _steps("plain"), _steps("keep")
    assert kept["applied"] is True
    assert max(kept["faults"][2:]) < 2_000  # a stray page or a few (another process's pressure), not a step's
    assert min(plain["faults"][2:]) > 10_000  # what the setting removes (glibc's default behaviour)
