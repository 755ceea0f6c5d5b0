"""One pipeline module: its blocks, optimizer, LR schedule and the stash of in-flight forwards.

The stage knows nothing of ticks or neighbours: the executor tells it to forward, back-propagate or
step a given batch.  Weight stashing is real: a stashed forward runs through ``functional_call`` on a
*snapshot* of the parameters, so its autograd graph never touches the live parameters the optimizer
updates in place (naive "keep the graph, step, backward later" fails PyTorch's version check,
pytorch #37573, and on old PyTorch silently mixed weights).  The delayed backward therefore uses
exactly the weights the forward used; its gradient is then applied to the live weights.

``recompute`` keeps only the input and re-runs the forward with the *current* weights at backward
time (features replay): one forward more, one weight copy less.  The replay draws the same random
numbers as the forward it replays (dropout masks, stochastic depth), as ``torch.utils.checkpoint`` does,
so the gradient belongs to the activation that was sent on.  ``mixed`` reproduces the FDG authors'
code under PyTorch 1.0, whose optimizer updated the weights saved in the forward's graph in place: the
backward keeps the stored activations but uses the weights as they are at backward time (the weight
gradients are those of the stored activations; the gradients sent upstream go through the new weights).

A staleness corrector (``correctors``) acts at three points only: it may move a snapshot before the
forward runs on it, correct the gradient back-propagated through it, and set the LR of the step; the
optimizer-side treatment of the delay (``optim.DelayedUpdate``: delay-scaled momentum, spike compensation)
acts in the step.  None of them, and no β, act on the batches of a synchronous warm-up (``delayed=False``):
those are back-propagation's.  Per-module clipping (``clip_norm``) scales the gradient before every step.
The staleness probe (``staleness``) measures the gradient about to be applied at log intervals.

Must not know ticks, neighbours, wires or process groups (beyond the ``grad_sync`` it is handed): the executor
drives it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fdg_dist import models
from fdg_dist.engine import loss, staleness
from fdg_dist.engine.correctors import Corrector
from fdg_dist.engine.finite import FiniteWatch
from fdg_dist.engine.optim import DelayedUpdate, LRSchedule, clip_

RngState = tuple[torch.Tensor, torch.Tensor | None]  # CPU generator, and the stage's CUDA generator


@dataclass
class _Stashed:
    x: torch.Tensor  # module input (requires grad when it came from another module)
    out: torch.Tensor | None  # module output with its graph (weights mode)
    params: dict[str, torch.Tensor] | None  # weights the forward used (weights mode)
    steps: int = 0  # this module's optimizer steps when the forward ran (for the staleness probe)
    rng: RngState | None = None  # random state the forward started from (replays draw the same numbers)


@dataclass
class StepInfo:
    """Device tensors about one optimizer step, read on the host only when logging."""

    grad_norm: torch.Tensor
    update_ratio: torch.Tensor | None
    staleness: staleness.Probe | None = None  # at staleness-probe steps only


@dataclass
class BatchStats:
    """Summed loss and error count of one batch, kept on the device until logging asks; ``samples`` counts
    labels (tokens for a language model), so ``loss_sum / samples`` is the mean loss per label."""

    loss_sum: torch.Tensor
    errors: torch.Tensor
    samples: int


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The joint L2 norm of ``grads`` on the device: one fused kernel for every tensor's norm
    (``torch._foreach_norm``, as ``clip_grad_norm_`` does) instead of one kernel per parameter."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g.detach().float() for g in grads])))


class Stage:
    """Module ``index`` of ``num_stages``: forward, backward and step on request.

    ``head`` is the loss head of this stage: the network's classifier is inside the last module's
    blocks, so ``head`` is ``None`` there and the output is the logits; for DGL every other module
    gets an auxiliary classifier trained on a local loss.
    """

    def __init__(self, module: nn.Module, index: int, num_stages: int, optimizer: torch.optim.Optimizer,
                 scheduler: LRSchedule | None, *, beta: float = 1.0,
                 stash: str = "weights", accum_steps: int = 1, aux_head: nn.Module | None = None,
                 sends_grad: bool = True, precision: str = "fp32", device: torch.device | str = "cpu",
                 grad_sync: Callable[[list[torch.Tensor]], None] | None = None,
                 nan_policy: str = "stop",
                 memory_format: torch.memory_format = torch.contiguous_format,
                 corrector: Corrector | None = None, update: DelayedUpdate | None = None,
                 clip_norm: float | None = None) -> None:
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
        self.corrector = corrector or Corrector()
        self.update = update  # how the optimizer applies a delayed gradient (None: its plain step)
        self.clip_norm = clip_norm  # this module's own gradient norm is clipped to it before a step
        self.probe: staleness.Probe | None = None  # measured at a backward, handed out by the next step

    # ------------------------------------------------------------------ forward
    def forward(self, batch: int, x: torch.Tensor, labels: torch.Tensor, *, train: bool,
                keep_for_backward: bool, delayed: bool = True) -> tuple[torch.Tensor, BatchStats | None, torch.Tensor | None]:
        """Run the module on batch ``batch``: (detached output to send, loss stats, input gradient).

        With a loss here (last module, or a DGL auxiliary head) the loss is back-propagated at once
        into this module's parameters and, if a gradient goes upstream, into the input.
        ``keep_for_backward`` stashes the forward for a later gradient from the next module; ``delayed``
        False (a synchronous batch) stashes the weights as they are, unmoved by the corrector.
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
            if self.stash_mode in ("weights", "mixed"):
                params = self._snapshot(shift=delayed)
                rng = self._rng_state()  # to rebuild this very graph after a mid-epoch checkpoint
                with self.autocast:
                    out = functional_call(self.module, params, (x,))
                self.stash[batch] = _Stashed(x, out, params, self.steps, rng)
            else:
                rng = self._rng_state()
                with torch.no_grad(), self.autocast:
                    out = self.module(x)
                self.stash[batch] = _Stashed(x, None, None, self.steps, rng)
            self.max_stash = max(self.max_stash, len(self.stash))
            return out.detach(), None, None
        x = x.detach().requires_grad_(self.sends_grad)
        with self.autocast:
            out = self.module(x)
            logits = out if self.is_last else self.aux_head(out)
            batch_loss = loss.cross_entropy(logits.float(), labels)
        self._accumulate_scaled(batch_loss)
        return out.detach(), self._stats(logits.detach(), labels, batch_loss.detach()), x.grad

    def _snapshot(self, *, shift: bool = True) -> dict[str, torch.Tensor]:
        """The weights a stashed forward runs on: one buffer per dtype filled by one fused copy, with every
        parameter's own strides (an NHWC weight stays NHWC), instead of one clone per parameter; ``shift``: moved
        by the corrector."""
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
        if shift:
            self.corrector.shift([views[n] for n, _ in named], [p for _, p in named], self.optimizer)
        return {n: views[n].requires_grad_(p.requires_grad) for n, p in named}

    def _stats(self, logits: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor | None = None) -> BatchStats:
        if mean is None:
            mean = loss.cross_entropy(logits.float(), labels)
        n = labels.numel()
        return BatchStats(mean.detach().float() * n, loss.errors(logits, labels), n)

    def _rng_state(self) -> RngState:
        """Where the random number generators stand (host values only: no device sync)."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    @contextmanager
    def _replaying(self, state: RngState) -> Iterator[None]:
        """Run with the generators at ``state``, then put them back where they were."""
        cpu, cuda = state
        with torch.random.fork_rng(devices=[self.device] if cuda is not None else []):
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)
            yield

    def _accumulate_scaled(self, value: torch.Tensor) -> None:
        (value / self.accum_steps if self.accum_steps > 1 else value).backward()
        self.pending_backwards += 1

    # ----------------------------------------------------------------- backward
    def backward(self, batch: int, grad_out: torch.Tensor, *, probe: bool = False,
                 delayed: bool = True) -> torch.Tensor | None:
        """Back-propagate β · grad_out through batch ``batch``'s stashed forward.

        Returns the gradient for the previous module (None for module 0).  Parameter gradients (after
        the corrector) are accumulated into ``.grad`` of the live parameters.  ``probe`` measures the
        first gradient of a step against the local fresh one (``staleness``) for the next step to report.
        ``delayed`` False (a synchronous batch): back-propagation's exact gradient, no β, no corrector.
        Only β is applied per hop: ``grad_out`` already carries ADL's 1/M (a step's mean over its batches), from
        the last module's loss; dividing again at every hop would shrink module k's gradient by M^(K−k).
        """
        entry = self.stash.pop(batch)
        x, out, params = entry.x, entry.out, entry.params
        if out is None:  # recompute with the current weights; BN statistics are not updated twice
            params = {n: p for n, p in self.module.named_parameters()}
            buffers = {n: b.clone() for n, b in self.module.named_buffers()}
            with self._replaying(entry.rng), self.autocast:
                out = functional_call(self.module, {**params, **buffers}, (x,))
        elif self.stash_mode == "mixed":  # the live weights under the stored graph, unseen by autograd's versions
            torch._foreach_copy_([params[n].data for n in params], [p.detach() for _, p in self.module.named_parameters()])
        scale = self.beta if delayed else 1.0
        grad = grad_out.to(out.dtype) * scale if scale != 1.0 else grad_out.to(out.dtype)
        names = [n for n, p in params.items() if p.requires_grad]
        inputs = [params[n] for n in names] + ([x] if x.requires_grad else [])
        grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
        live = dict(self.module.named_parameters())
        applied = list(grads[:len(names)])
        if delayed:
            applied = self.corrector.correct(applied, [params[n] for n in names], [live[n] for n in names],
                                             self.optimizer)
        if probe and self.pending_backwards == 0:
            self.probe = self._measure_staleness(entry, x, grad, names, applied, params, live)
        for name, g in zip(names, applied, strict=True):
            if g is None:
                continue
            p = live[name]
            p.grad = g if p.grad is None else p.grad.add_(g)
        self.pending_backwards += 1
        return grads[-1] if x.requires_grad else None

    def _measure_staleness(self, entry: _Stashed, x: torch.Tensor, grad: torch.Tensor, names: list[str],
                           applied: list[torch.Tensor | None], params: dict[str, torch.Tensor],
                           live: dict[str, nn.Parameter]) -> staleness.Probe:
        """The gradient about to be applied against the same ``grad`` back-propagated through the live weights
        (one more forward and backward; BatchNorm statistics of the live module untouched)."""
        buffers = {n: b.clone() for n, b in self.module.named_buffers()}
        with self.autocast:
            out = functional_call(self.module, {**live, **buffers}, (x.detach(),))
        fresh = torch.autograd.grad(out, [live[n] for n in names], grad, allow_unused=True)
        pairs = [(a, f) for a, f in zip(applied, fresh, strict=True) if a is not None and f is not None]
        cosine, ratio = staleness.compare([a for a, _ in pairs], [f for _, f in pairs])
        moved = staleness.distance([params[n] for n in names], [live[n] for n in names])
        return staleness.Probe(self.steps - entry.steps, moved, cosine, ratio)

    # --------------------------------------------------------------------- step
    def step(self, *, measure: bool = False, probe: bool = False, delayed: bool = True) -> StepInfo:
        """Apply the accumulated gradient (averaged over replicas first, then clipped to ``clip_norm``).

        The gradient norm (before clipping) stays a device tensor (no host sync); ``measure`` also computes
        the update/weight ratio, which needs a copy of the weights, so callers ask only at log intervals;
        ``probe`` hands out the staleness measured at this step's backward (fresh by construction where
        the loss was back-propagated at once).  ``delayed`` False (a synchronous step): the optimizer's plain
        step at the schedule's LR.
        """
        probed, self.probe = self.probe, None
        params = [p for p in self.parameters() if p.grad is not None]
        applied, self.pending_backwards = self.pending_backwards, 0
        if self.grad_sync is not None:
            self.grad_sync([p.grad for p in params])
        norm = grad_norm([p.grad for p in params]) if params else torch.zeros((), device=self.device)
        if self.nan_policy == "skip_step" and not torch.isfinite(norm):  # skipping needs the answer now: a host sync
            self.optimizer.zero_grad(set_to_none=True)
            self._advance_schedule(applied)
            return StepInfo(norm, None)
        self.finite.watch(norm, f"non-finite gradient in module {self.index} at its step {self.steps}")
        self.finite.publish()
        if self.clip_norm is not None and params:
            clip_([p.grad for p in params], norm, self.clip_norm)
        before = [p.detach().clone() for p in params] if measure else None
        with self.corrector.step_lr(self.optimizer, self.steps) if delayed else nullcontext():
            if self.update is None:
                self.optimizer.step()
            else:
                self.update.step(self.optimizer, delayed=delayed)
        self.optimizer.zero_grad(set_to_none=True)
        self._advance_schedule(applied)
        self.steps += 1
        ratio = None
        if before is not None:
            delta = torch.stack([torch.linalg.vector_norm((p.detach() - b).float()) for p, b in zip(params, before)])
            weight = torch.stack([torch.linalg.vector_norm(b.float()) for b in before])
            ratio = torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(weight).clamp_min(1e-12)
        own_loss = self.is_last or self.aux_head is not None
        return StepInfo(norm, ratio, (probed or (staleness.FRESH if own_loss else None)) if probe else None)

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
            "stash": {b: {"x": e.x.detach(), "steps": e.steps, "rng": e.rng,
                          "params": None if e.params is None else {n: t.detach() for n, t in e.params.items()}}
                      for b, e in self.stash.items()},
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
        self.stash = {b: self._restash(e) for b, e in sorted(state["stash"].items())}
        self.max_stash = max(self.max_stash, len(self.stash))

    def _restash(self, entry: dict[str, Any]) -> _Stashed:
        x = entry["x"].to(self.device).requires_grad_(self.sends_grad)
        if entry["params"] is None:
            return _Stashed(x, None, None, entry["steps"], entry["rng"])
        live = dict(self.module.named_parameters())
        params = {n: t.to(self.device).requires_grad_(live[n].requires_grad) for n, t in entry["params"].items()}
        buffers = {n: b.clone() for n, b in self.module.named_buffers()}  # the first run already updated them
        self.module.train()
        with self._replaying(entry["rng"]), self.autocast:
            out = functional_call(self.module, {**params, **buffers}, (x,))
        return _Stashed(x, out, params, entry["steps"], entry["rng"])

    def _named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        named = list(self.module.named_parameters())
        if self.aux_head is not None:
            named += [(f"aux_head.{n}", p) for n, p in self.aux_head.named_parameters()]
        return named

    def _advance_schedule(self, batches: int) -> None:
        """A per-batch LR schedule moves on by the batches this step applied (skipped or not), so every module
        uses the same LR for the same batches whatever its accumulation; epoch-wise ones wait for the epoch end."""
        if self.scheduler is not None:
            self.scheduler.advance(batches)

    def param_names(self) -> list[str]:
        """Names of the optimizer's parameters in its ``state_dict``'s index order (group by group): the unsplit
        model's keys, ``aux_head.*`` for DGL's head."""
        name = {id(p): n for n, p in self._named_parameters()}
        return [name[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def parameters(self) -> list[nn.Parameter]:
        """Everything this stage's optimizer owns (module and, for DGL, its auxiliary head)."""
        params = list(self.module.parameters())
        if self.aux_head is not None:
            params += list(self.aux_head.parameters())
        return params
