"""The treatments of delayed gradients beside the correctors (issue 33): spike compensation, delay-scaled momentum,
per-module clipping, lr_by_delay annealed over a fraction of the run, Adam-aware weight prediction and the
synchronous warm-up.  Each equals its independent single-process reference bitwise through the emulated NCCL
fabric (and all of them together through real gloo processes, killed and resumed across the warm-up's switch),
each changes training, and each one's arithmetic is pinned by a check of its formula."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import (
    assert_same_weights,
    data_parallel_reference,
    final_state,
    reference_state,
    run_pipeline,
    small_config,
)
from emulated import StopAt, merged_state, run_emulated
from torch import nn

from fdg_dist.config import Config, OptimConfig, staleness_options
from fdg_dist.engine import correctors, schedule
from fdg_dist.engine.executor import Cut
from fdg_dist.engine.optim import DelayedUpdate, SpikeCompensatedSGD, spike_coefficients
from fdg_dist.engine.stage import Stage
from fdg_dist.run.trainer import build_stage
from fdg_dist.validation import validate

# the reference steps spike compensation by hand, not through the optimizer's step, which torch's scheduler notes
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")

# 6 batches an epoch, 10 steps: epoch 0 whole, epoch 1 cut after 4 batches
TREATMENTS: dict[str, dict[str, object]] = {
    "spike": {"optim.spike_compensation": True},
    "delay_momentum": {"optim.delay_momentum_max": 0.99, "optim.nesterov": True},
    "clip": {"optim.clip_norm": 0.05},
    "anneal_fraction": {"corrector.name": "lr_by_delay", "corrector.anneal_fraction": 0.5},
    "warmup": {"method.sync_warmup_steps": 4},  # the switch inside epoch 0
    "warmup_lr_by_delay": {"method.sync_warmup_steps": 4, "corrector.name": "lr_by_delay",
                           "corrector.anneal_fraction": 0.5},  # the annealing starts at the switch
    "less_momentum_with_delay": {"optim.delay_momentum_max": 0.5},
    # everything at once, the warm-up across the epoch boundary (epoch 0 synchronous, epoch 1 switches)
    "together": {"corrector.name": "predict", "optim.spike_compensation": True, "optim.delay_momentum_max": 0.95,
                 "optim.clip_norm": 0.05, "method.sync_warmup_steps": 8},
}
ADAM = {"optim.name": "adamw", "optim.lr": 0.01, "optim.weight_decay": 0.1, "optim.betas": (0.9, 0.99)}


def _cfg(method: str = "fdg", K: int = 4, **kw: object) -> Config:
    extra: dict[str, object] = {"method.accum_steps": 2} if method == "adl" else {}
    if method in ("fdg", "adl"):
        extra["method.beta"] = 0.7
    return small_config(**{"method.name": method, "pipeline.k": K, "trainer.max_steps": 10, "optim.lr": 0.2,
                           **extra, **kw})


_PLAIN: dict[tuple, dict[str, torch.Tensor]] = {}


def _assert_reference_and_changed(cfg: Config, plain: Config) -> None:
    validate(cfg)
    got = merged_state(run_emulated(cfg, evaluate=False))
    assert_same_weights(got, reference_state(cfg))
    key = (plain.method.name, plain.pipeline.k, plain.optim.name)
    if key not in _PLAIN:
        _PLAIN[key] = reference_state(plain)
    assert any(not torch.equal(got[n], _PLAIN[key][n]) for n in got), "the treatment changed nothing"


@pytest.mark.parametrize("treatment", sorted(TREATMENTS))
@pytest.mark.parametrize("method,K", [("fdg", 4), ("adl", 3)])
def test_every_treatment_through_nccl_rules_equals_its_reference(method: str, K: int, treatment: str) -> None:
    _assert_reference_and_changed(_cfg(method, K, **TREATMENTS[treatment]), _cfg(method, K))


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_predict_adam_with_clipping_equals_its_reference(optimizer: str) -> None:
    adam = {**ADAM, "optim.name": optimizer}
    _assert_reference_and_changed(_cfg("fdg", 3, **adam, **{"corrector.name": "predict_adam", "optim.clip_norm": 0.5}),
                                  _cfg("fdg", 3, **adam))


def test_all_off_is_the_papers_algorithm_bitwise() -> None:
    """With every treatment off the stages hold no update rule that changes the step, and the run is as before."""
    cfg = _cfg("fdg", 3)
    assert staleness_options(cfg) == []
    runs = run_emulated(cfg, evaluate=False)
    assert all(r.stage.update.momentum is None and r.stage.update.spike is None and r.stage.clip_norm is None
               for r in runs)
    assert_same_weights(merged_state(runs), reference_state(cfg))


# ------------------------------------------------------------------------------------------ spike compensation
@pytest.mark.parametrize("delay", [1, 3, 5])
def test_spike_compensation_gives_a_delayed_gradient_the_undelayed_total_effect(delay: int) -> None:
    """One gradient g, then none: momentum SGD moves w by lr·g·(1 − m^n)/(1 − m) over its first n steps.  Applied
    ``delay`` steps late with spike compensation, from its own step on w has moved exactly as far as the
    undelayed run at the same step, and the total is lr·g/(1 − m)."""
    lr, m, g = 0.1, 0.9, 2.0

    def moved(spike: tuple[float, float] | None, steps: int) -> list[float]:
        w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = SpikeCompensatedSGD([w], lr=lr, momentum=m)
        path = []
        for i in range(steps):
            w.grad = torch.full_like(w, g if i == 0 else 0.0)
            opt.step(spike=spike)
            path.append(-w.item())
        return path

    undelayed = moved(None, 400)
    delayed = moved(spike_coefficients(m, delay), 400 - delay)
    assert delayed == pytest.approx(undelayed[delay:], rel=1e-12)
    assert delayed[-1] == pytest.approx(lr * g / (1 - m), rel=1e-12)
    a, b = spike_coefficients(m, delay)
    assert (a, b) == pytest.approx((m ** delay, sum(m ** i for i in range(delay))))


def test_spike_compensation_at_a_delay_of_one_is_nesterov() -> None:
    """(a, b) = (m, 1): w − lr·(m·v + g), Nesterov's update (torch's formulation)."""
    assert spike_coefficients(0.9, 1) == pytest.approx((0.9, 1.0))
    paths = []
    for nesterov in (True, False):
        w = nn.Parameter(torch.zeros(5, dtype=torch.float64))
        opt = SpikeCompensatedSGD([w], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            w.grad = torch.randn(5, generator=gen, dtype=torch.float64)
            opt.step(spike=None if nesterov else spike_coefficients(0.9, 1))
        paths.append(w.detach().clone())
    torch.testing.assert_close(paths[0], paths[1], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------- delay-scaled momentum
def test_delay_scaled_momentum_per_module_and_only_inside_the_step() -> None:
    """FDG at K = 4 delays modules by 5, 3, 1, 0 steps: m_k = 0.9 + (d_k/5)·0.09.  The optimizer steps with m_k,
    and its state (what checkpoints hold) keeps optim.momentum."""
    cfg = _cfg("fdg", 4, **{"optim.delay_momentum_max": 0.99, "optim.nesterov": True})
    want = [0.99, 0.954, 0.918, 0.9]
    def momenta_stepped_with(stage: Stage) -> list[float]:
        seen, original = [], stage.optimizer.step

        def step() -> None:
            seen.append(stage.optimizer.param_groups[0]["momentum"])
            original()

        stage.optimizer.step = step
        for delayed in (True, False):  # False: a synchronous warm-up step, back-propagation's momentum
            for p in stage.parameters():
                p.grad = torch.ones_like(p)
            stage.step(delayed=delayed)
        return seen

    for k in range(4):
        stage = build_stage(cfg, 4, k, torch.device("cpu"), total_batches=10)[0]
        assert stage.update.momentum == pytest.approx(want[k], abs=1e-15)
        assert momenta_stepped_with(stage) == [pytest.approx(want[k], abs=1e-15), 0.9]
        assert stage.optimizer.state_dict()["param_groups"][0]["momentum"] == 0.9


# ------------------------------------------------------------------------------------------------- clipping
def test_clipping_scales_each_module_to_its_own_norm() -> None:
    """SGD with lr 1 and nothing else: the step is the clipped gradient.  A module above the threshold moves by
    exactly clip_norm (its own norm, not the network's), one below it by its whole gradient."""
    def stepped(grads: list[torch.Tensor], clip: float) -> torch.Tensor:
        layer = nn.Linear(2, 2)
        opt = torch.optim.SGD(layer.parameters(), lr=1.0)
        before = torch.cat([p.detach().flatten().clone() for p in layer.parameters()])
        for p, g in zip(layer.parameters(), grads, strict=True):
            p.grad = g.clone()
        info = Stage(layer, 0, 1, opt, None, clip_norm=clip).step()
        assert info.grad_norm.item() == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item())
        return before - torch.cat([p.detach().flatten() for p in layer.parameters()])

    big = [torch.full((2, 2), 3.0), torch.full((2,), 4.0)]  # norm √(4·9 + 2·16) = √68
    assert stepped(big, 2.0).norm().item() == pytest.approx(2.0, rel=1e-5)
    torch.testing.assert_close(stepped(big, 2.0), torch.cat([g.flatten() for g in big]) * 2.0 / (68 ** 0.5 + 1e-6))
    small = [torch.full((2, 2), 0.1), torch.full((2,), 0.1)]
    torch.testing.assert_close(stepped(small, 2.0), torch.cat([g.flatten() for g in small]))


# ------------------------------------------------------------------------------------------ lr_by_delay, Adam
def test_anneal_fraction_is_a_fraction_of_the_modules_steps() -> None:
    assert correctors.anneal_steps(0.25, 160) == 40 and correctors.anneal_steps(0.5, 1760) == 880
    assert correctors.anneal_steps(0.5, 10, accum_steps=3) == 2  # 4 steps (10 batches in groups of 3)
    assert correctors.anneal_steps(0.01, 10) == 1
    lr_by_delay = _cfg(**{"corrector.name": "lr_by_delay", "corrector.anneal_fraction": 0.25}).corrector
    built = correctors.build(lr_by_delay, 5, batches=160)
    assert (built.anneal_steps, built.offset) == (40, 0)
    built = correctors.build(lr_by_delay, 5, batches=160, warmup=40)  # a quarter of the 120 delayed steps
    assert (built.anneal_steps, built.offset) == (30, 40)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.6)
    for step, lr in ((10, 0.1), (40, 0.1), (55, 0.6 * 6 ** -0.5), (70, 0.6)):  # LR / (τ+1) at the switch
        with built.step_lr(opt, step):
            assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    assert correctors.build(lr_by_delay, 5, batches=10, accum_steps=3, warmup=4).offset == 2


@pytest.mark.parametrize("decoupled", [False, True])
def test_predict_adam_moves_the_snapshot_along_adams_update(decoupled: bool) -> None:
    """After two Adam steps, ŵ = w − τ·lr·(m̂/(√v̂ + ε) + λ·w), computed here in float64 from the moments."""
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    make = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = make([w], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for g in ([0.3, -0.1, 2.0], [0.2, 0.4, -1.0]):
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    snapshot = w.detach().clone()
    correctors.PredictAdam(3, decoupled).shift([snapshot], [w], opt)
    st = opt.state[w]
    update = (st["exp_avg"] / (1 - 0.9 ** 2)) / ((st["exp_avg_sq"] / (1 - 0.99 ** 2)).sqrt() + 1e-8)
    want = w.detach() - 3 * 0.01 * update - (3 * 0.01 * 0.1 * w.detach() if decoupled else 0)
    torch.testing.assert_close(snapshot, want, rtol=1e-14, atol=1e-15)


# ------------------------------------------------------------------------------------------ synchronous warm-up
def test_the_warm_up_is_back_propagation() -> None:
    """Its first N steps (here the whole run, across an epoch boundary) are back-propagation's, bit for bit: the
    unsplit model trained by plain back-propagation; β, the corrector and the delay treatments wait for the switch."""
    cfg = _cfg("fdg", 3, **{"method.sync_warmup_steps": 10, "corrector.name": "predict",
                            "optim.spike_compensation": True, "method.beta": 0.5})
    assert_same_weights(merged_state(run_emulated(cfg, evaluate=False)), data_parallel_reference(cfg, replicas=1))


@pytest.mark.parametrize("sync,K,accum", [(3, 3, 1), (5, 4, 2)])
def test_the_warm_up_drains_before_the_method_starts(sync: int, K: int, accum: int) -> None:
    """Module 0 forwards batch ``sync`` only after every module applied every synchronous batch; synchronous
    batches are locked (forward and backward in their own tick); accumulation restarts at the switch; no vote to
    stop falls in the ticks where a module idles between the two."""
    method = "adl" if accum > 1 else "fdg"
    acts = [schedule.train_actions(method, k, K, 9, accum, sync) for k in range(K)]
    first = next(a for a in acts[0] if a.kind is schedule.Kind.FORWARD and a.batch == sync)
    sync_steps = [a for k in range(K) for a in acts[k] if a.kind is schedule.Kind.STEP and a.batch < sync]
    assert sync_steps and max(a.time for a in sync_steps) < first.time
    assert all(a.tick == a.batch for k in range(K) for a in acts[k] if a.batch < sync)
    steps0 = [a.batch for a in acts[0] if a.kind is schedule.Kind.STEP]
    assert steps0 == sorted({*range(accum - 1, sync, accum), sync - 1, *range(sync + accum - 1, 9, accum), 8})
    votes = schedule.plan(method, 0, K, 9, train=True, accum_steps=accum, sync=sync).votes
    assert votes == tuple(t for t in range(K - 1, 9) if not sync <= t < sync + K - 1)
    assert schedule.plan(method, 0, K, 9, train=True, accum_steps=accum).votes == tuple(range(K - 1, 9))


@pytest.mark.parametrize("tick", [2, 3, 7])  # inside the warm-up, its last tick, after the switch
def test_a_cut_across_the_switch_resumes_bit_for_bit(tick: int, tmp_path) -> None:
    cfg = _cfg("fdg", 3, **{"method.sync_warmup_steps": 4, "optim.spike_compensation": True,
                            "data.train_size": 160, "trainer.epochs": 1})  # one epoch of 10 batches
    want = merged_state(run_emulated(cfg, evaluate=False))
    first = run_emulated(cfg, evaluate=False, stop=StopAt(epoch=0, tick=tick))
    cuts = [run.train[-1].stopped for run in first]
    assert all(c is not None and c.tick == tick for c in cuts)
    saved = tmp_path / "cut.pt"
    torch.save({"states": [run.stage.state_dict() for run in first], "cuts": [dataclasses.asdict(c) for c in cuts]},
               saved)
    loaded = torch.load(saved, weights_only=True)
    second = run_emulated(cfg, evaluate=False, resume=(0, loaded["states"], [Cut(**c) for c in loaded["cuts"]]))
    assert_same_weights(merged_state(second), want)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_real_processes_killed_inside_the_warm_up_resume_to_the_reference(tmp_path, monkeypatch) -> None:
    """K = 3 gloo processes with every treatment on; module 1 is killed in epoch 2, whose first batches are the
    warm-up's last: the relaunched attempt resumes from epoch 1's checkpoint, switches, and ends on the reference."""
    cfg = _cfg("fdg", 3, **{"trainer.max_steps": None, "trainer.epochs": 2, "corrector.name": "lr_by_delay",
                            "corrector.anneal_fraction": 0.5, "optim.spike_compensation": True,
                            "optim.delay_momentum_max": 0.95, "optim.clip_norm": 0.05,
                            "method.sync_warmup_steps": 8, "checkpoint.enabled": True, "dist.max_restarts": 1})
    cfg.resume = "auto"
    monkeypatch.setenv("FDG_TEST_KILL", "module=1,epoch=1,batch=3")
    run_dir = tmp_path / "run"
    run_pipeline(cfg, run_dir)
    assert (run_dir / ".fdg_test_killed-module1").exists(), "the kill hook never fired"
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert_same_weights(final_state(run_dir), reference_state(cfg))


# ------------------------------------------------------------------------------------------------ config
# (each refusal of a treatment that cannot apply is a row of tests/test_config_validation.py)
def test_the_options_are_named_in_results() -> None:
    cfg = _cfg(**{"corrector.name": "lr_by_delay", "corrector.anneal_fraction": 0.25, "optim.delay_momentum_max": 0.99,
                  "optim.nesterov": True, "method.sync_warmup_steps": 16, "optim.clip_norm": 1.0})
    assert staleness_options(cfg) == ["anneal=0.25", "dmom=0.99", "nesterov", "warmup=16", "clip=1"]
    assert staleness_options(_cfg(**{"optim.spike_compensation": True})) == ["spike"]
    adl = _cfg(**{"method.name": "adl", "method.accum_steps": 4, "trainer.batch_size": 32, "optim.nesterov": True})
    assert staleness_options(adl) == ["M=4", "batch=32", "nesterov"]  # micro-batched ADL is told from ADL at 128


def test_delayed_update_is_plain_sgd_where_nothing_is_delayed() -> None:
    cfg = OptimConfig(spike_compensation=True, delay_momentum_max=0.99)
    last = DelayedUpdate(cfg, 0, 5)
    assert last.momentum == 0.9 and last.spike is None
    assert DelayedUpdate(cfg, 5, 5).spike == pytest.approx((0.99 ** 5, (1 - 0.99 ** 5) / 0.01))
    assert DelayedUpdate(OptimConfig(spike_compensation=True), 3, 5).spike == pytest.approx(
        (0.9 ** 3, 1 + 0.9 + 0.81))
    assert math.isclose(DelayedUpdate(OptimConfig(delay_momentum_max=0.99), 3, 0).momentum, 0.9)
    assert [DelayedUpdate(OptimConfig(delay_momentum_max=0.5), d, 5).momentum for d in (5, 3, 0)] == pytest.approx(
        [0.5, 0.66, 0.9])  # below optim.momentum: less momentum the more delayed
