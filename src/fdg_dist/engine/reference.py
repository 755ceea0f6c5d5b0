"""A single-process simulation of every pipelined method: the tests' oracle.

Written to be obviously correct rather than fast, and independent of ``schedule``/``stage``: the
tick formulas are spelled out from SPEC §1 again, weight stashing is a ``deepcopy`` of the module
taken at forward time, and messages are dictionary entries that become visible at the next tick.

Staleness correctors (``corrector``: predict, lookahead, predict_adam, lr_by_delay, dc) and the
optimizer-side delay treatments (spike compensation, delay-scaled momentum, per-module clipping) are
spelled out again here from their papers' formulas, each at the point of the simulation where it acts; a
synchronous warm-up trains its batches by plain back-propagation through the chain of modules before the
method's schedule takes the rest.  ``probe_every`` records the staleness of the gradients applied,
including the *full* fresh gradient of the same batch through every module's current weights, which no
single rank of a pipeline has.

Must not import ``schedule``, ``stage``, ``executor`` or ``correctors``: an oracle that shared their code
would share their bugs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fdg_dist.engine import loss
from fdg_dist.engine.optim import LRSchedule

Batch = tuple[torch.Tensor, torch.Tensor]


class Simulation:
    """K modules with their optimizers (and DGL heads), trained epoch by epoch like the pipeline."""

    def __init__(self, modules: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer], *,
                 method: str = "fdg", beta: float = 1.0, stash: str = "weights", accum_steps: int = 1,
                 aux_heads: Sequence[nn.Module | None] | None = None,
                 grad_sync: Callable[[int, list[torch.Tensor]], None] | None = None,
                 corrector: str = "none", dc_lambda: float = 2.0, dc_momentum: float = 0.95,
                 anneal_steps: int = 500, probe_every: int = 0,
                 schedules: Sequence[LRSchedule] | None = None, anneal_fraction: float | None = None,
                 run_batches: int = 0, spike_compensation: bool = False, delay_momentum_max: float | None = None,
                 clip_norm: float | None = None, sync_warmup: int = 0) -> None:
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
        self.corrector = corrector
        self.dc_lambda, self.dc_momentum, self.anneal_steps = dc_lambda, dc_momentum, anneal_steps
        # lr_by_delay counts from the warm-up's switch; PipeMare's T_w: a fraction of the steps from there on
        self.anneal_from = math.ceil(min(sync_warmup, run_batches or sync_warmup) / accum_steps)
        if anneal_fraction is not None:
            self.anneal_steps = max(1, round(anneal_fraction * math.ceil(
                (run_batches - min(sync_warmup, run_batches)) / accum_steps)))
        self.spike = spike_compensation
        self.clip_norm = clip_norm
        self.sync_warmup = sync_warmup  # the run's first batches, by back-propagation
        self.batches_done = 0
        # delay-scaled momentum: the optimizer's momentum m at module 0's largest delay grows to delay_momentum_max
        self.momenta = [None] * self.K
        if delay_momentum_max is not None:
            for k, opt in enumerate(self.optimizers):
                m = opt.param_groups[0]["momentum"]
                d0 = self.delay(0)
                self.momenta[k] = m + self.delay(k) * (delay_momentum_max - m) / d0 if d0 > 0 else m
        self.steps = [0] * self.K  # optimizer steps taken by each module
        self.probe_every = probe_every
        self.probes: list[dict] = []  # one per probed stale gradient (see _probe)

    def delay(self, k: int) -> int:
        """Module k's optimizer steps between a forward and the step applying its gradient: the gradient is
        back 2(K-1-k) ticks later (DDG/FR: K-1-k) and the step at a tick comes before its forward."""
        hops = self.K - 1 - k
        ticks = 2 * hops if self.method in ("fdg", "adl") else hops
        return -(-max(ticks - 1, 0) // self.M)  # ADL: the oldest gradient of a step

    # ------------------------------------------------------------------ pieces
    def _forward_stashed(self, k: int, x: torch.Tensor) -> tuple:
        """Module k's forward whose gradient comes later: keep (weights, input, output)."""
        live = self.modules[k]
        live.train()
        x = x.detach().requires_grad_(k > 0)
        if self.stash_mode == "recompute":
            with torch.no_grad():
                out = live(x)
            return (None, x, None, self.steps[k]), out.detach()
        snapshot = copy.deepcopy(live)  # the weights this forward uses, frozen until its backward
        tau = self.delay(k)
        if self.corrector == "predict_adam" and tau > 0:  # tau more steps along Adam's update
            opt = self.optimizers[k]
            for group in opt.param_groups:
                (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
                decay = group["weight_decay"] if isinstance(opt, torch.optim.AdamW) else 0.0
                for used, p in zip(snapshot.parameters(), live.parameters(), strict=True):
                    st = opt.state.get(p, {})
                    if any(p is q for q in group["params"]) and "exp_avg" in st:
                        n = st["step"].item()
                        m_hat, v_hat = st["exp_avg"] / (1 - b1 ** n), st["exp_avg_sq"] / (1 - b2 ** n)
                        with torch.no_grad():
                            used.add_(m_hat / (v_hat.sqrt() + eps), alpha=-tau * lr)
                            if decay:
                                used.add_(p, alpha=-tau * lr * decay)
        if self.corrector in ("predict", "lookahead") and tau > 0:  # weights where momentum will carry them
            opt = self.optimizers[k]
            for group in opt.param_groups:
                mu = group["momentum"]
                c = float(tau) if self.corrector == "predict" else sum(mu ** i for i in range(1, tau + 1))
                for used, p in zip(snapshot.parameters(), live.parameters(), strict=True):
                    v = opt.state.get(p, {}).get("momentum_buffer")
                    if any(p is q for q in group["params"]) and v is not None:
                        with torch.no_grad():
                            used.add_(v, alpha=-c * group["lr"])
        out = snapshot(x)
        for mine, theirs in zip(live.buffers(), snapshot.buffers(), strict=True):
            mine.copy_(theirs)  # BatchNorm running statistics belong to the live module
        return (snapshot, x, out, self.steps[k]), out.detach()

    def _backward(self, k: int, entry: tuple, grad: torch.Tensor, tick: int, batch: int,
                  n_batches: int, data: Batch) -> torch.Tensor | None:
        snapshot, x, out, forward_steps = entry
        if snapshot is None:  # replay the forward with the current weights, statistics untouched
            snapshot = copy.deepcopy(self.modules[k])
            out = snapshot(x)
        elif self.stash_mode == "mixed":  # PyTorch 1.0: the optimizer had updated the graph's weights in place
            for used, live in zip(snapshot.parameters(), self.modules[k].parameters(), strict=True):
                used.data.copy_(live.data)
        scale = self.beta  # the 1/M of ADL's mean came with grad, from the last module's loss
        out.backward(grad * scale if scale != 1.0 else grad)
        applied = []
        for live, used in zip(self.modules[k].parameters(), snapshot.parameters(), strict=True):
            g = used.grad
            if self.corrector == "dc" and self.delay(k) > 0:  # DC-ASGD-a: g + λ/√ms · g·g·(w_now − w_then)
                state = self.optimizers[k].state[live]
                ms = state.setdefault("dc_mean_square", torch.zeros_like(g))
                ms.mul_(self.dc_momentum).addcmul_(g, g, value=1 - self.dc_momentum)
                g = g + g * g * (live.detach() - used.detach()) * (self.dc_lambda / (ms + 1e-7).sqrt())
            applied.append(g)
            live.grad = g if live.grad is None else live.grad + g
        if self.probe_every and self.steps[k] % self.probe_every == 0 and self.backwards[k] == 0:
            self._probe(k, x, grad * scale, data, applied, snapshot, self.steps[k] - forward_steps)
        self._maybe_step(k, tick, batch, n_batches)
        return x.grad if k > 0 else None

    def _probe(self, k: int, x: torch.Tensor, grad: torch.Tensor, data: Batch, applied: list[torch.Tensor],
               used: nn.Module, delay: int) -> None:
        """Record how the gradient module k applies differs from fresh ones of the same batch: the local one
        (the same incoming gradient through module k's current weights) and the full one (the whole
        network's current weights, scaled like the pipeline's by β per hop and 1/M)."""
        local, chain = copy.deepcopy(self.modules[k]), [copy.deepcopy(m) for m in self.modules]
        for m in (local, *chain):  # copies: BatchNorm statistics stay untouched; gradients start empty
            for p in m.parameters():
                p.grad = None
        local(x.detach()).backward(grad)
        h, y = data
        for m in chain:
            h = m(h)
        loss.cross_entropy(h, y).backward()
        shrink = self.beta ** (self.K - 1 - k) / self.M
        full = [p.grad * shrink for p in chain[k].parameters()]

        def compare(fresh: list[torch.Tensor]) -> tuple[float, float]:
            a, f = torch.cat([g.flatten() for g in applied]), torch.cat([g.flatten() for g in fresh])
            return float(a @ f / (a.norm() * f.norm())), float(a.norm() / f.norm())

        now = torch.cat([p.detach().flatten() for p in self.modules[k].parameters()])
        then = torch.cat([p.detach().flatten() for p in used.parameters()])
        local_cos, local_ratio = compare([p.grad for p in local.parameters()])
        full_cos, full_ratio = compare(full)
        self.probes.append({"module": k, "step": self.steps[k], "delay_steps": delay,
                            "weight_distance": float((then - now).norm() / now.norm()),
                            "local_cosine": local_cos, "local_norm_ratio": local_ratio,
                            "full_cosine": full_cos, "full_norm_ratio": full_ratio})

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

    def _maybe_step(self, k: int, tick: int, batch: int, n_batches: int, *, delayed: bool = True) -> None:
        self.backwards[k] += 1
        if self.backwards[k] % self.M == 0 or batch == n_batches - 1:
            opt = self.optimizers[k]
            if self.grad_sync is not None:
                self.grad_sync(k, [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None])
            if self.clip_norm is not None:  # this module's own norm, as torch clips a whole model's
                head = self.aux_heads[k]
                params = [*self.modules[k].parameters(), *(head.parameters() if head is not None else ())]
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.clip_norm)
            kept = [(g["lr"], g.get("momentum")) for g in opt.param_groups]
            if self.corrector == "lr_by_delay" and delayed:  # PipeMare: LR / (τ+1), annealed back over anneal_steps
                s = max(self.steps[k] - self.anneal_from, 0)
                factor = (self.delay(k) + 1) ** -(1.0 - min(s / self.anneal_steps, 1.0))
                for g in opt.param_groups:
                    g["lr"] = g["lr"] * factor
            if self.momenta[k] is not None and delayed:
                for g in opt.param_groups:
                    g["momentum"] = self.momenta[k]
            if self.spike and delayed and self.delay(k) > 0:
                self._spike_compensated_step(opt, self.delay(k))
            else:
                opt.step()
            for g, (lr, momentum) in zip(opt.param_groups, kept, strict=True):
                g["lr"] = lr
                if momentum is not None:
                    g["momentum"] = momentum
            opt.zero_grad(set_to_none=True)
            self.steps[k] += 1
            if self.schedules is not None:
                self.schedules[k].advance(self.backwards[k])
            self.step_log.append((k, tick, batch))
            self.backwards[k] = 0

    @staticmethod
    @torch.no_grad()
    def _spike_compensated_step(opt: torch.optim.Optimizer, d: int) -> None:
        """Kosson et al.: v = m·v + g, w = w − lr·(m^d·v + (1 + m + … + m^(d−1))·g), g with weight decay."""
        for group in opt.param_groups:
            m = group["momentum"]
            a, b = m ** d, (1 - m ** d) / (1 - m)
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                st = opt.state[p]
                if st.get("momentum_buffer") is None:
                    st["momentum_buffer"] = g.clone()
                else:
                    st["momentum_buffer"].mul_(m).add_(g)
                p.add_(st["momentum_buffer"], alpha=-group["lr"] * a)
                p.add_(g, alpha=-group["lr"] * b)

    # ------------------------------------------------------------------ epochs
    def epoch(self, batches: Sequence[Batch]) -> None:
        """One epoch: its batches of the synchronous warm-up by back-propagation, the rest by the method."""
        sync = min(max(self.sync_warmup - self.batches_done, 0), len(batches))
        self.batches_done += len(batches)
        if sync:
            self._back_propagation(batches[:sync])
        batches = batches[sync:]
        if not batches:
            return
        if self.method in ("fdg", "adl", "dgl"):
            self._decoupled_epoch(batches)
        elif self.method in ("ddg", "fr"):
            self._locked_epoch(batches)
        else:
            raise ValueError(f"no simulation for method {self.method!r}")

    def _back_propagation(self, batches: Sequence[Batch]) -> None:
        """Plain back-propagation through the chain of modules, every module stepping after every batch (every
        M-th with accumulation, and after the last): nothing is delayed, no β, no corrector."""
        for b, (x, y) in enumerate(batches):
            for m in self.modules:
                m.train()
                x = m(x)
            value = loss.cross_entropy(x, y)
            (value / self.M if self.M > 1 else value).backward()
            for k in range(self.K):
                self._maybe_step(k, b, b, len(batches), delayed=False)

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
                    grad_in = self._backward(k, stash[k].pop(g), grads.pop((k, g)), t, g, N, batches[g])
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
                    grad_in = self._backward(k, stash[k].pop(g), grads.pop((k, g)), t, g, N, batches[g])
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
