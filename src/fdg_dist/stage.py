"""One pipeline module: its blocks, optimizer, LR schedule and the stash of in-flight forwards.

The stage knows nothing of ticks or neighbours: the executor tells it to forward, back-propagate or
step a given batch.  Weight stashing is real: a stashed forward runs through ``functional_call`` on a
*snapshot* of the parameters, so its autograd graph never touches the live parameters the optimizer
updates in place (naive "keep the graph, step, backward later" fails PyTorch's version check,
pytorch #37573, and on old PyTorch silently mixed weights).  The delayed backward therefore uses
exactly the weights the forward used; its gradient is then applied to the live weights.

``recompute`` keeps only the input and re-runs the forward with the *current* weights at backward
time (features replay): one forward more, one weight copy less.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fdg_dist import models
from fdg_dist.finite import FiniteWatch


@dataclass
class _Stashed:
    x: torch.Tensor  # module input (requires grad when it came from another module)
    out: torch.Tensor | None  # module output with its graph (weights mode)
    params: dict[str, torch.Tensor] | None  # weights the forward used (weights mode)


@dataclass
class StepInfo:
    """Device tensors about one optimizer step, read on the host only when logging."""

    grad_norm: torch.Tensor
    update_ratio: torch.Tensor | None


@dataclass
class BatchStats:
    """Summed loss and error count of one batch, kept on the device until logging asks."""

    loss_sum: torch.Tensor
    errors: torch.Tensor
    samples: int


class Stage:
    """Module ``index`` of ``num_stages``: forward, backward and step on request.

    ``head`` is the loss head of this stage: the network's classifier is inside the last module's
    blocks, so ``head`` is ``None`` there and the output is the logits; for DGL every other module
    gets an auxiliary classifier trained on a local loss.
    """

    def __init__(self, module: nn.Module, index: int, num_stages: int, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, *, beta: float = 1.0,
                 stash: str = "weights", accum_steps: int = 1, aux_head: nn.Module | None = None,
                 sends_grad: bool = True, precision: str = "fp32", device: torch.device | str = "cpu",
                 grad_sync: Callable[[list[torch.Tensor]], None] | None = None,
                 nan_policy: str = "stop",
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.module = module
        self.index = index
        self.num_stages = num_stages
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.beta = beta
        self.stash_mode = stash
        self.accum_steps = accum_steps
        self.aux_head = aux_head
        self.device = torch.device(device)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else nullcontext())
        self.nan_policy = nan_policy  # stop (read a step late) | skip_step (read at once) | off
        self.finite = FiniteWatch(self.device, enabled=nan_policy == "stop")
        self.memory_format = memory_format  # of 4-D inputs; the module's weights are converted by the caller
        self.grad_sync = grad_sync  # replicas: average gradients over module k of every replica
        self.is_last = index == num_stages - 1
        self.sends_grad = sends_grad and index > 0  # False for module 0 and for DGL
        self.stash: dict[int, _Stashed] = {}
        self.max_stash = 0
        self.steps = 0
        self.pending_backwards = 0  # backwards accumulated into .grad since the last step
        self.loss_fn = nn.CrossEntropyLoss()

    # ------------------------------------------------------------------ forward
    def forward(self, batch: int, x: torch.Tensor, labels: torch.Tensor, *, train: bool,
                keep_for_backward: bool) -> tuple[torch.Tensor, BatchStats | None, torch.Tensor | None]:
        """Run the module on batch ``batch``: (detached output to send, loss stats, input gradient).

        With a loss here (last module, or a DGL auxiliary head) the loss is back-propagated at once
        into this module's parameters and, if a gradient goes upstream, into the input.
        ``keep_for_backward`` stashes the forward for a later gradient from the next module.
        """
        self.module.train(train)
        x = models.to_layout(x, self.memory_format)  # received activations arrive contiguous (NCHW); data too
        if not train:
            with torch.no_grad(), self.autocast:
                out = self.module(x)
                stats = self._stats(out, labels) if self.is_last else None
            return out, stats, None
        if keep_for_backward:
            x = x.detach().requires_grad_(self.sends_grad)
            if self.stash_mode == "weights":
                params = self._snapshot()
                with self.autocast:
                    out = functional_call(self.module, params, (x,))
                self.stash[batch] = _Stashed(x, out, params)
            else:
                with torch.no_grad(), self.autocast:
                    out = self.module(x)
                self.stash[batch] = _Stashed(x, None, None)
            self.max_stash = max(self.max_stash, len(self.stash))
            return out.detach(), None, None
        x = x.detach().requires_grad_(self.sends_grad)
        with self.autocast:
            out = self.module(x)
            logits = out if self.is_last else self.aux_head(out)
            loss = self.loss_fn(logits.float(), labels)
        self._accumulate_scaled(loss)
        return out.detach(), self._stats(logits.detach(), labels, loss.detach()), x.grad

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """The weights a stashed forward runs on: one buffer per dtype filled by one fused copy, with every
        parameter's own strides (an NHWC weight stays NHWC), instead of one clone per parameter."""
        named = list(self.module.named_parameters())
        views: dict[str, torch.Tensor] = {}
        for dtype in dict.fromkeys(p.dtype for _, p in named):
            group = [(n, p) for n, p in named if p.dtype == dtype]
            flat = torch.empty(sum(p.numel() for _, p in group), dtype=dtype, device=self.device)
            offset = 0
            for n, p in group:
                views[n] = flat.as_strided(p.shape, p.stride(), offset)
                offset += p.numel()
            torch._foreach_copy_([views[n] for n, _ in group], [p.detach() for _, p in group])
        return {n: views[n].requires_grad_(p.requires_grad) for n, p in named}

    def _stats(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor | None = None) -> BatchStats:
        if loss is None:
            loss = self.loss_fn(logits.float(), labels)
        n = labels.shape[0]
        errors = (logits.argmax(dim=1) != labels).sum()
        return BatchStats(loss.detach().float() * n, errors, n)

    def _accumulate_scaled(self, loss: torch.Tensor) -> None:
        (loss / self.accum_steps if self.accum_steps > 1 else loss).backward()
        self.pending_backwards += 1

    # ----------------------------------------------------------------- backward
    def backward(self, batch: int, grad_out: torch.Tensor) -> torch.Tensor | None:
        """Back-propagate β · grad_out through batch ``batch``'s stashed forward.

        Returns the gradient for the previous module (None for module 0).  Parameter gradients are
        accumulated into ``.grad`` of the live parameters.
        """
        entry = self.stash.pop(batch)
        x, out, params = entry.x, entry.out, entry.params
        if out is None:  # recompute with the current weights; BN statistics are not updated twice
            params = {n: p for n, p in self.module.named_parameters()}
            buffers = {n: b.clone() for n, b in self.module.named_buffers()}
            with self.autocast:
                out = functional_call(self.module, {**params, **buffers}, (x,))
        scale = self.beta / self.accum_steps
        grad = grad_out.to(out.dtype) * scale if scale != 1.0 else grad_out.to(out.dtype)
        names = [n for n, p in params.items() if p.requires_grad]
        inputs = [params[n] for n in names] + ([x] if x.requires_grad else [])
        grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
        live = dict(self.module.named_parameters())
        for name, g in zip(names, grads, strict=False):
            if g is None:
                continue
            p = live[name]
            p.grad = g if p.grad is None else p.grad.add_(g)
        self.pending_backwards += 1
        return grads[-1] if x.requires_grad else None

    # --------------------------------------------------------------------- step
    def step(self, *, measure: bool = False) -> StepInfo:
        """Apply the accumulated gradient (averaged over replicas first).

        The gradient norm stays a device tensor (no host sync); ``measure`` also computes the
        update/weight ratio, which needs a copy of the weights, so callers ask only at log intervals.
        """
        params = [p for p in self.parameters() if p.grad is not None]
        if self.grad_sync is not None:
            self.grad_sync([p.grad for p in params])
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float())
                                                     for p in params])) if params else torch.zeros((), device=self.device)
        if self.nan_policy == "skip_step" and not torch.isfinite(norm):  # skipping needs the answer now: a host sync
            self.optimizer.zero_grad(set_to_none=True)
            self.pending_backwards = 0
            return StepInfo(norm, None)
        self.finite.watch(norm, f"non-finite gradient in module {self.index} at its step {self.steps}")
        self.finite.publish()
        before = [p.detach().clone() for p in params] if measure else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.pending_backwards = 0
        ratio = None
        if before is not None:
            delta = torch.stack([torch.linalg.vector_norm((p.detach() - b).float()) for p, b in zip(params, before)])
            weight = torch.stack([torch.linalg.vector_norm(b.float()) for b in before])
            ratio = torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(weight).clamp_min(1e-12)
        return StepInfo(norm, ratio)

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything this module needs to go on from where it is, even mid-epoch: weights and buffers,
        optimizer, LR schedule, step count, gradients accumulated but not yet applied (adl), and the stash
        (input and weight snapshot of every forward whose gradient is still to come)."""
        return {
            "module": self.module.state_dict(),
            "aux_head": self.aux_head.state_dict() if self.aux_head is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "steps": self.steps,
            "pending_backwards": self.pending_backwards,
            "grads": {n: p.grad.detach() for n, p in self._named_parameters() if p.grad is not None},
            "stash": {b: {"x": e.x.detach(), "params": None if e.params is None else
                          {n: t.detach() for n, t in e.params.items()}} for b, e in self.stash.items()},
            "param_names": self.param_names(),  # the optimizer's parameter order: re-cutting maps by name
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; stashed forwards are run again on their saved inputs and weights, which
        rebuilds the very graphs their delayed backwards need (the same ops on the same values)."""
        self.module.load_state_dict(state["module"])
        if self.aux_head is not None:
            self.aux_head.load_state_dict(state["aux_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.steps, self.pending_backwards = state["steps"], state["pending_backwards"]
        named = dict(self._named_parameters())
        for n, g in state["grads"].items():
            named[n].grad = g.to(self.device)
        self.stash = {b: self._restash(e["x"], e["params"]) for b, e in sorted(state["stash"].items())}
        self.max_stash = max(self.max_stash, len(self.stash))

    def _restash(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None) -> _Stashed:
        x = x.to(self.device).requires_grad_(self.sends_grad)
        if params is None:
            return _Stashed(x, None, None)
        live = dict(self.module.named_parameters())
        params = {n: t.to(self.device).requires_grad_(live[n].requires_grad) for n, t in params.items()}
        buffers = {n: b.clone() for n, b in self.module.named_buffers()}  # the first run already updated them
        self.module.train()
        with self.autocast:
            out = functional_call(self.module, {**params, **buffers}, (x,))
        return _Stashed(x, out, params)

    def _named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        named = list(self.module.named_parameters())
        if self.aux_head is not None:
            named += [(f"aux_head.{n}", p) for n, p in self.aux_head.named_parameters()]
        return named

    def param_names(self) -> list[str]:
        """Names of ``parameters()``, in order: the unsplit model's keys, then ``aux_head.*`` for DGL."""
        return [n for n, _ in self._named_parameters()]

    def parameters(self) -> list[nn.Parameter]:
        """Everything this stage's optimizer owns (module and, for DGL, its auxiliary head)."""
        params = list(self.module.parameters())
        if self.aux_head is not None:
            params += list(self.aux_head.parameters())
        return params
