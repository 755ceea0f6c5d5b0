"""One training state independent of the split: gather it from the modules of a drained checkpoint, cut it
for another split, number of modules, of replicas, or another method.

Every epoch ends drained (no stash, no message in flight, every gradient applied), every module's
weights keep the unsplit model's keys, and optimizer state is per parameter: so what a run of K modules
holds at an epoch end is, without loss, the unsplit model's ``state_dict``, the optimizer state of each
parameter by name, the optimizer's parameter groups, the LR schedule's position and the counters.
``gather`` builds that from the module states of replica 0 (DDP keeps the replicas' weights and optimizer
state equal, and the epoch's evaluation gave every replica replica 0's BatchNorm statistics); ``cut`` gives a
stage of any layout its part.  DGL's auxiliary heads are kept by the block boundary they sit on: a new split
that keeps a boundary keeps its head, a new boundary gets a fresh one, and leaving dgl drops them.
Parameter groups (AdamW's decay / no-decay split) are known by their settings other than the LR, which the
schedule moves: every module builds its groups by the same rule per parameter, so a stage of any layout finds
each of its groups among the checkpoint's.

The optimizer's state uses ``torch.distributed.checkpoint.state_dict``'s layout (``{"state": {fqn: …},
"param_groups": [{…, "params": [fqn, …]}]}``), so an exported state loads anywhere with
``model.load_state_dict(u["model"])`` and ``set_optimizer_state_dict(model, opt, optim_state_dict=u["optimizer"])``.
Pure data in, data out: files and manifests are ``checkpoint``'s.  Must not read or write files, nor import the
trainer or ``checkpoint``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fdg_dist.engine.stage import Stage

FORMAT = "fdg_dist.unsplit/1"
FILE = "unsplit.pt"  # its name inside an imported checkpoint directory
AUX = "aux_head."  # prefix of a DGL head's parameters among a stage's parameter names
_KEYS = ("config", "source", "next_epoch", "global_step", "steps", "model", "optimizer", "scheduler", "aux_heads")


class UnsplitError(ValueError):
    """A state that cannot be gathered or cut; the message names the module, key or parameter."""


def gather(states: Sequence[dict[str, Any]], config: dict[str, Any], replicas: int) -> dict[str, Any]:
    """The unsplit state of a drained checkpoint from its modules' trainer states (replica 0, modules in order).

    ``config`` is the checkpoint's configuration fingerprint, kept to refuse a foreign model later; the step
    counter is module 0's (every module steps for the same batches, so they agree for every method).
    """
    model: dict[str, torch.Tensor] = {}
    opt_state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []  # the modules' groups merged by settings, parameters by name
    heads: dict[str, Any] = {}
    bounds = states[0]["bounds"]
    for k, state in enumerate(states):
        stage = state["stage"]
        if state["module"] != k:
            raise UnsplitError(f"the file of module {k} holds module {state['module']}")
        if state["cut"] is not None or stage["stash"] or stage["grads"] or stage["pending_backwards"]:
            raise UnsplitError(f"module {k} holds work in flight (a mid-epoch cut): only an epoch end can be re-cut")
        names = stage.get("param_names")
        if names is None:
            raise UnsplitError("written by an older fdg_dist (no parameter names): resume it with the split that "
                               "wrote it once; the checkpoints of that run can then be re-cut")
        own = stage["optimizer"]["param_groups"]
        if sorted(i for g in own for i in g["params"]) != list(range(len(names))):
            raise UnsplitError(f"module {k}'s optimizer does not match its parameters")
        model.update(stage["module"])
        head_state: dict[str, Any] = {}
        for group in own:
            merged = _group_for(groups, group)
            for index in group["params"]:
                name, found = names[index], stage["optimizer"]["state"].get(index)
                if name.startswith(AUX):
                    if found is not None:
                        head_state[name.removeprefix(AUX)] = found
                    continue
                merged["params"].append(name)
                if found is not None:
                    opt_state[name] = found
        if stage["aux_head"] is not None:
            heads[str(bounds[k + 1])] = {"model": stage["aux_head"], "optimizer": head_state}
    first = states[0]
    return {
        "format": FORMAT, "config": config,
        "source": {"method": config.get("method.name"), "k": len(states), "replicas": replicas, "bounds": bounds},
        "next_epoch": first["next_epoch"], "global_step": first["global_step"], "steps": first["stage"]["steps"],
        "model": model,
        "optimizer": {"state": opt_state, "param_groups": [g for g in groups if g["params"]]},
        "scheduler": first["stage"]["scheduler"],
        "aux_heads": heads,
    }


def check(state: Any) -> None:
    """Refuse what is not an unsplit state of this format, naming what is missing."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UnsplitError(f"not an fdg_dist unsplit checkpoint (format {found!r}, expected {FORMAT!r})")
    missing = [key for key in _KEYS if key not in state]
    if missing:
        raise UnsplitError(f"has no {missing[0]!r} entry")
    if not state["optimizer"].get("param_groups"):
        raise UnsplitError("optimizer: no parameter group")


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    """What identifies a parameter group across layouts: its settings but the LR (the schedule moves it)."""
    return {key: v for key, v in group.items() if key not in ("params", "lr")}


def _group_for(groups: list[dict[str, Any]], group: dict[str, Any]) -> dict[str, Any]:
    """The group among ``groups`` with ``group``'s settings, appended (without parameters) if none has them."""
    found = next((g for g in groups if _settings(g) == _settings(group)), None)
    if found is None:
        found = {**{key: v for key, v in group.items() if key != "params"}, "params": []}
        groups.append(found)
    return found


def head(state: dict[str, Any], boundary: int, aux_channels: int) -> dict[str, Any] | None:
    """The DGL head that sat on ``boundary`` (the first block after it), if one did with this width."""
    if state["config"].get("method.aux_channels") != aux_channels:
        return None
    return state["aux_heads"].get(str(boundary))


def cut(state: dict[str, Any], stage: Stage, *, boundary: int | None, aux_channels: int) -> dict[str, Any]:
    """``stage``'s part of an unsplit state, as ``Stage.load_state_dict`` takes it (nothing in flight).

    ``boundary`` is where the stage's DGL head sits (None without one); a head not in ``state`` keeps the
    stage's fresh weights and starts without optimizer state.  Shapes are compared before anything is loaded.
    """
    wanted = stage.module.state_dict()
    for name, tensor in wanted.items():
        if name not in state["model"]:
            raise UnsplitError(f"model: no {name!r} (the checkpoint holds another model)")
        if state["model"][name].shape != tensor.shape:
            raise UnsplitError(f"model: {name!r} has shape {tuple(state['model'][name].shape)}, this run's "
                               f"{tuple(tensor.shape)}")
    kept = head(state, boundary, aux_channels) if stage.aux_head is not None and boundary is not None else None
    ordered = [p for group in stage.optimizer.param_groups for p in group["params"]]  # its state_dict's indices
    live = dict(zip(stage.param_names(), ordered, strict=True))
    opt_state: dict[int, Any] = {}
    for index, (name, param) in enumerate(live.items()):
        if name.startswith(AUX):
            found = kept["optimizer"].get(name.removeprefix(AUX)) if kept is not None else None
        else:
            found = state["optimizer"]["state"].get(name)
        if found is None:
            continue
        for key, value in found.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise UnsplitError(f"optimizer: {key} of {name!r} has shape {tuple(value.shape)}, the parameter "
                                   f"{tuple(param.shape)}")
        opt_state[index] = found
    groups = []
    for group in stage.optimizer.state_dict()["param_groups"]:  # the stage's own groups, with the saved settings
        saved = next((g for g in state["optimizer"]["param_groups"] if _settings(g) == _settings(group)), None)
        if saved is None:
            raise UnsplitError(f"optimizer: no parameter group with the settings {_settings(group)} (the "
                               "checkpoint holds another optimizer)")
        groups.append({**{key: v for key, v in saved.items() if key != "params"}, "params": group["params"]})
    aux = None
    if stage.aux_head is not None:
        aux = kept["model"] if kept is not None else stage.aux_head.state_dict()
    return {
        "module": {name: state["model"][name] for name in wanted},
        "aux_head": aux,
        "optimizer": {"state": opt_state, "param_groups": groups},
        "scheduler": _schedule_for(state["scheduler"], groups),
        "steps": state["steps"], "pending_backwards": 0, "grads": {}, "stash": {},
    }


def _schedule_for(schedule: dict[str, Any] | None, groups: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The saved schedule (module 0's) with its per-group lists for these groups: a stage may hold other groups
    than module 0 (a module without biases has no no-decay group), and a list too short leaves a group's LR
    unscheduled."""
    if schedule is None or "base_lrs" not in schedule:
        return schedule
    return {**schedule, "base_lrs": [g["initial_lr"] for g in groups], "_last_lr": [g["lr"] for g in groups],
            "lr_lambdas": [None] * len(groups)}


def not_carried(state: dict[str, Any], method: str, bounds: list[int], aux_channels: int) -> list[str]:
    """What a re-cut as ``method`` split at ``bounds`` cannot take over from ``state``, one phrase per item."""
    lost = ["random generators (one stream per rank: each rank is reseeded from trainer.seed, the epoch, "
            "its module and replica)"]
    wanted = list(bounds[1:-1]) if method == "dgl" else []
    kept = [b for b in wanted if head(state, b, aux_channels) is not None]
    dropped = sorted(int(b) for b in state["aux_heads"] if int(b) not in kept)
    if dropped:
        why = (f"method {method} has none" if method != "dgl" else
               "method.aux_channels changed" if state["config"].get("method.aux_channels") != aux_channels else
               "no module of the new split ends there")
        lost.append(f"DGL auxiliary heads at blocks {dropped} (dropped: {why})")
    fresh = [b for b in wanted if b not in kept]
    if fresh:
        lost.append(f"DGL auxiliary heads at blocks {fresh} are new (freshly initialised, no optimizer state)")
    return lost
