"""Checkpoints: atomic writes, the sha256 manifest as commit marker, refusal of broken or foreign ones.

In-process tests run a real one-module Trainer in a world-1 gloo group (fast, and monkeypatchable);
the refusal tests work on the checkpoints of one real K=3 run.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from conftest import run_pipeline, small_config
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from fdg_dist import convert
from fdg_dist.config import Config
from fdg_dist.engine.executor import EpochResult
from fdg_dist.observe import metrics
from fdg_dist.run import checkpoint, distributed
from fdg_dist.run.checkpoint import MANIFEST, CheckpointError, choose, verify
from fdg_dist.run.trainer import Trainer
from fdg_dist.util.files import atomic_save

K = 3


def _config(**kw: object) -> Config:
    cfg = small_config(**{"trainer.epochs": 3, "checkpoint.enabled": True, "checkpoint.keep": 3, **kw})
    cfg.resume = "auto"
    return cfg


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


# ------------------------------------------------------------------ atomic files
def test_atomic_save_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.pt"
    atomic_save({"v": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"v": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary file left behind


# ------------------------------------------------------- one rank, in this process
@pytest.fixture
def world1(monkeypatch: pytest.MonkeyPatch):
    """A world-1 gloo process group, as torchrun would describe it in the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    torch.set_num_threads(1)
    ctx = distributed.init(1, 1, backend="gloo", timeout_s=30)
    yield ctx
    distributed.close()


def _fit(cfg: Config, ctx: distributed.Context, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)  # the worker's job in a real run
    Trainer(cfg, ctx, run_dir).fit()


def test_state_round_trip_restores_everything(world1, run_dir: Path) -> None:
    cfg = _config(**{"pipeline.k": 1, "trainer.epochs": 2})
    _fit(cfg, world1, run_dir)
    trainer = Trainer(cfg, world1, run_dir)
    assert trainer.restore() == run_dir / "checkpoints" / "epoch0001"
    assert (trainer.start_epoch, trainer.global_step, trainer.stage.steps) == (2, 12, 12)
    saved = torch.load(run_dir / "checkpoints/epoch0001/module0-replica0.pt", weights_only=True)
    for name, tensor in trainer.stage.module.state_dict().items():
        assert torch.equal(tensor, saved["stage"]["module"][name]), name
    assert trainer.stage.optimizer.state_dict()["state"][0]["momentum_buffer"].abs().sum() > 0
    assert trainer.stage.scheduler.last_epoch == 2
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])  # not the state building reseeded


def test_failed_write_is_a_clear_error_and_keeps_the_previous_checkpoint(
        world1, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(**{"pipeline.k": 1, "trainer.epochs": 2})
    real_save = torch.save
    saves = []

    def full_after_first(obj: object, f: object) -> None:
        saves.append(1)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_after_first)
    with pytest.raises(CheckpointError, match=r"epoch 1 not written.*No space left.*epoch0000\) is intact"):
        _fit(cfg, world1, run_dir)
    assert not (run_dir / "checkpoints/epoch0001/manifest.json").exists()
    assert verify(run_dir / "checkpoints/epoch0000")[1] is None
    assert choose(cfg, run_dir) == run_dir / "checkpoints/epoch0000"


def test_epoch_of_a_killed_attempt_is_redone_and_its_leftovers_removed(
        world1, run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What a kill during epoch 1's checkpoint leaves (a rank file, a writer's temporary file, no manifest)
    is skipped with a warning, and the redone epoch's commit removes the temporary file."""
    cfg = _config(**{"pipeline.k": 1, "trainer.epochs": 2})
    _fit(cfg, world1, run_dir)
    epoch1 = run_dir / "checkpoints" / "epoch0001"
    (epoch1 / MANIFEST).unlink()
    leftover = epoch1 / ".module0-replica0.pt.tmp99999"
    leftover.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING, logger="fdg_dist"):
        _fit(cfg, world1, run_dir)
    assert re.search(r"skipping checkpoint: \S*epoch0001 is incomplete", caplog.text), caplog.text
    assert verify(epoch1)[1] is None
    assert not leftover.exists()


def test_keep_prunes_old_checkpoints(world1, run_dir: Path) -> None:
    _fit(_config(**{"pipeline.k": 1, "checkpoint.keep": 2}), world1, run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch0001", "epoch0002"]


def test_rerun_of_a_finished_run_resumes_past_the_end_and_reports_the_same(world1, run_dir: Path) -> None:
    cfg = _config(**{"pipeline.k": 1, "trainer.epochs": 2})
    _fit(cfg, world1, run_dir)
    first = json.loads((run_dir / "result.json").read_text())
    _fit(cfg, world1, run_dir)
    again = json.loads((run_dir / "result.json").read_text())
    assert again["final_test_error"] == first["final_test_error"] is not None
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_never_starts_afresh_and_resets_metrics(world1, run_dir: Path) -> None:
    cfg = _config(**{"pipeline.k": 1, "trainer.epochs": 2})
    _fit(cfg, world1, run_dir)
    cfg.resume = "never"
    trainer = Trainer(cfg, world1, run_dir)
    assert trainer.restore() is None and trainer.start_epoch == 0
    assert (run_dir / "metrics.jsonl").read_text() == ""


def test_resume_repairs_a_torn_last_metrics_line_and_says_so(world1, run_dir: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A crash (or a full disk) while a metrics line was appended left half a line: resume drops it, warns
    naming the file, and continues; the file is then the uninterrupted run's."""
    cfg = _config(**{"pipeline.k": 1, "trainer.epochs": 2})
    _fit(cfg, world1, run_dir)
    path = run_dir / "metrics.jsonl"
    whole = path.read_text()
    path.write_text(whole + whole.splitlines()[-1][:25])  # a torn third line
    trainer = Trainer(cfg, world1, run_dir)
    with caplog.at_level(logging.WARNING, logger="fdg_dist"):
        assert trainer.restore() == run_dir / "checkpoints" / "epoch0001"
    assert path.read_text() == whole
    assert f"{path}: dropped its last line, cut short" in caplog.text


@pytest.mark.parametrize("keep", [2, 1])
def test_a_torn_last_metrics_row_is_redone_or_its_loss_said(world1, run_dir: Path, keep: int,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Issue 27: the row of epoch 2 torn after its checkpoint was written.  Resume used to go on after that
    checkpoint, saying "that epoch is redone", and the row was gone.  Now it resumes from the checkpoint
    before (kept with checkpoint.keep=2) and redoes the epoch bitwise; with none kept it says the row is lost."""
    cfg = _config(**{"pipeline.k": 1, "trainer.epochs": 2, "checkpoint.keep": keep})
    _fit(cfg, world1, run_dir)
    path, final = run_dir / "metrics.jsonl", _final(run_dir)
    same = ("epoch", "lr", "train_loss", "train_error", "test_loss", "test_error")  # not the timings
    rows = [{k: r[k] for k in same} for r in map(json.loads, path.read_text().splitlines())]
    lines = path.read_text().splitlines()
    path.write_text(f"{lines[0]}\n{lines[1][:25]}")
    with caplog.at_level(logging.INFO, logger="fdg_dist"):
        _fit(cfg, world1, run_dir)
    again = [{k: r[k] for k in same} for r in map(json.loads, path.read_text().splitlines())]
    if keep == 2:
        assert "resumed from " + str(run_dir / "checkpoints" / "epoch0000") in caplog.text
        assert "cut short while it was written ('" + lines[1][:25] + "'); epoch 2 is redone and its row written " \
               "again" in caplog.text
        assert again == rows
        for name, tensor in final.items():
            assert torch.equal(_final(run_dir)[name], tensor), name
    else:
        assert "); no checkpoint before epoch 2 is kept, so the run goes on after it and this file has no row for " \
               "that epoch" in caplog.text
        assert again == rows[:1]


def test_export_replaces_no_file_unasked_and_import_names_a_missing_file(world1, run_dir: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """Issue 27: ``fdg-checkpoint export RUN model.pt`` overwrote an existing model.pt; ``import missing.pt``
    talked about a missing missing.pt.sha256."""
    _fit(_config(**{"pipeline.k": 1, "trainer.epochs": 1}), world1, run_dir)
    out = tmp_path / "model.pt"
    out.write_bytes(b"someone's own model")
    with pytest.raises(SystemExit) as stop:
        convert.main(["export", str(run_dir), str(out)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"fdg-checkpoint: {out} exists; export to a new file, or pass --force to replace it\n"
    assert out.read_bytes() == b"someone's own model" and not convert.sidecar(out).exists()
    convert.main(["export", str(run_dir), str(out), "--force"])
    assert torch.load(out, weights_only=True)["next_epoch"] == 1 and convert.sidecar(out).is_file()

    missing = tmp_path / "missing.pt"
    with pytest.raises(SystemExit) as stop:
        convert.main(["import", str(missing), str(tmp_path / "new")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"fdg-checkpoint: {missing}: no such file (an unsplit state written by "
                                       "fdg-checkpoint export)\n")
    assert not (tmp_path / "new").exists()


def test_a_damaged_metrics_line_before_the_last_is_named(world1, run_dir: Path) -> None:
    cfg = _config(**{"pipeline.k": 1, "trainer.epochs": 2})
    _fit(cfg, world1, run_dir)
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(["{not json", *lines[1:]]) + "\n")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: line 1 is damaged"):
        Trainer(cfg, world1, run_dir).restore()


def test_a_crash_while_appending_metrics_leaves_the_previous_lines(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up half-way through writing epoch 1's line: metrics.jsonl keeps epoch 0's, whole."""
    log = metrics.RunLog(small_config(), tmp_path, module=0, replica=0, reporter=True)
    result, record = EpochResult(loss_sum=2.0, errors=1, samples=4), metrics.EpochRecord(0, torch.device("cpu"))
    log.epoch(0, lr=0.1, train=result, test=result, seconds=1.0, samples=4, record=record, steps=1)
    path = tmp_path / "metrics.jsonl"
    before = path.read_text()
    real_open = open

    class HalfWrite:
        def __init__(self, f) -> None:
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data) -> int:
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str):
            return getattr(self.f, name)

    def filling_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return HalfWrite(f) if "metrics.jsonl" in str(file) and ("w" in mode or "a" in mode) else f

    monkeypatch.setattr("builtins.open", filling_open)
    with pytest.raises(OSError, match="No space left"):
        log.epoch(1, lr=0.1, train=result, test=result, seconds=1.0, samples=4, record=record, steps=2)
    monkeypatch.undo()
    assert json.loads(before)["epoch"] == 0 and path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "timing"]  # no temporary file left


# ------------------------------------------------------ checkpoints of a K=3 run
@pytest.fixture(scope="module")
def k3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("k3") / "run"
    run_pipeline(_config(**{"pipeline.k": K}), run_dir)
    return run_dir


@pytest.fixture
def copy(k3_run: Path, tmp_path: Path) -> Path:
    """A private copy of the K=3 run, to damage."""
    return Path(shutil.copytree(k3_run, tmp_path / "run"))


def _newest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "epoch0002"


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "missing":
        path.unlink()
    else:  # one flipped byte in the middle: same size, still unpicklable, wrong values
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how,message", [
    ("truncated", r"module1-replica0.pt is truncated: \d+ of \d+ bytes"),
    ("missing", r"module1-replica0.pt is missing"),
    ("flipped", r"module1-replica0.pt is corrupt: its sha256 differs"),
])
def test_broken_checkpoint_is_refused_and_auto_falls_back(copy: Path, how: str, message: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(**{"pipeline.k": K})
    _damage(_newest(copy) / "module1-replica0.pt", how)
    assert verify(_newest(copy))[1] is not None
    with caplog.at_level(logging.WARNING, logger="fdg_dist"):
        assert choose(cfg, copy) == copy / "checkpoints" / "epoch0001"
    assert any(re.search(message, r.getMessage()) for r in caplog.records), caplog.text
    cfg.resume = str(_newest(copy))  # asked for explicitly: no fallback, an error
    with pytest.raises(CheckpointError, match=message):
        choose(cfg, copy)


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_incomplete_checkpoint_without_manifest_is_skipped(copy: Path) -> None:
    (_newest(copy) / "manifest.json").unlink()
    assert choose(_config(**{"pipeline.k": K}), copy) == copy / "checkpoints" / "epoch0001"
    cfg = _config(**{"pipeline.k": K})
    cfg.resume = str(_newest(copy))
    with pytest.raises(CheckpointError, match="incomplete: no manifest.json"):
        choose(cfg, copy)


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
@pytest.mark.parametrize("override,named", [
    ({"optim.name": "adam", "pipeline.k": 2}, "optim.name: checkpoint 'sgd', this run 'adam'"),  # K may change
    ({"model.name": "resnet20"}, "model.name: checkpoint 'tiny', this run 'resnet20'"),
    ({"optim.lr": 0.1}, "optim.lr: checkpoint 0.05, this run 0.1"),
    ({"corrector.name": "predict"}, "corrector.name: checkpoint 'none', this run 'predict'"),
])
def test_checkpoint_of_another_configuration_is_refused(copy: Path, override: dict, named: str) -> None:
    for resume in ("auto", str(copy), str(_newest(copy))):
        cfg = _config(**{"pipeline.k": K, **override})
        cfg.resume = resume
        with pytest.raises(CheckpointError, match="different configuration") as err:
            choose(cfg, copy)
        assert named in str(err.value)


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_not_a_checkpoint_path_is_refused(copy: Path, tmp_path: Path) -> None:
    cfg = _config(**{"pipeline.k": K})
    cfg.resume = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        choose(cfg, copy)
    cfg.resume = str(copy / "checkpoints")  # the checkpoint directory itself: newest complete one
    assert choose(cfg, copy) == _newest(copy)


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_auto_resume_skips_broken_checkpoints_and_ends_equal(k3_run: Path, copy: Path) -> None:
    """Newest two checkpoints broken: resume from epoch 0's, retrain epochs 1-2, same bits as before."""
    _damage(_newest(copy) / "module0-replica0.pt", "flipped")
    (copy / "checkpoints/epoch0001/module2-replica0.pt").unlink()
    (copy / "final_model.pt").unlink()
    run_pipeline(_config(**{"pipeline.k": K}), copy)
    log = (copy / "train.log").read_text()
    assert "epoch0002/module0-replica0.pt is corrupt" in log and "epoch0001: module2-replica0.pt is missing" in log
    assert "epoch0000 (next epoch 2/" in log
    want, got = _final(k3_run), _final(copy)
    assert all(torch.equal(got[n], want[n]) for n in want)
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_run_refuses_a_foreign_checkpoint_on_every_rank(copy: Path, tmp_path: Path) -> None:
    cfg = _config(**{"pipeline.k": 2, "optim.lr": 0.1})
    cfg.resume = str(copy)
    with pytest.raises(ChildFailedError):
        run_pipeline(cfg, tmp_path / "other")
    log = (tmp_path / "other" / "train.log").read_text()
    assert log.count("failed: CheckpointError") == 2, log  # both ranks, same decision (tracebacks follow)
    assert "optim.lr: checkpoint 0.05, this run 0.1" in log


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_resume_compares_the_split_itself_not_how_it_was_chosen(k3_run: Path, copy: Path, tmp_path: Path) -> None:
    """The same bounds written by hand resume the automatic run bit for bit; other bounds re-cut the
    checkpoint (test_recut), which rank 0 says."""
    bounds = json.loads((copy / "split.json").read_text())["bounds"]
    cfg = _config(**{"pipeline.k": K, "pipeline.split": bounds[1:-1]})
    cfg.resume = str(copy / "checkpoints" / "epoch0001")
    run_pipeline(cfg, tmp_path / "hand")
    want, got = _final(k3_run), _final(tmp_path / "hand")
    assert all(torch.equal(got[n], want[n]) for n in want)

    moved = [bounds[1] + 1, bounds[2] + 1]
    cfg = _config(**{"pipeline.k": K, "pipeline.split": moved})
    cfg.resume = str(copy)
    run_pipeline(cfg, tmp_path / "moved")
    log = (tmp_path / "moved" / "train.log").read_text()
    recut = f"(fdg, K=3, 1 replica(s), blocks {bounds}) as fdg, K=3, 1 replica(s), blocks {[0, *moved, 7]}"
    assert sum("re-cut checkpoint" in line and recut in line for line in log.splitlines()) == 1, log
