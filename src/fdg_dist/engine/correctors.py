"""Staleness correctors: small changes beside one module's optimizer step that counter its gradient delay.

Module k of a decoupled pipeline applies the gradient of a forward it ran τ of its own optimizer steps
earlier (``weight_delay``), computed on weights that have moved since.  The asynchronous-pipeline
literature has fixes FDG's authors did not use; each corrector here knows only its own module's delay
and optimizer state (no extra communication), is deterministic, and is reproduced independently by
``reference.Simulation``:

``none``
    the paper's exact algorithm.
``predict``
    weight prediction (SpecTrain, PipeOptim; PipeMare's discrepancy correction): the forward, and so
    the stashed backward, run on ŵ = w − τ·lr·v, the weights the gradient will be applied to if they
    keep moving with SGD's momentum buffer v (the last update was −lr·v).
``lookahead``
    Nesterov's look-ahead stretched over the delay (in the spirit of Ajanthan et al., ICML 2025):
    ŵ = w − lr·(μ + μ² + … + μ^τ)·v, where momentum alone would carry the weights in τ steps (τ = 1 is
    NAG's look-ahead point).
``lr_by_delay``
    PipeMare's learning-rate rescheduling: the module's LR × (τ+1)^−(1 − min(s/S, 1)) at its step s,
    back to the schedule's LR after S = ``corrector.anneal_steps`` steps, or a fraction of the run's
    (``corrector.anneal_fraction``, PipeMare's T_w): one setting for every budget.  After a synchronous
    warm-up of W batches, s and the run count from the switch (s = steps − ⌈W/M⌉, M = ``accum_steps``).
``predict_adam``
    weight prediction along Adam's update for Adam/AdamW modules (language models): ŵ = w − τ·lr·(m̂/(√v̂ + ε)
    + λ·w), the weights τ more steps of the current update direction reach (m̂, v̂: the bias-corrected moments
    of the last step; λ: AdamW's decoupled weight decay, 0 for Adam, whose decay is in the moments).
``dc``
    DC-ASGD-a's delay compensation: g + λ/√(ms + ε) ⊙ g ⊙ g ⊙ (w_live − w_stashed), the first-order
    Taylor term of the gradient's change with the Hessian approximated by g ⊙ g, where ms is the
    gradient's running mean square (kept in the optimizer's state, so checkpoints carry it).

Must not communicate, read files or know the schedule: each corrector sees only its own module's delay,
weights and optimizer state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from fdg_dist.config import CorrectorConfig

DC_EPS = 1e-7


def weight_delay(method: str, k: int, K: int, accum_steps: int = 1) -> int:
    """τ: optimizer steps module k takes between a forward and the step that applies its gradient.

    The gradient comes back 2(K−1−k) ticks later (FDG, ADL) or K−1−k (DDG, FR); within a tick the step
    precedes the forward, so the forward's weights are one step younger than the tick count.  ADL steps
    once per ``accum_steps`` backwards: τ is that of the step's oldest gradient (the steady state's
    ceiling).  The last module's delay is 0.
    """
    ticks = {"fdg": 2, "adl": 2, "ddg": 1, "fr": 1}.get(method, 0) * (K - 1 - k)
    return -(-max(ticks - 1, 0) // accum_steps)


def lookahead_coefficient(momentum: float, delay: int) -> float:
    """μ + μ² + … + μ^τ: how many steps' worth of the velocity momentum alone travels in τ steps."""
    return sum(momentum ** i for i in range(1, delay + 1))


def anneal_steps(fraction: float, batches: int, accum_steps: int = 1) -> int:
    """S for ``corrector.anneal_fraction``: that fraction of the module's delayed steps over the run (its batches
    after the warm-up ÷ ``accum_steps``, rounded up), at least 1."""
    return max(1, round(fraction * -(-batches // accum_steps)))


def lr_by_delay_factor(delay: int, step: int, anneal_steps: int) -> float:
    """PipeMare's per-module LR factor (τ+1)^−(1 − min(s/S, 1)): 1/(τ+1) at the start, 1 from step S on."""
    return (delay + 1) ** -(1.0 - min(step / anneal_steps, 1.0))


class Corrector:
    """``corrector=none``, and the interface the stage calls: every hook does nothing."""

    def __init__(self, delay: int = 0) -> None:
        self.delay = delay

    def shift(self, snapshot: Sequence[torch.Tensor], live: Sequence[torch.Tensor],
              optimizer: torch.optim.Optimizer) -> None:
        """Move a stashed forward's weight snapshot (in place, before it requires grad)."""

    def correct(self, grads: list[torch.Tensor | None], stashed: Sequence[torch.Tensor],
                live: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer) -> list[torch.Tensor | None]:
        """The gradient to accumulate, from the one back-propagated through the stashed weights."""
        return grads

    @contextmanager
    def step_lr(self, optimizer: torch.optim.Optimizer, step: int) -> Iterator[None]:
        """Around the optimizer step: the LR it applies with."""
        yield


class _Extrapolate(Corrector):
    """ŵ = w − c·lr·v with v SGD's momentum buffer (no buffer yet: ŵ = w)."""

    def coefficient(self, momentum: float) -> float:
        raise NotImplementedError

    def shift(self, snapshot: Sequence[torch.Tensor], live: Sequence[torch.Tensor],
              optimizer: torch.optim.Optimizer) -> None:
        if self.delay == 0:
            return
        for group in optimizer.param_groups:
            alpha = -self.coefficient(group["momentum"]) * group["lr"]
            mine = {id(p) for p in group["params"]}
            pairs = [(s, optimizer.state[p]["momentum_buffer"]) for s, p in zip(snapshot, live, strict=True)
                     if id(p) in mine and optimizer.state.get(p, {}).get("momentum_buffer") is not None]
            if pairs:
                torch._foreach_add_([s for s, _ in pairs], [v for _, v in pairs], alpha=alpha)


class Predict(_Extrapolate):
    def coefficient(self, momentum: float) -> float:
        return float(self.delay)


class LookAhead(_Extrapolate):
    def coefficient(self, momentum: float) -> float:
        return lookahead_coefficient(momentum, self.delay)


class PredictAdam(Corrector):
    """ŵ = w − τ·lr·(m̂/(√v̂ + ε) + λ·w) with Adam's moments (no moments yet: ŵ = w)."""

    def __init__(self, delay: int, decoupled: bool) -> None:
        super().__init__(delay)
        self.decoupled = decoupled  # AdamW: the decay is a separate term of the update

    def shift(self, snapshot: Sequence[torch.Tensor], live: Sequence[torch.Tensor],
              optimizer: torch.optim.Optimizer) -> None:
        if self.delay == 0:
            return
        for group in optimizer.param_groups:
            (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
            decay = group["weight_decay"] if self.decoupled else 0.0
            mine = {id(p) for p in group["params"]}
            for s, p in zip(snapshot, live, strict=True):
                state = optimizer.state.get(p, {})
                if id(p) not in mine or "exp_avg" not in state:
                    continue
                step = float(state["step"])  # a host tensor unless the optimizer is capturable or fused
                mean = state["exp_avg"] / (1 - beta1 ** step)
                s.add_(mean / ((state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt() + eps), alpha=-self.delay * lr)
                if decay:
                    s.add_(p.detach(), alpha=-self.delay * lr * decay)


class LrByDelay(Corrector):
    def __init__(self, delay: int, anneal_steps: int, offset: int = 0) -> None:
        super().__init__(delay)
        self.anneal_steps = anneal_steps
        self.offset = offset  # the warm-up's steps: annealing starts at the switch

    @contextmanager
    def step_lr(self, optimizer: torch.optim.Optimizer, step: int) -> Iterator[None]:
        factor = lr_by_delay_factor(self.delay, max(step - self.offset, 0), self.anneal_steps)
        kept = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * factor
        try:
            yield
        finally:  # restored, not divided back: the schedule's LR stays bit-exact
            for g, lr in zip(optimizer.param_groups, kept, strict=True):
                g["lr"] = lr


class DelayCompensation(Corrector):
    def __init__(self, delay: int, lam: float, momentum: float) -> None:
        super().__init__(delay)
        self.lam, self.momentum = lam, momentum

    def correct(self, grads: list[torch.Tensor | None], stashed: Sequence[torch.Tensor],
                live: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer) -> list[torch.Tensor | None]:
        if self.delay == 0:
            return grads
        out: list[torch.Tensor | None] = []
        for g, old, p in zip(grads, stashed, live, strict=True):
            if g is None:
                out.append(None)
                continue
            state = optimizer.state[p]
            ms = state.get("dc_mean_square")
            if ms is None:
                ms = state["dc_mean_square"] = torch.zeros_like(g)
            ms.mul_(self.momentum).addcmul_(g, g, value=1 - self.momentum)
            out.append(compensate(g, ms, p.detach(), old.detach(), self.lam))
        return out


def compensate(g: torch.Tensor, ms: torch.Tensor, now: torch.Tensor, then: torch.Tensor, lam: float) -> torch.Tensor:
    """DC-ASGD-a's corrected gradient g + λ/√(ms+ε) ⊙ g ⊙ g ⊙ (now − then)."""
    return g + g * g * (now - then) * (lam / (ms + DC_EPS).sqrt())


def build(cfg: CorrectorConfig, delay: int, *, optimizer: str = "sgd", batches: int = 0,
          accum_steps: int = 1, warmup: int = 0) -> Corrector:
    """Module's corrector for ``corrector.name`` (validated by ``validation.validate``); ``optimizer`` is
    ``optim.name``, ``batches`` the run's training batches and ``warmup`` its synchronous ones (for
    lr_by_delay's annealing)."""
    if cfg.name == "predict":
        return Predict(delay)
    if cfg.name == "lookahead":
        return LookAhead(delay)
    if cfg.name == "predict_adam":
        return PredictAdam(delay, decoupled=optimizer == "adamw")
    if cfg.name == "lr_by_delay":
        warmup = min(warmup, batches) if batches else warmup
        steps = cfg.anneal_steps if cfg.anneal_fraction is None else anneal_steps(cfg.anneal_fraction,
                                                                                    batches - warmup, accum_steps)
        return LrByDelay(delay, steps, offset=-(-warmup // accum_steps))
    if cfg.name == "dc":
        return DelayCompensation(delay, cfg.dc_lambda, cfg.dc_momentum)
    return Corrector(delay)
