"""Each module's own optimizer and LR schedule (identical settings on every module).

Schedules are epoch-wise (``multistep``, ``cosine``, ``constant``: the LR changes between epochs, after the
drain) or per batch (``step_cosine``: linear warm-up, then cosine, moved on after every optimizer step by
the number of batches that step applied).  Counting batches rather than optimizer steps gives every method
the same LR for the same batch, ``adl`` included (it steps once per ``accum_steps`` batches).

Must not know the schedule, the other modules or process groups: each module builds and steps its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from fdg_dist.config import OptimConfig, SchedConfig

PER_BATCH = ("step_cosine",)


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        sgd = SpikeCompensatedSGD if cfg.spike_compensation else torch.optim.SGD
        return sgd(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(_decay_groups(params, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                 eps=cfg.eps)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}; valid: sgd, adam, adamw")


def _decay_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's usual split: weight decay on matrices, kernels and embeddings (≥ 2 dimensions), none on
    biases and normalisation gains.  A rule per parameter, so K modules decay what the unsplit model does."""
    params = list(params)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def delay_momentum(momentum: float, momentum_max: float, delay: int, max_delay: int) -> float:
    """Ajanthan et al.'s delay-scaled momentum: m + (d_k / d_max)·(m_max − m), proportional to the module's delay,
    ``momentum_max`` at the most delayed module (their d_k/K, with FDG's delays 2(K−1−k)−1, which exceed K from
    K = 4 on, normalised by the largest); ``momentum`` where nothing is delayed.  ``momentum_max`` below
    ``momentum`` takes momentum away with the delay instead (asynchrony itself acts as momentum: Mitliagkas et
    al., 2016)."""
    return momentum + delay / max_delay * (momentum_max - momentum) if max_delay > 0 else momentum


def spike_coefficients(momentum: float, delay: int) -> tuple[float, float]:
    """Kosson et al.'s spike compensation for a gradient ``delay`` steps late: (a, b) = (m^d, (1 − m^d)/(1 − m)) in
    w ← w − lr·(a·v + b·g).  b·g is what undelayed momentum SGD would already have applied of g by now, a·v carries
    the rest at the undelayed decay: a gradient's total effect stays lr·g/(1 − m).  (1, 0) is plain momentum."""
    a = momentum ** delay
    return a, (1 - a) / (1 - momentum)


class SpikeCompensatedSGD(torch.optim.SGD):
    """torch's SGD (weight decay added to the gradient, dampening 0, state ``momentum_buffer``) whose step can
    apply lr·(a·v + b·g) instead of lr·v: ``step(spike=(a, b))``; a plain ``step()`` is torch's."""

    @torch.no_grad()
    def step(self, closure: Any = None, *, spike: tuple[float, float] | None = None) -> Any:
        if spike is None:
            return super().step(closure)
        a, b = spike
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if decay == 0 else p.grad.add(p, alpha=decay)
                state = self.state[p]
                v = state.get("momentum_buffer")
                if v is None:
                    v = state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    v.mul_(momentum).add_(g)
                p.add_(v, alpha=-lr * a)
                p.add_(g, alpha=-lr * b)
        return None


def clip_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale ``grads`` (whose joint norm is ``norm``) down to ``max_norm`` if above it, as
    ``torch.nn.utils.clip_grad_norm_`` does, on the device (no host sync)."""
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))


class DelayedUpdate:
    """How one module's optimizer applies a gradient ``delay`` of its steps stale: with the delay-scaled momentum
    (``optim.delay_momentum_max``) and/or spike compensation (``optim.spike_compensation``); a plain step when
    neither is set, when nothing is delayed, and for the steps of the synchronous warm-up.  The momentum is set
    around each step and restored, so the optimizer's state and checkpoints hold ``optim.momentum``."""

    def __init__(self, cfg: OptimConfig, delay: int, max_delay: int) -> None:
        self.momentum = (delay_momentum(cfg.momentum, cfg.delay_momentum_max, delay, max_delay)
                         if cfg.delay_momentum_max is not None else None)
        self.spike = (spike_coefficients(cfg.momentum if self.momentum is None else self.momentum, delay)
                      if cfg.spike_compensation and delay > 0 else None)

    def step(self, optimizer: torch.optim.Optimizer, *, delayed: bool = True) -> None:
        if not delayed or (self.momentum is None and self.spike is None):
            optimizer.step()
            return
        kept = [g.get("momentum") for g in optimizer.param_groups]
        if self.momentum is not None:
            for g in optimizer.param_groups:
                g["momentum"] = self.momentum
        try:
            if self.spike is not None:
                optimizer.step(spike=self.spike)
            else:
                optimizer.step()
        finally:
            for g, m in zip(optimizer.param_groups, kept, strict=True):
                g["momentum"] = m


def lr_factor(cfg: SchedConfig, epoch: int, epochs: int) -> float:
    """Multiplier of the base LR during ``epoch`` (0-based): linear warm-up, then the schedule."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    if cfg.name == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        span = max(epochs - cfg.warmup_epochs, 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
    return 1.0


def step_factor(cfg: SchedConfig, batch: int, total: int) -> float:
    """Multiplier of the base LR for a step whose first batch is the run's ``batch``-th (0-based) of ``total``:
    linear warm-up over ``warmup_steps`` batches, then a cosine from 1 down to ``min_lr_ratio`` at ``total``."""
    if batch < cfg.warmup_steps:
        return (batch + 1) / (cfg.warmup_steps + 1)
    progress = min((batch - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LRSchedule:
    """A module's LR schedule: ``step()`` at every epoch end (where epoch-wise schedules move), ``advance(n)``
    after every optimizer step that applied n batches (where per-batch schedules move)."""

    def __init__(self, cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: int,
                 total_batches: int | None = None) -> None:
        self.per_batch = cfg.name in PER_BATCH
        if self.per_batch:
            if total_batches is None:
                raise ValueError(f"sched.name={cfg.name} is per batch and needs the run's number of batches")
            factor = lambda i: step_factor(cfg, i, total_batches)  # noqa: E731
        else:
            factor = lambda e: lr_factor(cfg, e, epochs)  # noqa: E731
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def step(self) -> None:
        """An epoch ended (after its drain): epoch-wise schedules take their next value."""
        if not self.per_batch:
            self.scheduler.step()

    def advance(self, batches: int) -> None:
        """An optimizer step applied ``batches`` batches: per-batch schedules move on by as many."""
        if self.per_batch:
            for _ in range(batches):
                self.scheduler.step()

    @property
    def last_epoch(self) -> int:
        """Where the schedule stands: epochs ended (epoch-wise) or batches applied (per batch)."""
        return self.scheduler.last_epoch

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)


def build_scheduler(cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: int,
                    total_batches: int | None = None) -> LRSchedule:
    """``total_batches`` (the run's training batches: epochs × batches per epoch, capped by
    ``trainer.max_steps``) sizes per-batch schedules; epoch-wise ones ignore it."""
    return LRSchedule(cfg, optimizer, epochs, total_batches)
