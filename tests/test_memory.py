"""Memory does not grow with the epoch (SPEC §7): real gloo pipelines over hundreds of batches of one epoch.

Every rank's resident memory, read by that rank from its own ``/proc/self/statm`` and shown by the reporting
rank's progress lines (brought by the preemption vote), is fitted against the batch count after warm-up.  A
rank that kept what one batch makes would grow by at least the bytes it sends per batch (the old ``reap``,
which waited for gloo's ``is_completed()``, kept every payload of the epoch until the drain:
``tests/mutations/sends_kept_until_drain.patch`` restores it); the slope allowed is an eighth of that.
What remains on a healthy run is glibc's heap settling, a few KB per batch and slowing down.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_pipeline, small_config

from fdg_dist.trainer import build_module

BATCH, BATCHES, WARM_UP = 32, 400, 100
_LINE = re.compile(r"batch (\d+)/\d+ .*memory MB now/peak (.*)$")


def rss_by_batch(train_log: Path) -> dict[str, list[tuple[int, float]]]:
    """Per rank (``module{k}``), (batches done, resident MB) from every progress line of ``train_log``."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in train_log.read_text().splitlines():
        if (m := _LINE.search(line)) is None:
            continue
        fields = m.group(2).split()
        for name, value in zip(fields[::2], fields[1::2], strict=True):
            out.setdefault(name, []).append((int(m.group(1)), float(value.split("/")[0])))
    return out


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def sent_per_batch(cfg, K: int) -> list[int]:
    """Bytes each module sends per training batch: its activations and labels down, its gradient up."""
    shapes = [build_module(cfg, K, k).shapes for k in range(K)]
    out = []
    for k, (inp, outp) in enumerate(shapes):
        act = BATCH * (outp[1:].numel() * 4 + 8) if k < K - 1 else 0
        grad = BATCH * inp[1:].numel() * 4 if k > 0 else 0
        out.append(act + grad)
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
@pytest.mark.parametrize("K", [2, 4])
def test_resident_memory_is_flat_over_an_epoch_of_hundreds_of_batches(K: int, tmp_path: Path) -> None:
    cfg = small_config(**{"pipeline.k": K, "trainer.epochs": 1, "data.train_size": BATCH * BATCHES,
                          "data.test_size": BATCH, "data.augment": False, "trainer.batch_size": BATCH,
                          "trainer.eval_batch_size": BATCH, "logging.progress": "lines",
                          "logging.progress_every_s": 0.0})
    run_pipeline(cfg, tmp_path / "run")
    series = rss_by_batch(tmp_path / "run" / "train.log")
    assert sorted(series) == [f"module{k}" for k in range(K)]
    sent = sent_per_batch(cfg, K)
    for k in range(K):
        points = [(b, mb) for b, mb in series[f"module{k}"] if b >= WARM_UP]
        assert len(points) > (BATCHES - WARM_UP) // 2, f"module {k}: too few progress lines"
        grows = slope(points) * 2**20
        assert grows < sent[k] / 8, (f"module {k} grows {grows / 1024:.1f} KiB per batch after warm-up (it sends "
                                     f"{sent[k] / 1024:.0f} KiB per batch): {points[::40]}")
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert sorted(metrics["memory"]) == [f"module{k}" for k in range(K)]  # every rank's, at the epoch's end
    for k in range(K):
        usage = metrics["memory"][f"module{k}"]
        assert usage["peak_rss_mb"] >= usage["rss_mb"] >= series[f"module{k}"][-1][1] - 64
