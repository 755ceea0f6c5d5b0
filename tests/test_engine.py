"""Multi-process runs over gloo equal the single-process reference, weight for weight (SPEC §1).

Every run goes through the real launcher (torch's elastic agent, one process per module), crosses
epoch boundaries with their drain (6 batches an epoch, 4 epochs, capped at 21 steps) and is compared
bit for bit: with one thread per process the arithmetic is the same as in the reference process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    assert_delays_measured,
    assert_same_weights,
    final_state,
    reference_state,
    run_pipeline,
    small_config,
    train_spans,
)

from fdg_dist.models import build

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]


def _config(**kw: object):
    base = {"trainer.epochs": 4, "trainer.max_steps": 21, "logging.trace": True}  # 6+6+6+3 steps, 3 drains
    return small_config(**{**base, **kw})


@pytest.mark.parametrize("K", [2, 3, 4])
def test_fdg_pipeline_equals_reference_bitwise(K: int, run_dir: Path) -> None:
    cfg = _config(**{"pipeline.k": K, "method.beta": 0.7 if K == 3 else 1.0})
    result = run_pipeline(cfg, run_dir)
    assert_same_weights(final_state(run_dir), reference_state(cfg))
    assert result is not None and result["k"] == K
    # the trace, by its recorded times: module k's update from batch b is first used by its forward of batch
    # b + 2(K-1-k) (at the last module, plain back-propagation: b + 1), and it holds 2(K-1-k) forwards
    for k in range(K):
        assert_delays_measured(run_dir, k, max(2 * (K - 1 - k), 1), [6, 6, 6, 3])
        spans = train_spans(run_dir, k)
        assert all(s["args"]["applied_batches"] == [s["args"]["batch"]] for s in spans if s["cat"] == "step")
        assert max(s["args"]["stash"] for s in spans) == 2 * (K - 1 - k)


def test_k1_is_plain_backpropagation_bit_for_bit(run_dir: Path) -> None:
    cfg = _config(**{"pipeline.k": 1})
    run_pipeline(cfg, run_dir)
    from fdg_dist import data
    from fdg_dist.engine.optim import build_optimizer, build_scheduler
    from fdg_dist.run.trainer import seed_everything

    torch.set_num_threads(1)
    seed_everything(cfg.trainer.seed)
    model = build(cfg.model.name, cfg.data.num_classes)
    opt = build_optimizer(cfg.optim, model.parameters())
    sched = build_scheduler(cfg.sched, opt, cfg.trainer.epochs)
    train_set, _ = data.load(cfg.data, cfg.trainer.seed)
    loader = data.Batches(train_set, cfg.trainer.batch_size, train=True, augment=True, seed=cfg.trainer.seed)
    steps = 0
    for epoch in range(cfg.trainer.epochs):
        for x, y in loader.epoch(epoch):
            if steps == cfg.trainer.max_steps:
                break
            model.train()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
        sched.step()
    assert_same_weights(final_state(run_dir), model.state_dict())


@pytest.mark.parametrize("method,extra", [
    ("ddg", {}),
    ("fr", {}),
    ("adl", {"method.accum_steps": 4}),
    ("dgl", {}),
])
def test_other_methods_equal_their_reference(method: str, extra: dict, run_dir: Path) -> None:
    """(fdg with recompute is covered by the stash test below.)"""
    cfg = _config(**{"pipeline.k": 3, "method.name": method, **extra})
    run_pipeline(cfg, run_dir)
    assert_same_weights(final_state(run_dir), reference_state(cfg))


def test_shrink_is_exact_on_the_first_applied_step(tmp_path: Path) -> None:
    """With lr·(plain SGD) the first update of module k is -lr·β^{K-1-k}·g(β=1): compare the deltas."""
    K, beta = 3, 0.5
    base = {"pipeline.k": K, "trainer.max_steps": 1, "trainer.epochs": 1, "optim.momentum": 0.0,
            "optim.weight_decay": 0.0}
    init = {}
    for b in (1.0, beta):
        run_pipeline(small_config(**{**base, "method.beta": b}), tmp_path / str(b))
    from fdg_dist.run.trainer import build_module

    for k in range(K):
        init.update(build_module(small_config(**base), K, k).module.state_dict())
    full, shrunk = final_state(tmp_path / "1.0"), final_state(tmp_path / str(beta))
    bounds = build_module(small_config(**base), K, 0).bounds
    for name, w0 in init.items():
        if not w0.is_floating_point() or "running" in name:
            continue  # BatchNorm statistics are not gradients
        k = next(j for j in range(K) if bounds[j] <= int(name.split(".")[0]) < bounds[j + 1])
        torch.testing.assert_close(shrunk[name] - w0, (full[name] - w0) * beta ** (K - 1 - k), rtol=1e-4, atol=1e-7)


def test_stash_uses_forward_time_weights_and_recompute_uses_current(tmp_path: Path) -> None:
    """Both match their own reference and differ from each other: the weights used really differ."""
    results = {}
    for mode in ("weights", "recompute"):
        cfg = _config(**{"pipeline.k": 2, "method.stash": mode})
        run_pipeline(cfg, tmp_path / mode)
        results[mode] = final_state(tmp_path / mode)
        assert_same_weights(results[mode], reference_state(cfg))
    assert any(not torch.equal(results["weights"][n], results["recompute"][n]) for n in results["weights"])


def test_channels_last_is_the_same_training_in_nhwc(run_dir: Path) -> None:
    """NHWC convolutions through the whole pipeline (data, received activations, weights, stash) train
    the same model as the NCHW reference up to float rounding, and really run in NHWC."""
    cfg = _config(**{"pipeline.k": 3, "trainer.channels_last": True})
    run_pipeline(cfg, run_dir)
    got, want = final_state(run_dir), reference_state(_config(**{"pipeline.k": 3}))
    assert sorted(got) == sorted(want)
    for name in want:  # 21 steps of differently ordered float sums: ~1e-6 apart, a layout bug is O(1)
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-5, msg=name)
    convs = [t for t in got.values() if t.dim() == 4 and t.shape[1] > 1 and t.shape[2] > 1]
    assert convs and all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in convs)
