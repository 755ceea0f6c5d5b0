"""The typed run configuration: its dataclasses, the choices each key has, and ``ConfigError``.

Hydra composes YAML from ``conf/``; everything below the CLI sees only these dataclasses, so a worker
process never imports Hydra.  Whether a configuration can run is ``fdg_dist.validation``'s question, asked
before any process group exists.  Must not import any other part of fdg_dist: every layer imports this one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

METHODS = ("fdg", "bp", "ddg", "fr", "dgl", "adl", "dp")
SHRINKING_METHODS = ("fdg", "adl")
STASH_MODES = ("weights", "recompute", "mixed")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("multistep", "cosine", "constant", "step_cosine")
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic", "text")
TEXT_TOKENS = ("byte", "char", "bpe")
PRECISIONS = ("fp32", "bf16")
NAN_POLICIES = ("stop", "skip_step", "off")
SPLIT_COSTS = ("auto", "counted", "flops", "time")
BACKENDS = ("auto", "nccl", "gloo")
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
MIN_TIMEOUT_S = 1.0
CORRECTORS = ("none", "predict", "lookahead", "lr_by_delay", "dc", "predict_adam")
CORRECTED_METHODS = ("fdg", "adl", "ddg", "fr")  # methods whose modules apply delayed gradients
SEED_MAX = 2**32 - 1  # numpy's generator takes seeds in 0..2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38  # the optimizer applies its numbers to float32 weights


@dataclass
class ModelConfig:
    """``name`` picks the builder (a zoo CNN, ``gpt``, ``torchvision`` or ``custom``); every other key under
    ``model`` is an argument of that builder (``model.arch``, ``model.width``, ...), kept in ``args``."""

    name: str = "resnet20"  # the builder (set as model=NAME): a zoo CNN, gpt, torchvision or custom
    _target_: str | None = None  # model=custom: "pkg.module.fn" returning blocks (called by hydra.utils.instantiate)
    args: dict[str, Any] = field(default_factory=dict)
    variant: str = "ours"  # ours | official (the FDG authors' definition: models/official.py)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """From the YAML form, where a builder's arguments sit beside ``name``."""
        fixed = {key: raw[key] for key in ("name", "_target_", "variant") if key in raw}
        return cls(**fixed, args={key: value for key, value in raw.items() if key not in fixed})

    @property
    def label(self) -> str:
        """What logs, result.json and TensorBoard call the model: the zoo name, ``torchvision:<arch>`` or
        ``custom:<target>``."""
        if self.name == "torchvision":
            return f"torchvision:{self.args.get('arch')}"
        if self.name == "custom":
            return f"custom:{self._target_}"
        return self.name

    def to_dict(self) -> dict[str, Any]:
        """The YAML form again (``from_dict`` inverts it): what workers receive and checkpoints fingerprint."""
        return {"name": self.name, **({"_target_": self._target_} if self._target_ is not None else {}),
                **({"variant": self.variant} if self.variant != "ours" else {}), **self.args}


@dataclass
class DataConfig:
    name: str = "synthetic"  # cifar10 | cifar100 | imagefolder | synthetic | text
    root: str | None = None  # where the data is (cifar: torchvision's folder; imagefolder: train/, val/; text: a file)
    download: bool = False  # cifar: fetch it into data.root if absent
    num_classes: int = 10  # classes of the data (cifar and imagefolder set it themselves)
    image_size: int = 32  # synthetic and imagefolder: square side in pixels
    train_size: int = 1024  # synthetic: training samples
    test_size: int = 256  # synthetic: test samples
    train_subset: int | None = None  # first N training samples (quick runs, CI)
    test_subset: int | None = None  # first N test samples (quick runs, CI)
    augment: bool = True  # random crop and horizontal flip of training images (CIFAR recipe)
    cache: bool = True  # decode small ImageFolder images once, keep them in memory
    std: list[float] | None = None  # per-channel normalisation std instead of the dataset's (parity runs)
    tokens: str = "byte"  # text: byte (vocabulary 256) | char (the file's distinct characters) | bpe
    vocab_size: int | None = None  # text, tokens=bpe: the vocabulary BPE learns (e.g. 512); data.num_classes follows
    context: int = 128  # text: tokens per training sequence
    val_fraction: float = 0.1  # text: the file's last 10 % validates (file order)

    def __post_init__(self) -> None:
        if self.tokens == "bpe" and self.vocab_size is not None:  # the model's vocabulary is the one BPE learns
            self.num_classes = self.vocab_size


@dataclass
class MethodConfig:
    name: str = "fdg"  # fdg | bp (locked model parallel) | ddg | fr | dgl | adl | dp (data parallel)
    beta: float = 1.0  # fdg, adl: the shrinking factor of the delayed gradient, in (0, 1]
    stash: str = "weights"  # weights (stash each forward's weights) | recompute (forward again at the backward) | mixed
    accum_steps: int = 1  # adl: batches whose gradients a module accumulates before its step
    aux_channels: int = 128  # dgl: width of each module's auxiliary classifier
    sync_warmup_steps: int = 0  # fdg, adl: the run's first N batches by locked back-propagation, then the method


@dataclass
class CorrectorConfig:
    """Staleness corrector beside each module's optimizer step (``correctors.py``); ``none`` is the paper's FDG."""

    name: str = "none"  # none | predict | lookahead | lr_by_delay | dc | predict_adam
    dc_lambda: float = 2.0  # dc: DC-ASGD-a's λ0
    dc_momentum: float = 0.95  # dc: decay of the gradient's mean square (DC-ASGD-a's m)
    anneal_steps: int = 500  # lr_by_delay: module steps until the LR is back at the schedule's
    anneal_fraction: float | None = None  # lr_by_delay: instead, this fraction of the run's module steps


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1  # learning rate (each module's optimizer)
    momentum: float = 0.9  # sgd momentum
    weight_decay: float = 5e-4  # L2 penalty (sgd, adam) or decoupled decay (adamw)
    nesterov: bool = False  # sgd: Nesterov momentum
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw: the moment decays
    eps: float = 1e-8  # adam, adamw: the denominator's epsilon
    clip_norm: float | None = None  # each module clips its own gradient to this norm (no communication)
    spike_compensation: bool = False  # sgd: a delayed gradient's total effect equals undelayed momentum SGD's
    delay_momentum_max: float | None = None  # sgd: module momentum moves with its delay to this (module 0)


@dataclass
class SchedConfig:
    name: str = "multistep"  # multistep | cosine | constant | step_cosine (per batch)
    milestones: list[int] = field(default_factory=lambda: [150, 225, 275])  # multistep: epochs where LR *= gamma
    gamma: float = 0.1  # multistep: the LR factor at each milestone
    warmup_epochs: int = 0  # linear LR warm-up over this many epochs
    warmup_steps: int = 0  # step_cosine: linear warm-up over this many batches
    min_lr_ratio: float = 0.0  # step_cosine: the LR the cosine ends at, as a fraction of optim.lr


@dataclass
class PipelineConfig:
    k: int = 2  # modules the network is cut into: one process each
    split: Any = "auto"  # "auto" or a list of K-1 block indices where modules 1..K-1 start
    cost: str = "auto"  # how split=auto is chosen: auto = counted (FLOPs + bytes: same every run) | flops | time
    replicas: int = 1  # data-parallel copies of the whole pipeline (K x replicas processes)


@dataclass
class TrainerConfig:
    epochs: int = 300  # passes over the training set
    batch_size: int = 128  # global training batch (split over replicas)
    eval_batch_size: int = 256  # test batch
    max_steps: int | None = None  # stop after this many training batches (null: run every epoch)
    seed: int = 0  # weights, data order and augmentation: the same seed gives the same run
    precision: str = "fp32"  # fp32 | bf16 (autocast inside each module)
    channels_last: bool | str = "auto"  # NHWC activations and conv weights; auto: the fastest for the device
    threads: int | None = None  # intra-op threads per process (CPU)
    nan_policy: str = "stop"  # stop | skip_step | off (no finiteness checks: no host sync per step on a GPU)


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl with CUDA, gloo on CPU) | nccl | gloo
    timeout_s: float = 300.0  # seconds a rank waits for a peer before the run fails
    max_restarts: int = 0  # restarts of all workers after a failure (fdg-train's own launcher)
    ranks_per_gpu: int | None = None  # NCCL ranks sharing one GPU (NCCL ≥ 2.30); null: share only when ranks exceed GPUs


@dataclass
class CheckpointConfig:
    enabled: bool = True  # write checkpoints (and resume from them)
    every_epochs: int = 1  # a checkpoint every N epochs
    keep: int = 2  # the newest N checkpoints stay; older ones are deleted
    dir: str = "checkpoints"  # checkpoint folder, relative to the run directory


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # TensorBoard event files in tb/ of the run directory
    progress: str = "auto"  # auto (a bar on a terminal, else plain lines), always (bar), lines, never
    progress_every_s: float = 30.0  # seconds between plain progress lines
    log_every_steps: int = 20  # steps between timing and loss scalars in TensorBoard
    staleness_every_steps: int = 100  # staleness/ probes (one extra forward+backward per module); 0: off
    trace: bool = False  # a Chrome trace of every action per rank (trace/)
    peak_tflops: float | None = None  # text: each process's peak TFLOP/s, for MFU (default: a known GPU's; CPU: none)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    corrector: CorrectorConfig = field(default_factory=CorrectorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resume: str = "auto"  # auto (the run directory's newest checkpoint) | never | a checkpoint directory to start from
    experiment: str | None = None  # a preset of conf/experiment/ (set as experiment=NAME)
    recipe: str | None = None  # a setting of conf/recipe/ (set as recipe=NAME)

    @property
    def world_size(self) -> int:
        """Processes one run needs: K modules per replica (``dp`` is one module, K replicas)."""
        return self.pipeline.k * self.pipeline.replicas

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Build from a plain mapping (a resolved Hydra config or a JSON copy); unknown keys are errors."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if sub is ModelConfig and isinstance(value, dict):
                kwargs[f.name] = ModelConfig.from_dict(value)
            elif sub is not None and dataclasses.is_dataclass(sub) and isinstance(value, dict):
                kwargs[f.name] = _build(sub, value, f.name)
            else:
                kwargs[f.name] = value
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)} - {"hydra"}
        if unknown:
            raise ConfigError(f"{sorted(unknown)[0]}: unknown config key; valid: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**kwargs)


def staleness_options(cfg: Config) -> list[str]:
    """The settings beside β and the corrector that change how delayed gradients are applied, as short tokens
    (``M=4 batch=32``: ADL's accumulation and batch per tick, ``anneal=0.25``, ``spike``, ``dmom=0.99``, ``nesterov``,
    ``warmup=16``, ``clip=1``): what ``result.json`` records and ``fdg-report`` shows after the corrector; none for the
    paper's algorithm."""
    o, m, c = cfg.optim, cfg.method, cfg.corrector
    tokens = [f"M={m.accum_steps}", f"batch={cfg.trainer.batch_size}"] if m.name == "adl" else []
    if c.name == "lr_by_delay" and c.anneal_fraction is not None:
        tokens.append(f"anneal={c.anneal_fraction:g}")
    if o.spike_compensation:
        tokens.append("spike")
    if o.delay_momentum_max is not None:
        tokens.append(f"dmom={o.delay_momentum_max:g}")
    if o.nesterov:
        tokens.append("nesterov")
    if m.sync_warmup_steps > 0:
        tokens.append(f"warmup={m.sync_warmup_steps}")
    if o.clip_norm is not None:
        tokens.append(f"clip={o.clip_norm:g}")
    return tokens


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        key = f"{prefix}.{sorted(unknown)[0]}"
        raise ConfigError(f"{key}: unknown key; valid keys of {prefix}: {sorted(names)}")
    values = dict(raw)
    if isinstance(values.get("betas"), list):
        values["betas"] = tuple(values["betas"])
    return cls(**values)


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the valid choices."""
