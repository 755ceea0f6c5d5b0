"""Every shape a run meets is run before the first tick (cuDNN autotunes there, not mid-epoch), and the
run-through leaves no trace in the stage."""

from __future__ import annotations

import torch
from conftest import small_config

from fdg_dist.engine.autotune import autotune, shapes_of_a_run
from fdg_dist.run.trainer import build_stage


def test_the_shapes_of_a_run_are_every_train_and_eval_batch_size_once() -> None:
    assert shapes_of_a_run([32, 32, 32, 8], [64, 64, 16]) == [(32, True), (8, True), (64, False), (16, False)]


def test_autotune_runs_every_shape_and_leaves_weights_statistics_grads_and_generators_as_they_were() -> None:
    cfg = small_config(**{"method.name": "dgl", "pipeline.k": 2})  # module 0 has BatchNorm and a DGL head
    stage, boundary, _ = build_stage(cfg, 2, 0, torch.device("cpu"))
    seen: list[tuple[int, bool, bool]] = []
    stage.module.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[0], m.training,
                                                                         torch.is_grad_enabled())))
    stage.aux_head.register_forward_hook(lambda m, args, out: seen.append((-args[0].shape[0], m.training,
                                                                            torch.is_grad_enabled())))
    state = {k: v.clone() for k, v in stage.module.state_dict().items()}
    stage.module.eval()
    rng = torch.get_rng_state()
    autotune(stage, boundary.in_shape, torch.float32, [(32, True), (8, True), (64, False)])
    assert seen == [(32, True, True), (-32, True, True), (8, True, True), (-8, True, True), (64, False, False),
                    (-64, False, False)]
    after = stage.module.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # running_mean/var and num_batches_tracked too
    assert all(p.grad is None for p in stage.parameters())
    assert not stage.module.training and torch.equal(torch.get_rng_state(), rng)
