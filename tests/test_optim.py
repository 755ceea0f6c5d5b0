"""The optimizer and LR schedule pinned to closed forms written out by hand.

The engine, the reference simulation and the bp/dp references all build their optimizers and schedules
with the same helpers, so equality tests cannot see a wrong value there (a drop one epoch late, weight
decay lost): these tests compare the composed defaults (the paper's recipe) with the formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from fdg_dist.cli import CONF_DIR, config_from_hydra
from fdg_dist.config import OptimConfig, SchedConfig
from fdg_dist.engine.optim import build_optimizer, build_scheduler


def _composed(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return config_from_hydra(compose("train", overrides=list(overrides)))


def _lrs(sched: SchedConfig, lr: float, epochs: int) -> list[float]:
    """The LR the optimizer holds during each epoch, stepping the scheduler once per epoch as the trainer does."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(sched, opt, epochs)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradient: changes nothing, but keeps torch's step order
        scheduler.step()
    return out


def test_the_default_schedule_is_the_papers_step_decay() -> None:
    cfg = _composed()
    assert cfg.trainer.epochs == 300
    want = [0.1 if e < 150 else 0.01 if e < 225 else 0.001 if e < 275 else 0.0001 for e in range(300)]
    assert _lrs(cfg.sched, cfg.optim.lr, 300) == pytest.approx(want, rel=1e-12)


def test_warm_up_then_step_decay() -> None:
    sched = SchedConfig(name="multistep", milestones=[4, 6], gamma=0.5, warmup_epochs=3)
    want = [0.1 * 1 / 4, 0.1 * 2 / 4, 0.1 * 3 / 4, 0.1, 0.05, 0.05, 0.025, 0.025]
    assert _lrs(sched, 0.1, 8) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("warmup", [0, 2])
def test_cosine_with_and_without_warm_up(warmup: int) -> None:
    epochs, lr = 10, 0.2
    want = [lr * (e + 1) / (warmup + 1) if e < warmup else
            lr * 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup))) for e in range(epochs)]
    assert _lrs(SchedConfig(name="cosine", warmup_epochs=warmup), lr, epochs) == pytest.approx(want, rel=1e-12)


def _two_steps(cfg: OptimConfig, grads: list[torch.Tensor], p0: torch.Tensor) -> torch.Tensor:
    p = torch.nn.Parameter(p0.clone())
    opt = build_optimizer(cfg, [p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_is_momentum_09_weight_decay_5e4_lr_01_by_hand(nesterov: bool) -> None:
    cfg = _composed(f"optim.nesterov={str(nesterov).lower()}").optim
    p0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g1, g2 = torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64), torch.tensor([-0.1, 0.4, 0.2], dtype=torch.float64)
    lr, mu, wd = 0.1, 0.9, 5e-4
    d1 = g1 + wd * p0
    buf = d1  # the first step starts the momentum buffer with the gradient itself
    p1 = p0 - lr * (d1 + mu * buf if nesterov else buf)
    d2 = g2 + wd * p1
    buf = mu * buf + d2
    p2 = p1 - lr * (d2 + mu * buf if nesterov else buf)
    torch.testing.assert_close(_two_steps(cfg, [g1, g2], p0), p2, rtol=1e-12, atol=0)


def test_adam_defaults_by_hand() -> None:
    cfg = _composed("optim=adam").optim
    p0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    g = torch.tensor([0.3, -0.05], dtype=torch.float64)
    b1, b2, lr, eps = 0.9, 0.999, 1e-3, 1e-8
    m, v = (1 - b1) * g, (1 - b2) * g * g
    want = p0 - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    torch.testing.assert_close(_two_steps(cfg, [g], p0), want, rtol=1e-12, atol=0)
