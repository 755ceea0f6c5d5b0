"""What one run tells a newcomer (issue 16), through ``fdg-train`` with stderr not a terminal (as under
nohup or SLURM): a plain progress line during epochs, an end-of-run summary that says how the run ended
and where its files are, ``trainer.max_steps`` recorded in ``result.json``, and an exported model that
``fdg_dist.load_model`` makes usable without reading the source.

One K=2 run of 3 epochs × 32 batches, capped at 72 steps (the third epoch stops after 8 batches).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_real_data import metrics, run_config

import fdg_dist
from fdg_dist import data

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]

STOP = "trainer.max_steps=72 reached after 8 of the 32 batches of epoch 3"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("first_run")
    run = tmp / "run"
    proc = run_cli(tmp, "pipeline.k=2", "data.train_size=1024", "data.test_size=64", "trainer.batch_size=32",
                   "trainer.eval_batch_size=16", "trainer.epochs=3", "trainer.max_steps=72", "optim.lr=0.05",
                   "logging.progress=auto", "logging.progress_every_s=0", f"hydra.run.dir={run}")
    return run, proc


def test_progress_lines_without_a_terminal(first_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    """``logging.progress=auto`` off a terminal: a plain line per interval (0 s here: every batch but the
    epoch's last, which the epoch line follows), 1-based epochs like the epoch lines."""
    _, proc = first_run
    lines = re.findall(r"epoch (\d)/3  batch (\d+)/(\d+) \(\d+%\)  [\d.]+ batches/s  epoch ends in ", proc.stderr)
    want = [(str(e), str(b), "32") for e in (1, 2) for b in range(1, 32)] + [("3", str(b), "8") for b in range(1, 8)]
    assert lines == want, proc.stderr[-3000:]
    assert re.search(r"epoch   1/3  lr ", proc.stderr) and "epoch   0" not in proc.stderr


def test_summary_says_how_the_run_ended_and_where_it_is(first_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run, proc = first_run
    result = json.loads((run / "result.json").read_text())
    assert f"run finished after 3 epoch(s), 72 steps: {STOP}" in proc.stderr
    assert f"final {100 * result['final_test_error']:.2f} %, best {100 * result['best_test_error']:.2f} %" in proc.stderr
    for text in (f"run directory  {run}", f"result         {run / 'result.json'}", f"load_model('{run}')",
                 f"fdg-report {run}"):
        assert text in proc.stderr, text
    assert f"{STOP}: the run stopped there" in (run / "train.log").read_text()


def test_max_steps_is_recorded(first_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run, _ = first_run
    result = json.loads((run / "result.json").read_text())
    assert (result["epochs"], result["steps"], result["stop_reason"]) == (3, 72, STOP)
    assert (result["epochs_planned"], result["max_steps"]) == (3, 72)
    assert [m["epoch"] for m in metrics(run)] == [0, 1, 2]


def test_exported_model_through_load_model_matches_the_runs_test_error(
        first_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    """``fdg_dist.load_model(run)`` on the raw uint8 test images gives the run's own final test error,
    exactly: the export carries the normalisation measured on the training set and the class names."""
    run, _ = first_run
    cfg = run_config(run)
    train_set, test_set = data.load(cfg.data, cfg.trainer.seed)
    model, transform = fdg_dist.load_model(run)
    assert not model.training
    assert transform.mean == train_set.mean and transform.std == train_set.std
    assert transform.classes == tuple(f"class{i}" for i in range(10)) and transform.image_size == 32
    errors = 0
    with torch.no_grad():
        for images, labels in zip(test_set.images.split(16), test_set.labels.split(16)):
            errors += int((model(transform(images)).argmax(1) != labels).sum())
    final = json.loads((run / "result.json").read_text())["final_test_error"]
    assert final < 0.8, "a model that has not learned makes the comparison prove little"
    assert errors / len(test_set) == final
