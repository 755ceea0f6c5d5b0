"""Whether a configuration can run, asked before any process group exists (SPEC §4).

Each error names the offending key and what would be valid.  Checking needs what the configuration names: the
model zoo (the model is built on the meta device and fed one sample of the data), the data (a text file is
read), the partitioner (how many modules a split can make) and the device checks, so this module stands above
all of them; the CLI calls it before any worker starts, and again for every point of a sweep.  Must not start
processes or write anything; the schema it checks is ``config``'s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path, PurePath
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import HydraException

from fdg_dist import data, models
from fdg_dist.config import (
    BACKENDS,
    CIFAR_CLASSES,
    CORRECTED_METHODS,
    CORRECTORS,
    DATASETS,
    FLOAT32_MAX,
    METHODS,
    MIN_TIMEOUT_S,
    NAN_POLICIES,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULERS,
    SEED_MAX,
    SHRINKING_METHODS,
    SPLIT_COSTS,
    STASH_MODES,
    TEXT_TOKENS,
    Config,
    ConfigError,
    DataConfig,
    describe,
)
from fdg_dist.run.devices import DeviceError, check_device, choose_backend
from fdg_dist.split import partition


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` (plain YAML data) fits a field's annotation; ``int`` is a ``float``, ``bool`` is neither."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_has_type(v, args[0]) for v in value)
    if origin is tuple:
        return (isinstance(value, (list, tuple)) and len(value) == len(args)
                and all(_has_type(v, a) for v, a in zip(value, args)))
    if origin is dict:
        return isinstance(value, dict) and all(_has_type(k, args[0]) and _has_type(v, args[1]) for k, v in value.items())
    raise TypeError(f"no type check for annotation {hint!r}")


def _finite(value: Any) -> bool:
    """No inf or nan among a setting's numbers (a list's included): no setting means anything by them."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(args[0]).removeprefix('an ').removeprefix('a ')}s, e.g. [1,2]"
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(args)} numbers, e.g. [0.9,0.999]"
    if dataclasses.is_dataclass(hint) or typing.get_origin(hint) is dict:
        return "a group of settings (key: value)"
    return {Any: "anything", bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}[hint]


def _typed_fields(cfg: Config) -> list[tuple[str, Any, Any]]:
    """(dotted key, value, annotation) of every setting, sections flattened."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            hints = typing.get_type_hints(type(value))
            out += [(f"{f.name}.{sub.name}", getattr(value, sub.name), hints[sub.name])
                    for sub in dataclasses.fields(value)]
        else:
            out.append((f.name, value, typing.get_type_hints(Config)[f.name]))
    return out


def check_overrides(overrides: list[str]) -> None:
    """Command-line ``key=value`` overrides that set no key, in one line naming the closest valid key, before Hydra
    composes (it would answer ``pipeline.kk=2`` with "append with +pipeline.kk=2", and ``model._target_`` without
    ``model=custom`` with a traceback hint).  ``+key`` and ``~key`` are Hydra's own (``Config.from_dict`` checks
    what they add); ``model.<arg>`` is an argument of the model's builder; a line Hydra cannot parse is left to it."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return
    known = {k.name for k in describe.all_keys()} | {f.name for f in dataclasses.fields(Config)}
    custom = any(o.key_or_group == "model" and o.get_value_element_as_str() == "custom" for o in parsed)
    for o in parsed:
        key = o.key_or_group
        if o.type is not OverrideType.CHANGE or o.package or key.split(".")[0].split("/")[0] == "hydra":
            continue
        _require(key != "model._target_" or custom, key, "names the builder of your own model and needs model=custom "
                 "(fdg-train model=custom model._target_=pkg.module.fn)")
        if key in known or key.startswith(f"{describe.FREE_SECTION}."):
            continue
        near = describe.closest(key)
        _require(False, key, f"unknown key; did you mean {near[0]}?" if near else
                 "unknown key; fdg-train --help lists every key and group")


def check_devices(cfg: Config, local_processes: int) -> None:
    """What this machine must offer a valid configuration: CUDA for NCCL, a GPU for every local process (or NCCL
    ≥ 2.30 where ranks share one: ``dist.ranks_per_gpu``), bf16 where asked.  Separate from ``validate``: a sweep's jobs may run
    elsewhere.  The rules are ``devices.check_device``'s, which every worker applies to itself again."""
    cores = os.cpu_count() or 1
    threads = cfg.trainer.threads
    _require(threads is None or threads <= cores, "trainer.threads",
             f"{threads!r} threads per process is more than the {cores} cores of this machine; use at most {cores}, "
             "or null (cores / local processes)")
    try:
        check_device(choose_backend(cfg.dist.backend), local_processes - 1, cfg.trainer.precision,
                     local_world=local_processes, ranks_per_gpu=cfg.dist.ranks_per_gpu)
    except DeviceError as e:
        raise ConfigError(f"{e.key}: {e}") from None


def validate(cfg: Config, *, num_blocks: int | None = None, world_size: int | None = None) -> None:
    """Reject a configuration before any process group is created.

    ``num_blocks`` (the model's, where the caller knows it: the model is then not built here) and ``world_size``
    (from torchrun's environment) are passed by the caller when known.  Types are checked
    first: a typo such as ``optim.lr=abc`` is named here, not met as a ``TypeError`` inside a worker.
    """
    for key, value, hint in _typed_fields(cfg):
        _require(_has_type(value, hint), key, f"{value!r} is not {_type_name(hint)}")
        _require(_finite(value), key, f"{value!r} is not a finite number")
    m, p, t, d, o, s = cfg.method, cfg.pipeline, cfg.trainer, cfg.data, cfg.optim, cfg.sched
    _require(cfg.model.name in models.names(), "model.name",
             f"unknown model {cfg.model.name!r}; valid: {', '.join(models.names())}")

    _require(cfg.model.variant in models.VARIANTS, "model.variant",
             f"{cfg.model.variant!r} is not one of {', '.join(models.VARIANTS)}")
    _require(cfg.model.variant == "ours" or cfg.model.name in models.official.NAMES, "model.variant",
             f"variant=official exists for {', '.join(models.official.NAMES)}, not {cfg.model.name!r}")
    _require(d.name in DATASETS, "data.name", f"unknown dataset {d.name!r}; valid: {', '.join(DATASETS)}")
    _require(d.num_classes >= 2, "data.num_classes", f"{d.num_classes!r} must be ≥ 2")
    _require(d.name not in CIFAR_CLASSES or d.num_classes == CIFAR_CLASSES[d.name], "data.num_classes",
             f"{d.name} has {CIFAR_CLASSES.get(d.name)} classes, not {d.num_classes}")
    _require(d.image_size >= 1, "data.image_size", f"{d.image_size!r} must be ≥ 1 (pixels per side)")
    _require(d.name not in CIFAR_CLASSES or d.image_size == 32, "data.image_size",
             f"{d.name} images are 32x32, not {d.image_size}x{d.image_size}")
    for key, n in (("data.train_size", d.train_size), ("data.test_size", d.test_size)):
        _require(n >= 1 or d.name != "synthetic", key, f"{n!r} must be ≥ 1 (samples of the synthetic set)")
    for key, n in (("data.train_subset", d.train_subset), ("data.test_subset", d.test_subset)):
        _require(n is None or n >= 1, key, f"{n!r} must be null (the whole split) or a number of samples ≥ 1")
    _require(d.cache or d.name != "imagefolder", "data.cache",
             "false (streaming from disk) is not supported yet; data=imagefolder needs data.cache=true")

    _require(m.name in METHODS, "method.name", f"unknown method {m.name!r}; valid: {', '.join(METHODS)}")
    _require(m.stash in STASH_MODES, "method.stash", f"{m.stash!r} is not one of {', '.join(STASH_MODES)}")
    _require(0.0 < m.beta <= 1.0, "method.beta", f"{m.beta!r} is outside (0, 1]; β = 1 means no shrinking")
    _require(m.beta == 1.0 or m.name in SHRINKING_METHODS, "method.beta",
             f"β shrinking is part of {', '.join(SHRINKING_METHODS)} only; method {m.name!r} needs beta=1")
    _require(m.accum_steps >= 1, "method.accum_steps", f"{m.accum_steps!r} must be an integer ≥ 1")
    _require(m.accum_steps == 1 or m.name == "adl", "method.accum_steps",
             f"gradient accumulation is method 'adl'; method {m.name!r} needs accum_steps=1")
    _require(m.aux_channels >= 1, "method.aux_channels", f"{m.aux_channels!r} must be ≥ 1")

    _require(p.k >= 1, "pipeline.k", f"{p.k!r} must be an integer ≥ 1 (number of modules)")
    _require(p.replicas >= 1, "pipeline.replicas", f"{p.replicas!r} must be an integer ≥ 1")
    _validate_corrector(cfg)
    if cfg.data.name == "text":
        _validate_text(cfg.data)
    groups = num_blocks  # places an automatic split can put a module
    if num_blocks is None:
        num_blocks, groups = _validate_model(cfg)
    stages = 1 if m.name == "dp" else p.k
    _require(stages <= num_blocks, "pipeline.k",
             f"K={p.k} modules but model {cfg.model.name!r} has only {num_blocks} blocks; use pipeline.k ≤ {num_blocks}")
    _require(p.split != "auto" or stages <= groups, "pipeline.k",
             f"K={p.k} modules but an automatic split of model {cfg.model.name!r} can make only {groups} (a module "
             f"starts after a block with weights); use pipeline.k ≤ {groups} or give pipeline.split")
    _require(p.cost in SPLIT_COSTS, "pipeline.cost",
             f"{p.cost!r} is not one of auto (counted), counted (FLOPs and bytes moved, the same split in every run), "
             "flops (counted FLOPs balanced), time (measured at start)")
    if p.split != "auto":
        split = list(p.split) if isinstance(p.split, (list, tuple)) else None
        _require(split is not None and all(_has_type(i, int) for i in split), "pipeline.split",
                 f"{p.split!r} must be 'auto' or a list of {stages - 1} block indices")
        _require(len(split) == stages - 1, "pipeline.split",
                 f"{split} has {len(split)} indices; K={stages} modules need {stages - 1} (where modules 1..K-1 start)")
        bounds = [0, *split, num_blocks]
        _require(all(a < b for a, b in zip(bounds, bounds[1:])), "pipeline.split",
                 f"{split} must be strictly increasing within 1..{num_blocks - 1} (model has {num_blocks} blocks)")
    if world_size is not None:
        _require(world_size == cfg.world_size, "pipeline.k",
                 f"the launcher started {world_size} processes but pipeline.k={p.k} × pipeline.replicas="
                 f"{p.replicas} needs {cfg.world_size}; launch with --nproc_per_node={cfg.world_size} or set pipeline.k")

    _require(t.batch_size >= 1, "trainer.batch_size", f"{t.batch_size!r} must be ≥ 1")
    replicas = p.k if m.name == "dp" else p.replicas
    _require(t.batch_size % replicas == 0, "trainer.batch_size",
             f"{t.batch_size} is the global batch; it must divide evenly over {replicas} replicas")
    _require(t.eval_batch_size >= 1, "trainer.eval_batch_size", f"{t.eval_batch_size!r} must be ≥ 1")
    _require(t.epochs >= 1, "trainer.epochs", f"{t.epochs!r} must be an integer ≥ 1")
    _require(t.max_steps is None or t.max_steps >= 1, "trainer.max_steps",
             f"{t.max_steps!r} must be null or an integer ≥ 1")
    _require(t.precision in PRECISIONS, "trainer.precision", f"{t.precision!r} is not one of {', '.join(PRECISIONS)}")
    _require(t.channels_last in (True, False, "auto"), "trainer.channels_last",
             f"{t.channels_last!r} is not one of true (NHWC), false (NCHW), auto (the fastest for the device)")
    _require(t.nan_policy in NAN_POLICIES, "trainer.nan_policy", f"{t.nan_policy!r} is not one of {', '.join(NAN_POLICIES)}")
    _require(t.threads is None or t.threads >= 1, "trainer.threads",
             f"{t.threads!r} must be null (cores / local processes) or ≥ 1")
    _require(0 <= t.seed <= SEED_MAX, "trainer.seed", f"{t.seed!r} must be in 0..{SEED_MAX} (2**32 - 1)")

    _require(o.name in OPTIMIZERS, "optim.name", f"unknown optimizer {o.name!r}; valid: {', '.join(OPTIMIZERS)}")
    _require(o.lr > 0, "optim.lr", f"{o.lr!r} must be > 0")
    for key, value in (("optim.lr", o.lr), ("optim.weight_decay", o.weight_decay), ("optim.eps", o.eps)):
        _require(abs(value) <= FLOAT32_MAX, key,
                 f"{value!r} is beyond float32's range (±{FLOAT32_MAX:.3g}), in which the optimizer applies it")
    _require(o.eps > 0, "optim.eps", f"{o.eps!r} must be > 0")
    _require(0 <= o.momentum < 1, "optim.momentum", f"{o.momentum!r} must be in [0, 1)")
    _require(not o.nesterov or o.momentum > 0, "optim.nesterov", "true needs optim.momentum > 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"{o.weight_decay!r} must be ≥ 0")
    _require(all(0 <= b < 1 for b in o.betas), "optim.betas", f"{list(o.betas)} must both be in [0, 1)")

    _require(s.name in SCHEDULERS, "sched.name", f"unknown schedule {s.name!r}; valid: {', '.join(SCHEDULERS)}")
    milestones = [0, *s.milestones]
    _require(all(a < b for a, b in zip(milestones, milestones[1:])), "sched.milestones",
             f"{list(s.milestones)} must be strictly increasing epochs ≥ 1")
    _require(s.gamma > 0, "sched.gamma", f"{s.gamma!r} must be > 0 (the LR factor at each milestone)")
    _require(s.warmup_epochs >= 0, "sched.warmup_epochs", f"{s.warmup_epochs!r} must be ≥ 0")
    _require(s.warmup_steps >= 0, "sched.warmup_steps", f"{s.warmup_steps!r} must be ≥ 0 (batches)")
    _require(0.0 <= s.min_lr_ratio <= 1.0, "sched.min_lr_ratio",
             f"{s.min_lr_ratio!r} must be in [0, 1] (the final LR as a fraction of optim.lr)")

    _require(cfg.dist.backend in BACKENDS, "dist.backend", f"{cfg.dist.backend!r} is not one of {', '.join(BACKENDS)}")
    _require(cfg.dist.timeout_s >= MIN_TIMEOUT_S, "dist.timeout_s",
             f"{cfg.dist.timeout_s!r} must be ≥ {MIN_TIMEOUT_S:g} second (how long a rank waits for a peer)")
    _require(cfg.dist.max_restarts >= 0, "dist.max_restarts", f"{cfg.dist.max_restarts!r} must be ≥ 0")
    _require(cfg.dist.ranks_per_gpu is None or cfg.dist.ranks_per_gpu >= 1, "dist.ranks_per_gpu",
             f"{cfg.dist.ranks_per_gpu!r} must be ≥ 1, or null (share a GPU only when ranks exceed GPUs)")

    c = cfg.checkpoint
    _require(c.keep >= 1, "checkpoint.keep", f"{c.keep!r} must be ≥ 1")
    _require(c.every_epochs >= 1, "checkpoint.every_epochs", f"{c.every_epochs!r} must be ≥ 1")
    _require(c.dir != "" and not PurePath(c.dir).is_absolute() and ".." not in PurePath(c.dir).parts,
             "checkpoint.dir", f"{c.dir!r} must be a folder inside the run directory (relative, no '..'), "
             "so that one run's checkpoints never mix with another's")
    _require(cfg.logging.progress in ("auto", "always", "lines", "never"), "logging.progress",
             f"{cfg.logging.progress!r} is not one of auto, always, lines, never")
    _require(cfg.logging.progress_every_s >= 0, "logging.progress_every_s",
             f"{cfg.logging.progress_every_s!r} must be ≥ 0 seconds")
    _require(cfg.logging.log_every_steps >= 1, "logging.log_every_steps",
             f"{cfg.logging.log_every_steps!r} must be ≥ 1")
    _require(cfg.logging.peak_tflops is None or cfg.logging.peak_tflops > 0, "logging.peak_tflops",
             f"{cfg.logging.peak_tflops!r} must be a positive number of TFLOP/s per process, or null")
    _require(d.std is None or (len(d.std) == 3 and all(v > 0 for v in d.std)), "data.std",
             f"{d.std!r} must be null or 3 positive per-channel values, e.g. [0.2023, 0.1994, 0.2010]")
    if d.name == "imagefolder":
        _require(d.root not in (None, "", "???"), "data.root",
                 "is required for data=imagefolder: a folder with train/ and val/ (or test/), e.g. data.root=/data/cifar10")
        root = Path(d.root)
        _require(root.is_dir(), "data.root",
                 f"{d.root!r} is not a directory; imagefolder needs data.root with train/ and val/ (or test/)")
        _require((root / "train").is_dir() and ((root / "val").is_dir() or (root / "test").is_dir()), "data.root",
                 f"{root} must hold train/ and val/ or test/ subdirectories (one folder per class)")
    _require(isinstance(cfg.logging.staleness_every_steps, int) and cfg.logging.staleness_every_steps >= 0,
             "logging.staleness_every_steps", f"{cfg.logging.staleness_every_steps!r} must be an integer ≥ 0 (0: off)")
    _require(cfg.resume in ("auto", "never") or Path(cfg.resume).is_dir(), "resume",
             f"{cfg.resume!r} must be auto, never, or an existing checkpoint directory "
             f"(<run dir>/{cfg.checkpoint.dir}/epochNNNN, or a run directory)")


def _validate_corrector(cfg: Config) -> None:
    """A corrector needs delayed gradients; weight-based ones need the stashed weights and their optimizer's
    state (SGD's velocity, Adam's moments)."""
    c, m = cfg.corrector, cfg.method
    _validate_delay_options(cfg)
    _require(c.name in CORRECTORS, "corrector.name", f"unknown corrector {c.name!r}; valid: {', '.join(CORRECTORS)}")
    _require(c.anneal_fraction is None or 0 < c.anneal_fraction <= 1, "corrector.anneal_fraction",
             f"{c.anneal_fraction!r} must be null (use corrector.anneal_steps) or in (0, 1]: the fraction of the "
             "run's module steps over which lr_by_delay's LR returns to the schedule's")
    _require(c.anneal_fraction is None or c.name == "lr_by_delay", "corrector.anneal_fraction",
             f"sets lr_by_delay's annealing; corrector={c.name} has none (use corrector=lr_by_delay or leave it null)")
    if c.name == "none":
        return
    _require(m.name in CORRECTED_METHODS, "corrector.name",
             f"corrector={c.name} corrects delayed gradients; method {m.name!r} has none "
             f"(valid with {', '.join(CORRECTED_METHODS)}); use corrector=none")
    if c.name in ("predict", "lookahead", "dc", "predict_adam"):
        _require(m.stash == "weights" and m.name != "fr", "corrector.name",
                 f"corrector={c.name} works on the stashed weights; method {m.name!r} with method.stash={m.stash} "
                 "re-runs the forward on the live weights (use method.stash=weights, or corrector=lr_by_delay)")
    if c.name in ("predict", "lookahead"):
        _require(cfg.optim.name == "sgd" and cfg.optim.momentum > 0, "corrector.name",
                 f"corrector={c.name} extrapolates along SGD's momentum buffer; it needs optim=sgd with "
                 f"optim.momentum > 0 (got optim={cfg.optim.name}, momentum {cfg.optim.momentum})")
    if c.name == "predict_adam":
        _require(cfg.optim.name in ("adam", "adamw"), "corrector.name",
                 f"corrector=predict_adam extrapolates along Adam's update; it needs optim=adam or adamw (got "
                 f"optim={cfg.optim.name}; for SGD use corrector=predict)")
    _require(c.dc_lambda >= 0, "corrector.dc_lambda", f"{c.dc_lambda!r} must be ≥ 0")
    _require(0 <= c.dc_momentum < 1, "corrector.dc_momentum", f"{c.dc_momentum!r} must be in [0, 1)")
    _require(isinstance(c.anneal_steps, int) and c.anneal_steps >= 1, "corrector.anneal_steps",
             f"{c.anneal_steps!r} must be an integer ≥ 1")


def _validate_delay_options(cfg: Config) -> None:
    """The optimizer-side treatments of delayed gradients and the synchronous warm-up: each composes with any
    corrector, and each needs what it acts on (SGD's momentum, a method whose gradients are delayed)."""
    o, m = cfg.optim, cfg.method
    _require(m.sync_warmup_steps >= 0, "method.sync_warmup_steps",
             f"{m.sync_warmup_steps!r} must be an integer ≥ 0 (batches of locked back-propagation at the start)")
    _require(m.sync_warmup_steps == 0 or m.name in SHRINKING_METHODS, "method.sync_warmup_steps",
             f"the synchronous warm-up switches from back-propagation to {' or '.join(SHRINKING_METHODS)}; method "
             f"{m.name!r} needs sync_warmup_steps=0")
    _require(o.clip_norm is None or o.clip_norm > 0, "optim.clip_norm",
             f"{o.clip_norm!r} must be null (no clipping) or > 0 (each module's gradient norm is clipped to it)")
    for key, on in (("optim.spike_compensation", o.spike_compensation),
                    ("optim.delay_momentum_max", o.delay_momentum_max is not None)):
        if not on:
            continue
        _require(m.name in CORRECTED_METHODS, key, f"treats delayed gradients; method {m.name!r} has none "
                 f"(valid with {', '.join(CORRECTED_METHODS)})")
        _require(o.name == "sgd" and o.momentum > 0, key, f"acts on SGD's momentum; it needs optim=sgd with "
                 f"optim.momentum > 0 (got optim={o.name}, momentum {o.momentum})")
    _require(not (o.spike_compensation and o.nesterov), "optim.spike_compensation",
             "replaces the momentum update, Nesterov's included (spike compensation at a delay of one step is "
             "Nesterov's); use optim.nesterov=false")
    _require(o.delay_momentum_max is None or 0 <= o.delay_momentum_max < 1, "optim.delay_momentum_max",
             f"{o.delay_momentum_max!r} must be null or in [0, 1): the momentum of the most delayed module (above "
             f"optim.momentum={o.momentum} as Ajanthan et al., or below it)")


def _validate_text(d: DataConfig) -> None:
    """data=text: the settings, then the file itself (it exists, decodes, has data.num_classes symbols, and both
    of its parts hold a sequence)."""
    _require(d.tokens in TEXT_TOKENS, "data.tokens", f"{d.tokens!r} is not one of {', '.join(TEXT_TOKENS)}")
    _require(isinstance(d.context, int) and d.context >= 1, "data.context", f"{d.context!r} must be an integer ≥ 1")
    _require(0.0 < d.val_fraction < 1.0, "data.val_fraction", f"{d.val_fraction!r} must be in (0, 1)")
    _require(d.tokens != "bpe" or (d.vocab_size or 0) > 256, "data.vocab_size",
             f"{d.vocab_size!r} must be > 256 for data.tokens=bpe (the 256 bytes, then the merges BPE learns)")
    try:
        data.load(d, seed=0)  # text is split and read without randomness
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _validate_model(cfg: Config) -> tuple[int, int]:
    """Build the model on the meta device and pass it one sample of the data: it must build, take the
    data's input and return one logit vector per label.  Returns its number of blocks and how many modules
    an automatic split can make of them."""
    name = f"model._target_={cfg.model._target_}" if cfg.model.name == "custom" else f"model={cfg.model.name}"
    _require(cfg.model.name != "gpt" or cfg.data.name == "text", "model.name",
             f"gpt is a language model and trains on token sequences: use data=text (data is {cfg.data.name})")
    try:
        blocks = models.build_blocks(cfg.model, cfg.data.num_classes, device="meta")
    except Exception as e:  # a custom model's own code may raise anything
        message = str(e) if str(e).startswith("model") else f"model: {name} failed to build: {type(e).__name__}: {e}"
        raise ConfigError(message) from None
    spec = data.sample_spec(cfg.data)
    try:
        out = tuple(partition.boundary_shapes(blocks, (1, *spec.shape), spec.dtype)[-1])
    except Exception as e:
        raise ConfigError(f"model: {name} cannot take data={cfg.data.name}'s input ({spec.dtype} of shape "
                          f"{(1, *spec.shape)}): {type(e).__name__}: {e}") from None
    want = (1, *spec.label_shape, cfg.data.num_classes)
    _require(out == want, "model", f"{name} returns {out} for one sample of data={cfg.data.name}; training needs "
                                   f"{want}: one logit per class (data.num_classes) for every label")
    return len(blocks), len(partition.weighted_starts(blocks)) + 1
