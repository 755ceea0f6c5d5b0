"""Shared helpers: small configs, multi-process runs through the real launcher, the reference oracle."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fdg_dist import data
from fdg_dist.cli import launch_local
from fdg_dist.config import Config
from fdg_dist.optim import build_optimizer, build_scheduler
from fdg_dist.reference import Simulation
from fdg_dist.trainer import build_module

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10"


def small_config(**overrides: object) -> Config:
    """tiny model, synthetic data, 6 batches an epoch; dotted keys override (``method.beta=0.5``)."""
    cfg = Config()
    cfg.model.name = "tiny"
    cfg.data.name = "synthetic"
    cfg.data.train_size, cfg.data.test_size = 96, 40
    cfg.trainer.batch_size, cfg.trainer.eval_batch_size = 16, 16
    cfg.trainer.epochs, cfg.trainer.threads = 2, 1
    cfg.optim.lr = 0.05
    cfg.sched.milestones = [1]
    cfg.dist.timeout_s = 60
    cfg.checkpoint.enabled = False
    cfg.logging.tensorboard = False
    cfg.logging.progress = "never"
    cfg.resume = "never"
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def run_pipeline(cfg: Config, run_dir: Path) -> dict | None:
    torch.set_num_threads(1)
    return launch_local(cfg, run_dir)


def reference_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The single-process simulation of the same run: same seed, same batches, same epochs."""
    torch.set_num_threads(1)
    K = cfg.pipeline.k
    built = [build_module(cfg, K, k) for k in range(K)]
    modules, aux = [b.module for b in built], [b.aux_head for b in built]
    optimizers = [build_optimizer(cfg.optim, list(m.parameters()) + (list(a.parameters()) if a else []))
                  for m, a in zip(modules, aux, strict=True)]
    schedulers = [build_scheduler(cfg.sched, o, cfg.trainer.epochs) for o in optimizers]
    sim = Simulation(modules, optimizers, method=cfg.method.name, beta=cfg.method.beta, stash=cfg.method.stash,
                     accum_steps=cfg.method.accum_steps, aux_heads=aux)
    train_set, _ = data.load(cfg.data, cfg.trainer.seed)
    loader = data.Batches(train_set, cfg.trainer.batch_size, train=True, augment=cfg.data.augment,
                          seed=cfg.trainer.seed)
    steps = 0
    for epoch in range(cfg.trainer.epochs):
        budget = loader.num_batches() if cfg.trainer.max_steps is None else min(
            loader.num_batches(), cfg.trainer.max_steps - steps)
        if budget <= 0:
            break
        batches = [b for _, b in zip(range(budget), loader.epoch(epoch))]
        sim.epoch(batches)
        steps += budget
        for s in schedulers:
            s.step()
    state: dict[str, torch.Tensor] = {}
    for m in modules:
        state.update(copy.deepcopy(m.state_dict()))
    return state


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, exact: bool = True) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        if exact:
            assert torch.equal(got[name], want[name]), f"{name}: max |diff| {(got[name] - want[name]).abs().max()}"
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
