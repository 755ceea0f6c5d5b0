"""A single-process simulation of every pipelined method: the tests' oracle.

Written to be obviously correct rather than fast, and independent of ``schedule``/``stage``: the
tick formulas are spelled out from SPEC §1 again, weight stashing is a ``deepcopy`` of the module
taken at forward time, and messages are dictionary entries that become visible at the next tick.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fdg_dist import loss
from fdg_dist.optim import LRSchedule

Batch = tuple[torch.Tensor, torch.Tensor]


class Simulation:
    """K modules with their optimizers (and DGL heads), trained epoch by epoch like the pipeline."""

    def __init__(self, modules: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer], *,
                 method: str = "fdg", beta: float = 1.0, stash: str = "weights", accum_steps: int = 1,
                 aux_heads: Sequence[nn.Module | None] | None = None,
                 grad_sync: Callable[[int, list[torch.Tensor]], None] | None = None,
                 schedules: Sequence[LRSchedule] | None = None) -> None:
        self.modules = list(modules)
        self.optimizers = list(optimizers)
        self.K = len(self.modules)
        self.method = method
        self.beta = beta
        self.stash_mode = "recompute" if method == "fr" else stash
        self.M = accum_steps
        self.aux_heads = list(aux_heads) if aux_heads is not None else [None] * self.K
        self.grad_sync = grad_sync  # replicas: (module, its gradients) -> average them in place, as Stage.step
        self.schedules = schedules  # advanced after every step by the batches it applied (per-batch schedules)
        self.backwards = [0] * self.K
        self.step_log: list[tuple[int, int, int]] = []  # (module, tick, last batch applied)

    # ------------------------------------------------------------------ pieces
    def _forward_stashed(self, k: int, x: torch.Tensor) -> tuple:
        """Module k's forward whose gradient comes later: keep (weights, input, output)."""
        live = self.modules[k]
        live.train()
        x = x.detach().requires_grad_(k > 0)
        if self.stash_mode == "recompute":
            with torch.no_grad():
                out = live(x)
            return (None, x, None), out.detach()
        snapshot = copy.deepcopy(live)  # the weights this forward uses, frozen until its backward
        out = snapshot(x)
        for mine, theirs in zip(live.buffers(), snapshot.buffers(), strict=True):
            mine.copy_(theirs)  # BatchNorm running statistics belong to the live module
        return (snapshot, x, out), out.detach()

    def _backward(self, k: int, entry: tuple, grad: torch.Tensor, tick: int, batch: int,
                  n_batches: int) -> torch.Tensor | None:
        snapshot, x, out = entry
        if snapshot is None:  # replay the forward with the current weights, statistics untouched
            snapshot = copy.deepcopy(self.modules[k])
            out = snapshot(x)
        scale = self.beta / self.M
        out.backward(grad * scale if scale != 1.0 else grad)
        for live, used in zip(self.modules[k].parameters(), snapshot.parameters(), strict=True):
            live.grad = used.grad if live.grad is None else live.grad + used.grad
        self._maybe_step(k, tick, batch, n_batches)
        return x.grad if k > 0 else None

    def _loss_backward(self, k: int, x: torch.Tensor, y: torch.Tensor, tick: int, batch: int,
                       n_batches: int, sends_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last module (or a DGL module): loss, back-propagation at once, step."""
        live = self.modules[k]
        live.train()
        x = x.detach().requires_grad_(sends_grad and k > 0)
        out = live(x)
        logits = out if k == self.K - 1 else self.aux_heads[k](out)
        value = loss.cross_entropy(logits, y)
        (value / self.M if self.M > 1 else value).backward()
        self._maybe_step(k, tick, batch, n_batches)
        return out.detach(), x.grad

    def _maybe_step(self, k: int, tick: int, batch: int, n_batches: int) -> None:
        self.backwards[k] += 1
        if self.backwards[k] % self.M == 0 or batch == n_batches - 1:
            if self.grad_sync is not None:
                self.grad_sync(k, [p.grad for g in self.optimizers[k].param_groups for p in g["params"]
                                   if p.grad is not None])
            self.optimizers[k].step()
            self.optimizers[k].zero_grad(set_to_none=True)
            if self.schedules is not None:
                self.schedules[k].advance(self.backwards[k])
            self.step_log.append((k, tick, batch))
            self.backwards[k] = 0

    # ------------------------------------------------------------------ epochs
    def epoch(self, batches: Sequence[Batch]) -> None:
        if self.method in ("fdg", "adl", "dgl"):
            self._decoupled_epoch(batches)
        elif self.method in ("ddg", "fr"):
            self._locked_epoch(batches)
        else:
            raise ValueError(f"no simulation for method {self.method!r}")

    def _decoupled_epoch(self, batches: Sequence[Batch]) -> None:
        """FDG: module k forwards batch t-k and back-propagates batch t-2(K-1)+k at tick t."""
        K, N = self.K, len(batches)
        acts: dict[tuple[int, int], Batch] = {}
        grads: dict[tuple[int, int], torch.Tensor] = {}
        stash: list[dict[int, tuple]] = [{} for _ in range(K)]
        local = self.method == "dgl"
        for t in range(N + 2 * (K - 1)):
            new_acts: dict[tuple[int, int], Batch] = {}
            new_grads: dict[tuple[int, int], torch.Tensor] = {}
            for k in range(K):
                g = t - 2 * (K - 1) + k
                if not local and k < K - 1 and 0 <= g < N:
                    grad_in = self._backward(k, stash[k].pop(g), grads.pop((k, g)), t, g, N)
                    if grad_in is not None:
                        new_grads[(k - 1, g)] = grad_in
                f = t - k
                if 0 <= f < N:
                    x, y = batches[f] if k == 0 else acts.pop((k, f))
                    if local or k == K - 1:
                        out, grad_in = self._loss_backward(k, x, y, t, f, N, sends_grad=not local)
                        if grad_in is not None:
                            new_grads[(k - 1, f)] = grad_in
                    else:
                        stash[k][f], out = self._forward_stashed(k, x)
                    if k < K - 1:
                        new_acts[(k + 1, f)] = (out, y)
            acts.update(new_acts)
            grads.update(new_grads)
        assert not acts and not grads and not any(stash), "the epoch did not drain"

    def _locked_epoch(self, batches: Sequence[Batch]) -> None:
        """DDG/FR: batch t goes through all modules at tick t; module k back-propagates batch t-(K-1-k)."""
        K, N = self.K, len(batches)
        grads: dict[tuple[int, int], torch.Tensor] = {}
        stash: list[dict[int, tuple]] = [{} for _ in range(K)]
        for t in range(N + K - 1):
            new_grads: dict[tuple[int, int], torch.Tensor] = {}
            for k in range(K - 1):
                g = t - (K - 1 - k)
                if 0 <= g < N:
                    grad_in = self._backward(k, stash[k].pop(g), grads.pop((k, g)), t, g, N)
                    if grad_in is not None:
                        new_grads[(k - 1, g)] = grad_in
            if t < N:
                x, y = batches[t]
                for k in range(K):
                    if k == K - 1:
                        _, grad_in = self._loss_backward(k, x, y, t, t, N, sends_grad=True)
                        if grad_in is not None:
                            new_grads[(k - 1, t)] = grad_in
                    else:
                        stash[k][t], x = self._forward_stashed(k, x)
            grads.update(new_grads)
        assert not grads and not any(stash), "the epoch did not drain"
