"""Typed run configuration and its validation.

Hydra composes YAML from ``conf/``; everything below the CLI sees only these dataclasses, so a worker
process never imports Hydra.  ``validate`` runs before any process group exists (SPEC §4): each error
names the offending key and what would be valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("fdg", "bp", "ddg", "fr", "dgl", "adl", "dp")
SHRINKING_METHODS = ("fdg", "adl")
STASH_MODES = ("weights", "recompute")
OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("multistep", "cosine", "constant")
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")
PRECISIONS = ("fp32", "bf16")
NAN_POLICIES = ("stop", "skip_step", "off")
SPLIT_COSTS = ("auto", "flops", "time")
BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class ModelConfig:
    name: str = "resnet20"


@dataclass
class DataConfig:
    name: str = "synthetic"
    root: str | None = None
    download: bool = False
    num_classes: int = 10
    image_size: int = 32
    train_size: int = 1024  # synthetic only
    test_size: int = 256  # synthetic only
    train_subset: int | None = None  # first N training samples (quick runs, CI)
    test_subset: int | None = None
    augment: bool = True
    cache: bool = True  # decode small ImageFolder images once, keep them in memory


@dataclass
class MethodConfig:
    name: str = "fdg"
    beta: float = 1.0
    stash: str = "weights"
    accum_steps: int = 1  # adl
    aux_channels: int = 128  # dgl auxiliary head width


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class SchedConfig:
    name: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [150, 225, 275])
    gamma: float = 0.1
    warmup_epochs: int = 0


@dataclass
class PipelineConfig:
    k: int = 2
    split: Any = "auto"  # "auto" or a list of K-1 block indices where modules 1..K-1 start
    cost: str = "auto"  # what split "auto" balances: flops (counted), time (measured), auto (fastest for the device)
    replicas: int = 1


@dataclass
class TrainerConfig:
    epochs: int = 300
    batch_size: int = 128
    eval_batch_size: int = 256
    max_steps: int | None = None
    seed: int = 0
    precision: str = "fp32"
    channels_last: bool | str = "auto"  # NHWC activations and conv weights; auto: the fastest for the device
    threads: int | None = None  # intra-op threads per process (CPU)
    nan_policy: str = "stop"  # stop | skip_step | off (no finiteness checks: no host sync per step on a GPU)
    eval_every_epochs: int = 1


@dataclass
class DistConfig:
    backend: str = "auto"
    timeout_s: float = 300.0
    max_restarts: int = 0


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every_epochs: int = 1
    keep: int = 2
    dir: str = "checkpoints"


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    progress: str = "auto"  # auto (tty only), always, never
    log_every_steps: int = 20
    trace: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resume: str = "auto"
    experiment: str | None = None

    @property
    def world_size(self) -> int:
        """Processes one run needs: K modules per replica (``dp`` is one module, K replicas)."""
        return self.pipeline.k * self.pipeline.replicas

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Build from a plain mapping (a resolved Hydra config or a JSON copy); unknown keys are errors."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if sub is not None and dataclasses.is_dataclass(sub) and isinstance(value, dict):
                kwargs[f.name] = _build(sub, value, f.name)
            else:
                kwargs[f.name] = value
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)} - {"hydra"}
        if unknown:
            raise ConfigError(f"unknown config key(s) {sorted(unknown)}; valid: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**kwargs)


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        key = f"{prefix}.{sorted(unknown)[0]}"
        raise ConfigError(f"{key}: unknown key; valid keys of {prefix}: {sorted(names)}")
    values = dict(raw)
    if "betas" in values and values["betas"] is not None:
        values["betas"] = tuple(values["betas"])
    return cls(**values)


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the valid choices."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config, *, num_blocks: int | None = None, world_size: int | None = None) -> None:
    """Reject a configuration before any process group is created.

    ``num_blocks`` (from the model zoo) and ``world_size`` (from torchrun's environment) are passed
    by the caller when known, so this module stays free of model and launcher imports.
    """
    from fdg_dist import models  # local: the zoo imports torch, config must stay cheap to import

    m, p, t = cfg.method, cfg.pipeline, cfg.trainer
    _require(cfg.model.name in models.names(), "model.name",
             f"unknown model {cfg.model.name!r}; valid: {', '.join(models.names())}")
    _require(cfg.data.name in DATASETS, "data.name", f"unknown dataset {cfg.data.name!r}; valid: {', '.join(DATASETS)}")
    _require(m.name in METHODS, "method.name", f"unknown method {m.name!r}; valid: {', '.join(METHODS)}")
    _require(m.stash in STASH_MODES, "method.stash", f"{m.stash!r} is not one of {', '.join(STASH_MODES)}")
    _require(isinstance(m.beta, (int, float)) and 0.0 < m.beta <= 1.0, "method.beta",
             f"{m.beta!r} is outside (0, 1]; β = 1 means no shrinking")
    _require(m.beta == 1.0 or m.name in SHRINKING_METHODS, "method.beta",
             f"β shrinking is part of {', '.join(SHRINKING_METHODS)} only; method {m.name!r} needs beta=1")
    _require(isinstance(m.accum_steps, int) and m.accum_steps >= 1, "method.accum_steps",
             f"{m.accum_steps!r} must be an integer ≥ 1")
    _require(m.accum_steps == 1 or m.name == "adl", "method.accum_steps",
             f"gradient accumulation is method 'adl'; method {m.name!r} needs accum_steps=1")
    _require(isinstance(p.k, int) and p.k >= 1, "pipeline.k", f"{p.k!r} must be an integer ≥ 1 (number of modules)")
    _require(isinstance(p.replicas, int) and p.replicas >= 1, "pipeline.replicas", f"{p.replicas!r} must be an integer ≥ 1")
    if num_blocks is None:
        num_blocks = len(models.build_blocks(cfg.model.name, cfg.data.num_classes, device="meta"))
    stages = 1 if m.name == "dp" else p.k
    _require(stages <= num_blocks, "pipeline.k",
             f"K={p.k} modules but model {cfg.model.name!r} has only {num_blocks} blocks; use pipeline.k ≤ {num_blocks}")
    _require(p.cost in SPLIT_COSTS, "pipeline.cost",
             f"{p.cost!r} is not one of auto (the fastest for the device), flops (counted, the same on every machine), "
             "time (measured at start)")
    if p.split != "auto":
        split = list(p.split) if isinstance(p.split, (list, tuple)) else None
        _require(split is not None and all(isinstance(i, int) for i in split), "pipeline.split",
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
    _require(isinstance(t.batch_size, int) and t.batch_size >= 1, "trainer.batch_size", f"{t.batch_size!r} must be ≥ 1")
    replicas = p.k if m.name == "dp" else p.replicas
    _require(t.batch_size % replicas == 0, "trainer.batch_size",
             f"{t.batch_size} is the global batch; it must divide evenly over {replicas} replicas")
    _require(t.eval_batch_size >= 1, "trainer.eval_batch_size", f"{t.eval_batch_size!r} must be ≥ 1")
    _require(isinstance(t.epochs, int) and t.epochs >= 1, "trainer.epochs", f"{t.epochs!r} must be an integer ≥ 1")
    _require(t.max_steps is None or (isinstance(t.max_steps, int) and t.max_steps >= 1), "trainer.max_steps",
             f"{t.max_steps!r} must be null or an integer ≥ 1")
    _require(t.precision in PRECISIONS, "trainer.precision", f"{t.precision!r} is not one of {', '.join(PRECISIONS)}")
    _require(t.channels_last in (True, False, "auto"), "trainer.channels_last",
             f"{t.channels_last!r} is not one of true (NHWC), false (NCHW), auto (the fastest for the device)")
    _require(t.nan_policy in NAN_POLICIES, "trainer.nan_policy", f"{t.nan_policy!r} is not one of {', '.join(NAN_POLICIES)}")
    _require(cfg.optim.name in OPTIMIZERS, "optim.name", f"unknown optimizer {cfg.optim.name!r}; valid: {', '.join(OPTIMIZERS)}")
    _require(cfg.optim.lr > 0, "optim.lr", f"{cfg.optim.lr!r} must be > 0")
    _require(cfg.optim.weight_decay >= 0, "optim.weight_decay", f"{cfg.optim.weight_decay!r} must be ≥ 0")
    _require(cfg.sched.name in SCHEDULERS, "sched.name", f"unknown schedule {cfg.sched.name!r}; valid: {', '.join(SCHEDULERS)}")
    _require(list(cfg.sched.milestones) == sorted(cfg.sched.milestones), "sched.milestones",
             f"{list(cfg.sched.milestones)} must be increasing epochs")
    _require(cfg.sched.warmup_epochs >= 0, "sched.warmup_epochs", f"{cfg.sched.warmup_epochs!r} must be ≥ 0")
    _require(cfg.dist.backend in BACKENDS, "dist.backend", f"{cfg.dist.backend!r} is not one of {', '.join(BACKENDS)}")
    _require(cfg.dist.timeout_s > 0, "dist.timeout_s", f"{cfg.dist.timeout_s!r} must be > 0 seconds")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", f"{cfg.checkpoint.keep!r} must be ≥ 1")
    _require(cfg.checkpoint.every_epochs >= 1, "checkpoint.every_epochs", f"{cfg.checkpoint.every_epochs!r} must be ≥ 1")
    _require(cfg.logging.progress in ("auto", "always", "never"), "logging.progress",
             f"{cfg.logging.progress!r} is not one of auto, always, never")
    _require(cfg.data.num_classes >= 2, "data.num_classes", f"{cfg.data.num_classes!r} must be ≥ 2")
    if cfg.data.name == "imagefolder":
        _require(cfg.data.root not in (None, "", "???"), "data.root",
                 "is required for data=imagefolder: a folder with train/ and val/ (or test/), e.g. data.root=/data/cifar10")
        root = Path(cfg.data.root)
        _require(root.is_dir(), "data.root",
                 f"{cfg.data.root!r} is not a directory; imagefolder needs data.root with train/ and val/ (or test/)")
        _require((root / "train").is_dir() and ((root / "val").is_dir() or (root / "test").is_dir()), "data.root",
                 f"{root} must hold train/ and val/ or test/ subdirectories (one folder per class)")
    _require(cfg.resume in ("auto", "never") or Path(cfg.resume).is_dir(), "resume",
             f"{cfg.resume!r} must be auto, never, or an existing checkpoint directory "
             f"(<run dir>/{cfg.checkpoint.dir}/epochNNNN, or a run directory)")
