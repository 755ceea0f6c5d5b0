"""Staleness correctors: each equals its independent single-process reference bitwise through the emulated
NCCL fabric, for every method it composes with; ``none`` is today's algorithm; each one changes training."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_weights, reference_state, small_config
from emulated import merged_state, run_emulated

from fdg_dist.config import ConfigError
from fdg_dist.engine import correctors
from fdg_dist.validation import validate

CORRECTORS = ["predict", "lookahead", "lr_by_delay", "dc"]


def _cfg(method: str, K: int, corrector: str, **kw: object):
    extra: dict[str, object] = {"method.accum_steps": 2} if method == "adl" else {}
    if method in ("fdg", "adl"):
        extra["method.beta"] = 0.7
    # a high LR and a short anneal: every corrector moves the weights visibly within 10 steps
    return small_config(**{"method.name": method, "pipeline.k": K, "trainer.max_steps": 10, "optim.lr": 0.2,
                           "corrector.name": corrector, "corrector.anneal_steps": 6, **extra, **kw})


_PLAIN: dict[tuple[str, int], dict[str, torch.Tensor]] = {}


@pytest.mark.parametrize("corrector", CORRECTORS)
@pytest.mark.parametrize("method,K", [("fdg", 4), ("adl", 3), ("ddg", 3), ("fr", 3)])
def test_every_corrector_through_nccl_rules_equals_its_reference(method: str, K: int, corrector: str) -> None:
    cfg = _cfg(method, K, corrector)
    if method == "fr" and corrector in ("predict", "lookahead", "dc"):
        with pytest.raises(ConfigError, match="corrector.name: .*re-runs the forward"):
            validate(cfg)
        return
    validate(cfg)
    got = merged_state(run_emulated(cfg, evaluate=False))
    assert_same_weights(got, reference_state(cfg))
    if (method, K) not in _PLAIN:
        _PLAIN[(method, K)] = reference_state(_cfg(method, K, "none"))
    plain = _PLAIN[(method, K)]
    assert any(not torch.equal(got[n], plain[n]) for n in plain), f"{corrector} changed nothing"


def test_corrector_none_is_the_papers_algorithm_bitwise() -> None:
    """corrector=none goes through the corrector hooks and must leave every result as it was without them."""
    cfg = _cfg("fdg", 3, "none")
    runs = run_emulated(cfg, evaluate=False)
    assert all(type(r.stage.corrector) is correctors.Corrector for r in runs)
    assert_same_weights(merged_state(runs), reference_state(cfg))


def test_weight_delay_is_what_the_pipeline_does() -> None:
    """τ from the formula equals the steps a module really took between a forward and the step applying it
    (measured by the staleness probe of every step of a real run, in the steady state)."""
    for method, K, accum in (("fdg", 4, 1), ("ddg", 4, 1), ("adl", 3, 2), ("adl", 3, 3)):
        cfg = _cfg(method, K, "none", **{"trainer.max_steps": 12, "trainer.epochs": 1, "data.train_size": 192})
        if method == "adl":
            cfg.method.accum_steps = accum

        def every_step(k, run):
            run.executor.probe_every = 1

        runs = run_emulated(cfg, evaluate=False, setup=every_step)
        for k, run in enumerate(runs):
            delays = [e.step.staleness.delay_steps for e in run.train[0].events if e.step is not None]
            steady = delays[len(delays) // 2]
            assert steady == correctors.weight_delay(method, k, K, accum), (method, k, delays)


def test_correctors_formulas() -> None:
    assert [correctors.weight_delay("fdg", k, 4) for k in range(4)] == [5, 3, 1, 0]
    assert [correctors.weight_delay("ddg", k, 4) for k in range(4)] == [2, 1, 0, 0]
    assert correctors.lookahead_coefficient(0.9, 1) == 0.9 and correctors.lookahead_coefficient(0.9, 3) == pytest.approx(2.439)
    assert correctors.lr_by_delay_factor(3, 0, 100) == 0.25 and correctors.lr_by_delay_factor(3, 100, 100) == 1.0
    g, ms = torch.tensor([2.0]), torch.tensor([4.0])
    assert correctors.compensate(g, ms, torch.tensor([1.5]), torch.tensor([1.0]), 1.0).item() == pytest.approx(2 + 4 * 0.5 / 2)


@pytest.mark.parametrize("overrides,match", [
    ({"method.name": "bp", "corrector.name": "dc"}, "method 'bp' has none"),
    ({"corrector.name": "predict", "optim.momentum": 0.0}, "optim.momentum > 0"),
    ({"corrector.name": "dc", "method.stash": "recompute"}, "stashed weights"),
    ({"corrector.name": "nesterov"}, "unknown corrector"),
])
def test_a_corrector_that_cannot_apply_is_refused_naming_the_key(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate(small_config(**overrides))
