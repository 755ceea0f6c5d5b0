"""Changing K without starting over (issue 20): a drained checkpoint resumes as another split, number of
modules, of replicas or method, and converts to one unsplit file (``fdg-checkpoint``) and back.

Multi-process runs use the tiny model on synthetic data (6 batches an epoch), one thread per process, so
the comparisons are bitwise.  The unsplit state itself (gather, cut) is tested in process on real stages.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_weights,
    data_parallel_reference,
    final_state,
    lm_config,
    reference_state,
    run_pipeline,
    small_config,
    write_text,
)
from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

from fdg_dist import convert, models
from fdg_dist.config import Config
from fdg_dist.engine.optim import build_optimizer, step_factor
from fdg_dist.run import checkpoint, rundir, unsplit
from fdg_dist.run.checkpoint import MANIFEST, CheckpointError, choose
from fdg_dist.run.trainer import build_stage
from fdg_dist.util import files


def _config(**kw: object) -> Config:
    cfg = small_config(**{"checkpoint.enabled": True, "checkpoint.keep": 4, **kw})
    cfg.resume = "auto"
    return cfg


def _log(run_dir: Path) -> str:
    return (run_dir / "train.log").read_text()


# ------------------------------------------------------------------------------ bp K=2 -> export -> K=3
def _bp(K: int, epochs: int = 2, **kw: object) -> Config:
    """The LR drops after epochs 1 and 3: a resume that lost the schedule's position would miss the second."""
    return _config(**{"method.name": "bp", "pipeline.k": K, "trainer.epochs": epochs, "sched.milestones": [1, 3],
                      **kw})


@pytest.fixture(scope="module")
def bp_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """bp K=2 trained 4 epochs; its checkpoint after epoch 2 exported to state.pt and imported into a new run
    directory, which then trains epochs 3 and 4 as bp K=3 (resume=auto finds the imported checkpoint)."""
    base = tmp_path_factory.mktemp("bp")
    first, second, exported = base / "k2", base / "k3", base / "state.pt"
    run_pipeline(_bp(2, epochs=4), first)
    convert.main(["export", str(first / "checkpoints" / "epoch0001"), str(exported)])
    convert.main(["import", str(exported), str(second)])
    run_pipeline(_bp(3, epochs=4), second)
    return first, second, exported


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_bp_k2_resumed_as_k3_equals_four_epochs_of_backpropagation(bp_runs: tuple[Path, Path, Path]) -> None:
    """Bitwise equal to bp K=2 trained 4 epochs, and to single-process back-propagation.  Without the momentum
    buffers or the LR schedule's position the weights would differ."""
    first, second, _ = bp_runs
    assert_same_weights(final_state(second), final_state(first))
    assert_same_weights(final_state(second), data_parallel_reference(_bp(2, epochs=4), replicas=1))
    log = _log(second)
    assert "re-cut checkpoint" in log and "(unsplit (bp)) as bp, K=3, 1 replica(s), blocks [0, " in log
    assert "not carried over: random generators" in log
    rows = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [2, 3]


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_exported_file_is_the_unsplit_model_and_optimizer_for_plain_torch(bp_runs: tuple[Path, Path, Path]) -> None:
    """Loads into the unsplit model strictly, and into one torch optimizer with torch's own
    ``set_optimizer_state_dict``; the hash file is sha256sum's format; import equals the gathered state."""
    first, second, exported = bp_runs
    state = torch.load(exported, weights_only=True)
    cfg = _bp(2, epochs=2)
    model = models.build(cfg.model.name, cfg.data.num_classes)
    model.load_state_dict(state["model"])  # strict: exactly the unsplit model's keys
    opt = build_optimizer(cfg.optim, model.parameters())
    set_optimizer_state_dict(model, opt, optim_state_dict=state["optimizer"])
    names = [n for n, _ in model.named_parameters()]
    assert [opt.state[p]["momentum_buffer"].abs().sum() > 0 for p in model.parameters()] == [True] * len(names)
    assert (state["next_epoch"], state["global_step"], state["scheduler"]["last_epoch"]) == (2, 12, 2)
    digest, name = (exported.parent / "state.pt.sha256").read_text().split()
    assert name == "state.pt" and digest == files.sha256(exported)

    gathered = checkpoint.read_unsplit(first / "checkpoints" / "epoch0001")
    imported = checkpoint.read_unsplit(second / "checkpoints" / "epoch0001")
    for key in ("model",):
        assert_same_weights(imported[key], gathered[key])
    assert imported["optimizer"]["param_groups"] == gathered["optimizer"]["param_groups"]
    for n in names:
        assert torch.equal(imported["optimizer"]["state"][n]["momentum_buffer"],
                           gathered["optimizer"]["state"][n]["momentum_buffer"])


@pytest.fixture
def bp_copy(bp_runs: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    """A private copy of the bp K=2 run, to damage."""
    return Path(shutil.copytree(bp_runs[0], tmp_path / "run"))


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_another_k_is_accepted_but_another_model_or_optimizer_is_refused_naming_the_key(bp_copy: Path) -> None:
    recorded = _bp(2)
    for change in ({"pipeline.k": 3}, {"pipeline.k": 4, "pipeline.split": [1, 3, 5]},
                   {"method.name": "adl", "method.beta": 0.5, "method.accum_steps": 2},
                   {"method.name": "dgl", "pipeline.replicas": 2}, {"method.name": "dp", "pipeline.k": 1}):
        cfg = _bp(2, **change)
        assert choose(cfg, bp_copy) == bp_copy / "checkpoints" / "epoch0003", change
        rundir.check_start(cfg, bp_copy, recorded=recorded, restarted=False)  # what fdg-train checks first
    for change, named in (({"optim.name": "adam"}, "optim.name: checkpoint 'sgd', this run 'adam'"),
                          ({"model.name": "resnet20"}, "model.name: checkpoint 'tiny', this run 'resnet20'")):
        cfg = _bp(3, **{"method.name": "fdg", **change})
        with pytest.raises(CheckpointError, match="different configuration") as err:
            choose(cfg, bp_copy)
        assert named in str(err.value) and "pipeline.k" not in str(err.value).split(";")[0]


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_mid_epoch_cut_is_not_re_cut(bp_copy: Path) -> None:
    """A cut holds stashes and messages of its own split: another K is refused, the same one accepted."""
    cut = bp_copy / "checkpoints" / "epoch0004-tick000003"
    (bp_copy / "checkpoints" / "epoch0003").rename(cut)
    manifest = json.loads((cut / MANIFEST).read_text())
    (cut / MANIFEST).write_text(json.dumps({**manifest, "epoch": 4, "tick": 3}))
    assert choose(_bp(2), bp_copy) == cut
    for change in ({"pipeline.k": 3}, {"method.name": "fdg"}):
        with pytest.raises(CheckpointError, match=r"cut mid-epoch \(after tick 3 of epoch 5\).*cannot be re-cut.*"
                                                  r"resume it first with the configuration that wrote it"):
            choose(_bp(2, **change), bp_copy)
    with pytest.raises(CheckpointError, match="cut mid-epoch"):
        convert.export(cut, bp_copy / "x.pt")


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_damaged_checkpoints_and_files_are_refused_never_half_loaded(
        bp_copy: Path, bp_runs: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    newest = bp_copy / "checkpoints" / "epoch0003"
    path = newest / "module1-replica0.pt"
    data = path.read_bytes()
    path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    cfg = _bp(3, epochs=4)
    cfg.resume = str(newest)
    with pytest.raises(CheckpointError, match="module1-replica0.pt is corrupt"):
        choose(cfg, bp_copy)
    with pytest.raises(SystemExit) as exit_:
        convert.main(["export", str(newest), str(tmp_path / "x.pt")])
    assert exit_.value.code == 2 and "module1-replica0.pt is corrupt" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()

    exported = tmp_path / "state.pt"
    shutil.copy(bp_runs[2], exported)
    with pytest.raises(CheckpointError, match=r"no state.pt.sha256 beside it.*sha256sum state.pt > state.pt.sha256"):
        convert.import_(exported, tmp_path / "a")
    shutil.copy(bp_runs[2].parent / "state.pt.sha256", tmp_path)
    exported.write_bytes(exported.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt or was changed: its sha256 differs"):
        convert.import_(exported, tmp_path / "a")
    assert not (tmp_path / "a").exists()  # a refused import writes nothing
    with pytest.raises(CheckpointError, match="already holds checkpoints; import into a new run directory"):
        convert.import_(bp_runs[2], bp_copy)


# -------------------------------------------------------------------------------- fdg K=4 -> K=2
@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_fdg_k4_resumed_as_k2_equals_the_reference_started_from_the_converted_state(tmp_path: Path) -> None:
    """fdg K=4 for an epoch, then pipeline.k=2 in the same run directory (resume=auto): equal to the K=2
    reference simulation whose modules, optimizers and schedules were loaded from the exported state."""
    run = tmp_path / "run"
    run_pipeline(_config(**{"pipeline.k": 4, "trainer.epochs": 1}), run)
    cfg = _config(**{"pipeline.k": 2, "trainer.epochs": 2})
    run_pipeline(cfg, run)
    convert.export(run / "checkpoints" / "epoch0000", tmp_path / "state.pt")
    start = torch.load(tmp_path / "state.pt", weights_only=True)
    assert start["source"]["k"] == 4
    assert_same_weights(final_state(run), reference_state(cfg, start=start))
    assert "re-cut checkpoint" in _log(run) and "(fdg, K=4, 1 replica(s)" in _log(run)


# ------------------------------------------------------------------------------- dp <-> replicas
@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_dp_and_pipeline_replicas_convert_both_ways(tmp_path: Path) -> None:
    """dp over 2 replicas for epoch 1, bp K=2 × 2 replicas for epoch 2, dp again for epoch 3, one run directory
    (resume=auto): bitwise the data-parallel reference of 3 epochs (every replica holds replica 0's BatchNorm
    statistics at an epoch end, the reference keeps shard 0's)."""
    run = tmp_path / "run"
    def config(**kw: object) -> Config:  # the LR drops after epoch 2, which the schedule's position decides
        return _config(**{"sched.milestones": [2], **kw})

    run_pipeline(config(**{"method.name": "dp", "pipeline.k": 2, "trainer.epochs": 1}), run)
    run_pipeline(config(**{"method.name": "bp", "pipeline.k": 2, "pipeline.replicas": 2, "trainer.epochs": 2}), run)
    cfg = config(**{"method.name": "dp", "pipeline.k": 2, "trainer.epochs": 3})
    run_pipeline(cfg, run)
    assert_same_weights(final_state(run), data_parallel_reference(cfg, replicas=2))
    recuts = [line for line in _log(run).splitlines() if "re-cut checkpoint" in line]
    assert len(recuts) == 2 and "(dp, K=1, 2 replica(s)" in recuts[0] and "as bp, K=2, 2 replica(s)" in recuts[0]
    assert "(bp, K=2, 2 replica(s)" in recuts[1] and "as dp, K=1, 2 replica(s)" in recuts[1]


# ------------------------------------------------------------------------- the unsplit state, in process
def _trained_stages(cfg: Config, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                    total_batches: int | None = None) -> list[tuple[dict, object]]:
    """(trainer-like state, stage) of every module of ``cfg`` after one local step each (on its own loss, or a
    gradient of ones without one), so every parameter has optimizer state; ``x``, ``y``: one batch (images by
    default)."""
    K, out = cfg.pipeline.k, []
    if x is None:
        x, y = torch.randn(4, 3, 32, 32), torch.arange(4) % cfg.data.num_classes
    for k in range(K):
        stage, _, built = build_stage(cfg, K, k, torch.device("cpu"), total_batches=total_batches)
        own_loss = stage.is_last or stage.aux_head is not None
        x, _, _ = stage.forward(0, x, y, train=True, keep_for_backward=not own_loss)
        if not own_loss:
            stage.backward(0, torch.ones_like(x))
        stage.step()
        state = {"module": k, "bounds": built.bounds, "next_epoch": 3, "global_step": 17, "cut": None,
                 "stage": stage.state_dict()}
        out.append((state, stage))
    return out


def _same_optimizer_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], key


@pytest.mark.parametrize("optim", ["sgd", "adamw"])  # adamw: two parameter groups (decay, no decay)
def test_gather_then_cut_to_the_same_layout_gives_back_every_module_state(optim: str) -> None:
    cfg = _config(**{"method.name": "dgl", "pipeline.k": 3, "optim.name": optim, "optim.weight_decay": 0.1})
    trained = _trained_stages(cfg)
    state = unsplit.gather([s for s, _ in trained], checkpoint.fingerprint(cfg), replicas=1)
    unsplit.check(state)
    assert sorted(state["aux_heads"]) == sorted(str(b) for b in trained[0][0]["bounds"][1:-1])
    for (saved, _), k in zip(trained, range(3), strict=True):
        fresh, _, built = build_stage(cfg, 3, k, torch.device("cpu"))
        boundary = built.bounds[k + 1] if fresh.aux_head is not None else None
        fresh.load_state_dict(unsplit.cut(state, fresh, boundary=boundary, aux_channels=cfg.method.aux_channels))
        again = fresh.state_dict()
        for part in ("module", "aux_head"):
            assert_same_weights(again[part] or {}, saved["stage"][part] or {})
        assert again["optimizer"]["param_groups"] == saved["stage"]["optimizer"]["param_groups"]
        assert again["optimizer"]["state"].keys() == saved["stage"]["optimizer"]["state"].keys()
        for index, entry in saved["stage"]["optimizer"]["state"].items():
            _same_optimizer_state(again["optimizer"]["state"][index], entry)
        assert again["scheduler"] == saved["stage"]["scheduler"]
        assert again["steps"] == 1 and again["param_names"] == saved["stage"]["param_names"]


def test_adamw_groups_and_a_per_batch_schedule_follow_every_parameter_to_another_k(tmp_path: Path) -> None:
    """A GPT split after its embedding (module 0: weight matrices only, one AdamW group) re-cut as one module
    (two groups): every parameter keeps its moments and its group's weight decay, and the per-batch schedule
    moves every group's LR, not only those module 0 had."""
    text = write_text(tmp_path / "input.txt")
    total = 40
    cfg = lm_config(text, **{"method.name": "bp", "pipeline.k": 2, "pipeline.split": [1]})
    tokens = torch.arange(64).reshape(4, 16) % cfg.data.num_classes
    trained = _trained_stages(cfg, tokens, tokens.roll(-1, 1), total_batches=total)
    assert len(trained[0][0]["stage"]["optimizer"]["param_groups"]) == 1
    state = unsplit.gather([s for s, _ in trained], checkpoint.fingerprint(cfg), replicas=1)
    assert sorted(g["weight_decay"] for g in state["optimizer"]["param_groups"]) == [0.0, 0.1]
    source = {n: (p, st.optimizer.state[p]) for _, st in trained for n, p in st.module.named_parameters()}
    for group in state["optimizer"]["param_groups"]:  # by name, as torch's set_optimizer_state_dict reads it
        for name in group["params"]:
            assert group["weight_decay"] == (0.1 if source[name][0].dim() >= 2 else 0.0), name
            _same_optimizer_state(state["optimizer"]["state"][name], source[name][1])

    one = lm_config(text, **{"method.name": "bp", "pipeline.k": 1})
    stage, _, _ = build_stage(one, 1, 0, torch.device("cpu"), total_batches=total)
    stage.load_state_dict(unsplit.cut(state, stage, boundary=None, aux_channels=one.method.aux_channels))
    for name, p in stage.module.named_parameters():
        group = next(g for g in stage.optimizer.param_groups if any(q is p for q in g["params"]))
        assert group["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0), name
        _same_optimizer_state(stage.optimizer.state[p], source[name][1])
    stage.scheduler.advance(1)  # a step applied one batch: the run's batch 2 (0-based)
    want = one.optim.lr * step_factor(one.sched, 2, total)
    assert [g["lr"] for g in stage.optimizer.param_groups] == pytest.approx([want, want], rel=1e-12)


def test_dgl_heads_follow_their_boundary_and_are_said_when_lost() -> None:
    """dgl K=3 at blocks [0, a, b, 7] re-cut as dgl K=2 at [0, b, 7] keeps the head at b; at [0, c, 7] a fresh
    one; as bp no head; each loss named in the 'not carried' phrases."""
    cfg = _config(**{"method.name": "dgl", "pipeline.k": 3})
    trained = _trained_stages(cfg)
    bounds = trained[0][0]["bounds"]
    state = unsplit.gather([s for s, _ in trained], checkpoint.fingerprint(cfg), replicas=1)
    a, b = bounds[1], bounds[2]
    c = next(i for i in range(1, 7) if i not in (a, b))
    keeps = _config(**{"method.name": "dgl", "pipeline.k": 2, "pipeline.split": [b]})
    stage, _, _ = build_stage(keeps, 2, 0, torch.device("cpu"))
    stage.load_state_dict(unsplit.cut(state, stage, boundary=b, aux_channels=keeps.method.aux_channels))
    assert_same_weights(stage.aux_head.state_dict(), trained[1][1].aux_head.state_dict())
    assert stage.optimizer.state_dict()["state"].keys() == set(range(len(stage.param_names())))
    assert unsplit.not_carried(state, "dgl", [0, b, 7], 128)[1:] == [f"DGL auxiliary heads at blocks [{a}] "
                                                                    "(dropped: no module of the new split ends there)"]

    moved = _config(**{"method.name": "dgl", "pipeline.k": 2, "pipeline.split": [c]})
    stage, _, _ = build_stage(moved, 2, 0, torch.device("cpu"))
    before = {n: t.clone() for n, t in stage.aux_head.state_dict().items()}
    stage.load_state_dict(unsplit.cut(state, stage, boundary=c, aux_channels=moved.method.aux_channels))
    assert_same_weights(stage.aux_head.state_dict(), before)  # fresh, as built
    heads = [unsplit.AUX + n for n, _ in stage.aux_head.named_parameters()]
    assert not any(stage.param_names()[i] in heads for i in stage.optimizer.state_dict()["state"])
    assert f"DGL auxiliary heads at blocks [{c}] are new" in "; ".join(unsplit.not_carried(state, "dgl", [0, c, 7], 128))
    assert f"DGL auxiliary heads at blocks [{a}, {b}] (dropped: method bp has none)" in "; ".join(
        unsplit.not_carried(state, "bp", [0, c, 7], 128))


def test_a_state_of_another_model_is_refused_naming_the_key() -> None:
    cfg = _config(**{"method.name": "dgl", "pipeline.k": 2})
    state = unsplit.gather([s for s, _ in _trained_stages(cfg)], checkpoint.fingerprint(cfg), replicas=1)
    stage, _, _ = build_stage(cfg, 2, 1, torch.device("cpu"))
    name = next(iter(stage.module.state_dict()))
    state["model"][name] = torch.zeros(1, 2, 3)
    with pytest.raises(unsplit.UnsplitError, match=rf"model: '{name}' has shape \(1, 2, 3\)"):
        unsplit.cut(state, stage, boundary=None, aux_channels=128)
    del state["model"][name]
    with pytest.raises(unsplit.UnsplitError, match=rf"model: no '{name}'"):
        unsplit.cut(state, stage, boundary=None, aux_channels=128)
    with pytest.raises(unsplit.UnsplitError, match="not an fdg_dist unsplit checkpoint"):
        unsplit.check({"model": {}})

