"""Memory probe: what a stage keeps alive between actions is exactly its stash, and nothing leaks.

Two weak-reference probes see the memory really pinned, not just the length of a dict: every tensor
autograd saves for a backward is packed into a tracked holder (``saved_tensors_hooks``), and every
tensor a stash entry holds (input, output, weight snapshot) is tracked from the moment it is stashed.
A graph or entry that outlived its backward would show up as live bytes.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import small_config

from fdg_dist import models
from fdg_dist.engine import schedule
from fdg_dist.engine.optim import build_optimizer, build_scheduler
from fdg_dist.engine.schedule import Kind
from fdg_dist.engine.stage import Stage
from fdg_dist.run.trainer import build_module, stash_depth
from fdg_dist.split import partition

BATCH = 16


class _Held:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class SavedTensorProbe:
    """Bytes of the tensors autograd currently keeps for pending backwards (created under the probe)."""

    def __init__(self) -> None:
        self.live: weakref.WeakSet[_Held] = weakref.WeakSet()
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.t)

    def _pack(self, t: torch.Tensor) -> _Held:
        held = _Held(t)
        self.live.add(held)
        return held

    def bytes(self) -> int:
        return sum(h.t.numel() * h.t.element_size() for h in self.live)


def _alive_bytes(refs: list[weakref.ref[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for r in refs if (t := r()) is not None)


def _drive(K: int, k: int, stash: str, n_batches: int = 8) -> tuple[list[int], list[int], list[int]]:
    """Run module k's FDG actions for one epoch on its own (random inputs and incoming gradients).

    Returns, after every action: bytes autograd keeps saved, stash length, bytes of tensors ever stashed
    that are still alive.
    """
    torch.manual_seed(0)
    built = build_module(small_config(**{"pipeline.k": K}), K, k)
    cfg = small_config()
    opt = build_optimizer(cfg.optim, built.module.parameters())
    stage = Stage(built.module, k, K, opt, build_scheduler(cfg.sched, opt, 1), stash=stash)
    in_shape, out_shape = (BATCH, *built.shapes[0][1:]), (BATCH, *built.shapes[1][1:])
    probe = SavedTensorProbe()
    stashed: list[weakref.ref[torch.Tensor]] = []
    saved, lengths, held = [], [], []
    with probe.hooks:
        for a in schedule.train_actions("fdg", k, K, n_batches):
            if a.kind is Kind.FORWARD:
                stage.forward(a.batch, torch.randn(in_shape), torch.zeros(BATCH, dtype=torch.long), train=True,
                              keep_for_backward=True)
                entry = stage.stash[a.batch]
                stashed += [weakref.ref(t) for t in (entry.x, entry.out, *(entry.params or {}).values())
                            if t is not None]
                del entry  # the probe itself must not pin what it watches
            elif a.kind is Kind.BACKWARD:
                stage.backward(a.batch, torch.randn(out_shape))
            else:
                stage.step()
            saved.append(probe.bytes())
            lengths.append(len(stage.stash))
            held.append(_alive_bytes(stashed))
    return saved, lengths, held


@pytest.mark.parametrize("K,k", [(2, 0), (3, 0), (3, 1), (4, 1)])
def test_stashed_weights_pin_exactly_2_k_minus_1_minus_k_forwards(K: int, k: int) -> None:
    saved, lengths, held = _drive(K, k, "weights")
    depth = stash_depth("fdg", k, K)
    assert depth == 2 * (K - 1 - k) and max(lengths) == depth
    graph, entry = saved[0], held[0]  # after the first forward: one stashed graph and one entry
    assert graph > 0 and entry > 0
    for s, h, n in zip(saved, held, lengths, strict=True):  # memory follows the stash, action by action
        assert (s, h) == (n * graph, n * entry)
    assert max(saved) == depth * graph and max(held) == depth * entry
    assert saved[-1] == held[-1] == lengths[-1] == 0  # the drain frees everything


@pytest.mark.parametrize("K,k", [(2, 0), (3, 1)])
def test_recompute_pins_no_graph_only_the_inputs(K: int, k: int) -> None:
    saved, lengths, held = _drive(K, k, "recompute")
    depth = stash_depth("fdg", k, K)
    assert max(lengths) == depth
    assert set(saved) == {0}  # no autograd graph survives an action
    x_bytes = BATCH * 3 * 32 * 32 * 4 if k == 0 else held[0]
    assert all(h == n * x_bytes for h, n in zip(held, lengths, strict=True))  # inputs only, nothing else
    assert max(held) == depth * x_bytes and held[-1] == 0


@pytest.mark.parametrize("K,k,stash", [(2, 0, "weights"), (3, 1, "weights"), (3, 1, "recompute")])
def test_the_split_table_stash_column_is_what_a_real_stash_entry_holds(K: int, k: int, stash: str) -> None:
    """partition.stash_bytes (meta device, saved-tensor hooks) equals the bytes one real stashed forward pins:
    the storages of its saved tensors, input, output and weight snapshot, the live weights excluded."""
    torch.manual_seed(0)
    cfg = small_config(**{"pipeline.k": K})
    built = build_module(cfg, K, k)
    opt = build_optimizer(cfg.optim, built.module.parameters())
    stage = Stage(built.module, k, K, opt, None, stash=stash)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stage.forward(0, torch.randn(BATCH, *built.shapes[0][1:]), torch.zeros(BATCH, dtype=torch.long), train=True,
                      keep_for_backward=True)
    entry = stage.stash[0]
    for t in (entry.x, entry.out, *(entry.params or {}).values()):
        if t is not None:
            storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    live = {t.untyped_storage()._cdata for t in built.module.state_dict(keep_vars=True).values()}
    real = sum(n for s, n in storages.items() if s not in live)
    blocks = models.build_blocks(cfg.model.name, cfg.data.num_classes, device="meta")[built.bounds[k]:built.bounds[k + 1]]
    assert partition.stash_bytes(blocks, (BATCH, *built.shapes[0][1:]), stash) == real
    if stash == "weights":  # the estimate it replaces (input + weights) misses most of it
        x_bytes = entry.x.numel() * 4
        assert real > 2 * (x_bytes + sum(p.numel() * 4 for p in built.module.parameters()))
