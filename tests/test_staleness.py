"""Staleness telemetry: the stage's probes agree with the reference's, reach TensorBoard under ``staleness/``,
and say what they must — a fresh gradient (cosine 1) for the last module and K = 1, a stale one (cosine < 1)
for module 0 of FDG at a high learning rate."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import small_config
from emulated import record_of, run_emulated

from fdg_dist import data
from fdg_dist.engine import correctors
from fdg_dist.engine.optim import build_optimizer
from fdg_dist.engine.reference import Simulation
from fdg_dist.engine.staleness import TAGS
from fdg_dist.observe.metrics import RunLog, Stop
from fdg_dist.run.trainer import build_module


def _cfg(K: int, **kw: object):
    return small_config(**{"pipeline.k": K, "optim.lr": 0.4, "trainer.epochs": 1, "data.train_size": 160, **kw})


def _probe_every(n: int):
    def setup(k, run):
        run.executor.probe_every = n
    return setup


def _probes(run) -> list[tuple[int, object]]:
    infos = [e.step for e in run.train[0].events if e.step is not None]
    return [(i, s.staleness) for i, s in enumerate(infos) if s.staleness is not None]


def _simulation(cfg, probe_every: int) -> Simulation:
    """The reference of ``cfg``'s first epoch with probes (built as ``conftest.reference_state`` builds it)."""
    K = cfg.pipeline.k
    modules = [build_module(cfg, K, k).module for k in range(K)]
    sim = Simulation(modules, [build_optimizer(cfg.optim, m.parameters()) for m in modules],
                     beta=cfg.method.beta, probe_every=probe_every)
    train_set, _ = data.load(cfg.data, cfg.trainer.seed)
    loader = data.Batches(train_set, cfg.trainer.batch_size, train=True, augment=cfg.data.augment,
                          seed=cfg.trainer.seed)
    sim.epoch(list(loader.epoch(0)))
    return sim


def test_stage_probes_match_the_reference_and_show_staleness_only_where_it_is() -> None:
    cfg = _cfg(3, **{"method.beta": 0.5})
    runs = run_emulated(cfg, evaluate=False, setup=_probe_every(2))
    sim = _simulation(cfg, 2)
    for k, run in enumerate(runs):
        probes = _probes(run)
        assert probes and all(i % 2 == 0 for i, _ in probes)
        if k == cfg.pipeline.k - 1:  # back-propagates its loss at once: fresh by construction
            assert all(p.local_cosine == 1.0 and p.delay_steps == 0 and p.weight_distance == 0 for _, p in probes)
            continue
        want = {r["step"]: r for r in sim.probes if r["module"] == k}
        for step, p in probes:
            ref = want[step]
            assert p.delay_steps == ref["delay_steps"]
            for tag in TAGS[1:]:
                assert float(getattr(p, tag)) == pytest.approx(ref[tag], rel=1e-4, abs=1e-6), (k, step, tag)
        steady = [p for i, p in probes if i >= 4]
        assert all(p.delay_steps == correctors.weight_delay("fdg", k, 3) for p in steady)
        assert all(float(p.weight_distance) > 0 for p in steady)
    module0 = [float(p.local_cosine) for _, p in _probes(runs[0])[2:]]
    assert min(module0) < 0.999, module0  # stale weights give another gradient
    full = [r["full_cosine"] for r in sim.probes if r["module"] == 0]
    assert full and all(-1 <= c < 0.999 for c in full), full  # and the whole network's staleness adds to it


def test_reference_full_gradient_is_the_applied_one_when_nothing_moved_in_between() -> None:
    """DDG at K = 2 applies module 0's gradient one tick later to the very weights that made it (τ = 0); with
    module 1 frozen (lr 0) nothing else moved either, so the reference's full fresh gradient of the same batch
    must be the applied one — which checks the batch, the chain and the scaling it uses."""
    cfg = _cfg(2, **{"method.name": "ddg"})
    modules = [build_module(cfg, 2, k).module for k in range(2)]
    frozen = small_config(**{"optim.lr": 0.0, "optim.weight_decay": 0.0, "optim.momentum": 0.0}).optim
    optimizers = [build_optimizer(cfg.optim, modules[0].parameters()), build_optimizer(frozen, modules[1].parameters())]
    sim = Simulation(modules, optimizers, method="ddg", probe_every=1)
    train_set, _ = data.load(cfg.data, cfg.trainer.seed)
    loader = data.Batches(train_set, cfg.trainer.batch_size, train=True, augment=False, seed=0)
    sim.epoch(list(loader.epoch(0)))
    assert len(sim.probes) == 10 and all(r["delay_steps"] == 0 and r["weight_distance"] == 0 for r in sim.probes)
    for r in sim.probes:
        assert r["full_cosine"] == pytest.approx(1.0, abs=1e-5) and r["full_norm_ratio"] == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("K", [1, 2])
def test_staleness_tags_reach_tensorboard(tmp_path: Path, K: int) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(K)
    cfg.logging.tensorboard = True
    runs = run_emulated(cfg, setup=_probe_every(2))
    for k, run in enumerate(runs):
        log = RunLog(cfg, tmp_path, module=k, replica=0, reporter=k == K - 1)
        log.epoch(0, lr=0.4, train=run.train[0], test=run.evals[0], seconds=1.0, samples=160,
                  record=record_of(run.train[0].events), steps=run.stage.steps)
        log.finish(wall_s=1.0, best_error=0.5, steps=run.stage.steps, stop=Stop(1, run.stage.steps, "test"),
                   bounds=[0, 1, 2])
    for k in range(K):
        acc = EventAccumulator(str(tmp_path / "tb" / f"module{k}")).Reload()
        assert {f"staleness/{t}" for t in TAGS} <= set(acc.Tags()["scalars"])
        cosine = [e.value for e in acc.Scalars("staleness/local_cosine")]
        assert [e.step for e in acc.Scalars("staleness/local_cosine")] == list(range(1, runs[k].stage.steps + 1, 2))
        if k == K - 1:
            assert cosine == [1.0] * len(cosine)
        else:  # module 0 of FDG at lr 0.4: stale once the weights have moved
            assert min(cosine[1:]) < 0.999 and max(e.value for e in acc.Scalars("staleness/delay_steps")) == 1


def test_probes_are_off_unless_asked() -> None:
    runs = run_emulated(_cfg(2), evaluate=False)
    assert all(e.step.staleness is None for r in runs for e in r.train[0].events if e.step is not None)
