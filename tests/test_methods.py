"""The paper's comparison in one engine (issue 4): bp, ddg, fr, dgl, adl and dp beside fdg.

test_engine already shows every pipelined method equal to its reference simulation; here each method
is pinned to what it claims to be: bp and dp to plain single-process training of the unsplit model,
ddg/fr/adl/dgl to their delays and update rhythm read from the per-rank trace, dgl to locality.
Multi-process runs use the tiny model and synthetic data (6 batches an epoch), one thread per process,
so every comparison below is bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_delays_measured,
    assert_same_weights,
    assert_staleness_is_the_traces,
    data_parallel_reference,
    epoch_batches,
    final_state,
    reference_state,
    run_cli,
    run_pipeline,
    small_config,
    train_spans,
)
from emulated import run_emulated

from fdg_dist import models
from fdg_dist.config import Config
from fdg_dist.engine.optim import build_optimizer, build_scheduler
from fdg_dist.run.trainer import build_module

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]


EPOCH_BATCHES = [6, 6, 4]  # what _traced runs: 3 epochs of 6 batches capped at 16 steps


def _traced(**overrides: object) -> Config:
    """3 epochs capped at 16 steps (the last epoch is cut short and drains), traced."""
    return small_config(**{"trainer.epochs": 3, "trainer.max_steps": 16, "logging.trace": True, **overrides})


# ------------------------------------------------------------------------------------------------ bp
@pytest.mark.parametrize("K", [2, 3])
def test_bp_equals_single_process_backpropagation(K: int, run_dir: Path) -> None:
    """Synchronous model parallel is back-propagation: one optimizer over the whole model and K per-module
    optimizers give the same elementwise SGD update, so 12 steps over 2 epochs (LR drop between) agree bitwise."""
    cfg = small_config(**{"method.name": "bp", "pipeline.k": K})
    run_pipeline(cfg, run_dir)
    assert_same_weights(final_state(run_dir), data_parallel_reference(cfg, replicas=1))


# ------------------------------------------------------------------------------------------ ddg / fr
def _ticks(run_dir: Path, rank: int, kind: str) -> dict[tuple[int, int], int]:
    """(epoch, batch) -> tick of rank's spans of ``kind``; a STEP's batch is the last gradient it applied."""
    return {(s["args"]["epoch"], s["args"]["batch"]): s["args"]["tick"] for s in train_spans(run_dir, rank)
            if s["cat"] == kind}


def test_ddg_and_fr_delay_is_k_minus_1_minus_k_and_fr_replays_with_current_weights(tmp_path: Path) -> None:
    """Module k's update from batch b is first used by its forward of batch b + K-1-k (b + 1 at the last
    module), measured from the trace's times, for ddg and fr alike; every module forwards batch b while its
    neighbours do (locked: one tick label).  fr is exactly ddg with each stashed forward replaced by a replay
    with the current weights: the fr run equals the oracle of ddg with method.stash=recompute, and differs
    from the ddg run."""
    K = 3
    finals = {}
    for method in ("ddg", "fr"):
        cfg = _traced(**{"method.name": method, "pipeline.k": K})
        run_pipeline(cfg, tmp_path / method)
        finals[method] = final_state(tmp_path / method)
        for k in range(K):
            assert_delays_measured(tmp_path / method, k, max(K - 1 - k, 1), EPOCH_BATCHES)
            assert all(f == b for (_, b), f in _ticks(tmp_path / method, k, "forward").items()), "forward is locked"
    assert_same_weights(finals["fr"], reference_state(_traced(**{"method.name": "ddg", "method.stash": "recompute",
                                                                 "pipeline.k": K})))
    assert any(not torch.equal(finals["fr"][n], finals["ddg"][n]) for n in finals["ddg"]), "fr == ddg"


# ----------------------------------------------------------------------------------------------- dgl
def test_dgl_is_local_and_exports_no_auxiliary_head(run_dir: Path) -> None:
    """No backward span anywhere and every step right after its own forward (the loss is local); module
    0 equals module 0 trained alone with its auxiliary head — any gradient leaking from module 1 would
    change it; final_model.pt has exactly the unsplit model's keys."""
    K = 3
    cfg = _traced(**{"method.name": "dgl", "pipeline.k": K})
    run_pipeline(cfg, run_dir)
    for k in range(K):
        assert not _ticks(run_dir, k, "backward"), f"module {k} back-propagated a received gradient"
        assert _ticks(run_dir, k, "step") == _ticks(run_dir, k, "forward")

    torch.set_num_threads(1)
    alone = build_module(cfg, K, 0)
    opt = build_optimizer(cfg.optim, [*alone.module.parameters(), *alone.aux_head.parameters()])
    sched = build_scheduler(cfg.sched, opt, cfg.trainer.epochs)
    for batches in epoch_batches(cfg):
        for x, y in batches:
            F.cross_entropy(alone.aux_head(alone.module(x)), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step()
    final = final_state(run_dir)
    assert_same_weights({n: final[n] for n in alone.module.state_dict()}, alone.module.state_dict())
    assert list(final) == list(models.build(cfg.model.name, cfg.data.num_classes).state_dict())


# ------------------------------------------------------------------------------------------------ dp
def test_dp_equals_full_batch_training_with_per_replica_batchnorm(run_dir: Path) -> None:
    """method=dp pipeline.k=2: two replicas of the whole model, 8 of every 16 samples each, mean gradient.
    Bitwise equal to data_parallel_reference (stated there: BN batch statistics per half batch, replica
    0's running statistics), 12 steps.  97 samples: each epoch's 1-sample tail would leave replica 1
    empty (NaN loss) and is dropped."""
    cfg = small_config(**{"method.name": "dp", "pipeline.k": 2, "data.train_size": 97})
    result = run_pipeline(cfg, run_dir)
    assert result is not None and result["method"] == "dp"
    assert_same_weights(final_state(run_dir), data_parallel_reference(cfg, replicas=2))


# ----------------------------------------------------------------------------------------------- adl
def test_adl_with_one_accumulation_step_is_fdg(run_dir: Path) -> None:
    """Compared with fdg's oracle, which test_engine shows equal to the fdg run bit for bit."""
    run_pipeline(_traced(**{"method.name": "adl", "method.accum_steps": 1, "pipeline.k": 3}), run_dir)
    assert_same_weights(final_state(run_dir), reference_state(_traced(**{"method.name": "fdg", "pipeline.k": 3})))


def test_adl_steps_once_every_m_ticks(run_dir: Path) -> None:
    """M = 3, K = 2, epochs of 6, 6 and 4 batches: module k's steps apply batches [0,1,2] and [3,4,5]
    three ticks apart; the update is first used by the forward of the group's last batch + 2(K-1-k) (+1 at
    the last module), measured from the trace's times; the cut epoch drains with a short step [3] one tick
    after [0,1,2]; TensorBoard's staleness is the trace's; the run equals its reference simulation."""
    K, M = 2, 3
    cfg = _traced(**{"method.name": "adl", "method.accum_steps": M, "pipeline.k": K, "logging.tensorboard": True})
    run_pipeline(cfg, run_dir)
    want_batches = [[0, 1, 2], [3, 4, 5]] * 2 + [[0, 1, 2], [3]]
    for k in range(K):
        steps = [s["args"] for s in train_spans(run_dir, k) if s["cat"] == "step"]
        assert [a["applied_batches"] for a in steps] == want_batches
        assert_delays_measured(run_dir, k, max(2 * (K - 1 - k), 1), EPOCH_BATCHES, group=M)
        ticks: dict[int, list[int]] = {}
        for a in steps:
            ticks.setdefault(a["epoch"], []).append(a["tick"])
        assert [t[1] - t[0] for t in ticks.values()] == [M, M, 1]
        # accumulated gradients are older than the stash is deep (module 0: 4, 3, 2 ticks; it holds 2): a
        # staleness that restated the stash depth or the FDG rule would differ here
        assert_staleness_is_the_traces(run_dir, k)
    assert_same_weights(final_state(run_dir), reference_state(cfg))


@pytest.mark.parametrize("K,M,beta", [(2, 3, 1.0), (3, 2, 0.5)])
def test_adl_applies_the_mean_over_its_batches_once_and_beta_per_hop(K: int, M: int, beta: float) -> None:
    """With every LR 0 nothing moves, so each gradient ADL applies is a fresh one: module k's step must apply
    β^(K−1−k) × back-propagation's gradient of the mean loss over the step's M batches.  The 1/M of that mean is
    applied once (at the loss); divided again at every hop, module k's gradient shrank by M^(K−k)."""
    cfg = small_config(**{"method.name": "adl", "method.accum_steps": M, "method.beta": beta, "pipeline.k": K,
                          "optim.lr": 0.0, "optim.momentum": 0.0, "optim.weight_decay": 0.0, "trainer.epochs": 1,
                          "data.augment": False})
    applied: dict[int, list[list[torch.Tensor]]] = {k: [] for k in range(K)}

    def record(k, run) -> None:
        params = list(run.stage.module.parameters())
        run.stage.optimizer.register_step_pre_hook(
            lambda *_: applied[k].append([p.grad.clone() for p in params]))

    runs = run_emulated(cfg, evaluate=False, setup=record)
    batches = next(epoch_batches(cfg))
    groups = [batches[i:i + M] for i in range(0, len(batches), M)]
    whole = torch.nn.Sequential(*[run.stage.module for run in runs]).train()  # the weights never moved
    for step, group in enumerate(groups):
        whole.zero_grad()
        (sum(F.cross_entropy(whole(x), y) for x, y in group) / len(group)).backward()
        for k, run in enumerate(runs):
            want = [p.grad * beta ** (K - 1 - k) for p in run.stage.module.parameters()]
            torch.testing.assert_close(applied[k][step], want, rtol=1e-5, atol=1e-7, msg=f"module {k} step {step}")
    assert all(len(applied[k]) == len(groups) for k in range(K))


# ---------------------------------------------------------------------------------------- multirun
@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(240)
def test_hydra_multirun_over_every_pipelined_method(tmp_path: Path) -> None:
    """One fdg-train -m sweep, six jobs, each with its own K=2 worker processes and run directory."""
    methods = ["bp", "fdg", "ddg", "fr", "dgl", "adl"]
    sweep = tmp_path / "sweep"
    run_cli(tmp_path, f"method={','.join(methods)}", "pipeline.k=2", f"hydra.sweep.dir={sweep}", multirun=True)
    for job, method in enumerate(methods):
        job_dir = sweep / f"{job}_method={method}"  # sweep job directories name their swept values
        result = json.loads((job_dir / "result.json").read_text())
        assert (result["method"], result["k"]) == (method, 2)
        log = (job_dir / "train.log").read_text()
        assert "rank 0/2: module 0 of 2" in log and "rank 1/2: module 1 of 2" in log
