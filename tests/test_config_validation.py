"""Bad configurations are rejected before any process group exists, with one message naming the key.

One table holds a row for every check ``validate``, ``check_devices`` and ``Config.from_dict`` make, and
``test_every_check_has_a_row`` fails when a check exists that no row triggers (it finds the checks in the
source of validation.py and config/schema.py and the check each row trips in the traceback).  A few go through the real CLI,
which must exit 2 with a single line on stderr and start no worker.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import REPO, small_config

from fdg_dist import validation
from fdg_dist.config import Config, ConfigError, schema
from fdg_dist.validation import check_devices, validate


@dataclass(frozen=True)
class Row:
    """A valid small config changed by ``overrides`` (``section.name`` or top-level keys), validated with
    ``world`` processes started by the launcher; ``cuda`` = (available, device count) as torch reports it
    for ``check_devices``, which then runs too;
    ``folder`` = data.root becomes a fresh folder holding these subfolders; ``raw`` goes through
    ``Config.from_dict`` instead.  ``key`` is what the message must start with."""

    id: str
    key: str
    overrides: dict[str, object] = field(default_factory=dict)
    world: int | None = None
    cuda: tuple[bool, int] | None = None
    folder: tuple[str, ...] | None = None
    raw: dict | None = None
    cli: tuple[str, ...] | None = None  # command-line overrides, checked before Hydra composes them


IMAGEFOLDER = {"data.name": "imagefolder"}
ROWS = [
    # types: every key, checked against its annotation before any value check
    Row("lr=abc", "optim.lr", {"optim.lr": "abc"}),
    Row("eval_batch_size=abc", "trainer.eval_batch_size", {"trainer.eval_batch_size": "abc"}),
    Row("milestones=abc", "sched.milestones", {"sched.milestones": "abc"}),
    Row("milestones-floats", "sched.milestones", {"sched.milestones": [1.5]}),
    Row("betas-one", "optim.betas", {"optim.betas": (0.9,)}),
    Row("epochs=2.0", "trainer.epochs", {"trainer.epochs": 2.0}),
    Row("augment=1", "data.augment", {"data.augment": 1}),
    Row("max_steps=x", "trainer.max_steps", {"trainer.max_steps": "x"}),
    Row("k=true", "pipeline.k", {"pipeline.k": True}),
    Row("resume=1", "resume", {"resume": 1}),
    Row("section-not-a-group", "trainer", {"trainer": 5}),
    # numbers that pass their type but mean nothing (issue 27: they failed in a worker after 16-25 s)
    Row("lr=inf", "optim.lr", {"optim.lr": float("inf")}),
    Row("momentum=nan", "optim.momentum", {"optim.momentum": float("nan")}),
    Row("betas-inf", "optim.betas", {"optim.name": "adam", "optim.betas": (0.9, float("inf"))}),
    Row("timeout=inf", "dist.timeout_s", {"dist.timeout_s": float("inf")}),
    Row("lr=1e300", "optim.lr", {"optim.lr": 1e300}),
    Row("weight_decay=1e39", "optim.weight_decay", {"optim.weight_decay": 1e39}),
    Row("seed=-1", "trainer.seed", {"trainer.seed": -1}),
    Row("seed=2**32", "trainer.seed", {"trainer.seed": 2**32}),
    Row("threads>cores", "trainer.threads", {"trainer.threads": 100000}, cuda=(False, 0)),
    # unknown keys (Config.from_dict)
    Row("unknown-top-level", "bogus", raw={"bogus": 1}),
    Row("unknown-in-section", "trainer.epoch", raw={"trainer": {"epoch": 3}}),
    # model and data
    Row("model", "model.name", {"model.name": "resnet21"}),
    Row("data", "data.name", {"data.name": "mnist"}),
    Row("num_classes=1", "data.num_classes", {"data.num_classes": 1}),
    Row("cifar100-with-10-classes", "data.num_classes", {"data.name": "cifar100", "data.num_classes": 10}),
    Row("image_size=0", "data.image_size", {"data.image_size": 0}),
    Row("cifar-image_size", "data.image_size", {"data.name": "cifar10", "data.image_size": 64}),
    Row("train_size=0", "data.train_size", {"data.train_size": 0}),
    Row("test_size=0", "data.test_size", {"data.test_size": 0}),
    Row("train_subset=0", "data.train_subset", {"data.train_subset": 0}),
    Row("train_subset<0", "data.train_subset", {"data.train_subset": -5}),
    Row("test_subset=0", "data.test_subset", {"data.test_subset": 0}),
    Row("imagefolder-no-cache", "data.cache", {**IMAGEFOLDER, "data.cache": False}),
    Row("imagefolder-no-root", "data.root", {**IMAGEFOLDER, "data.root": None}),
    Row("imagefolder-root-missing", "data.root", {**IMAGEFOLDER, "data.root": "/nonexistent/imagenet"}),
    Row("imagefolder-root-without-val", "data.root", IMAGEFOLDER, folder=("train",)),
    # method
    Row("method", "method.name", {"method.name": "pipedream"}),
    Row("stash=weight", "method.stash", {"method.stash": "weight"}),
    Row("beta=0", "method.beta", {"method.beta": 0.0}),
    Row("beta=1.5", "method.beta", {"method.beta": 1.5}),
    Row("beta-with-ddg", "method.beta", {"method.name": "ddg", "method.beta": 0.5}),
    Row("accum_steps=0", "method.accum_steps", {"method.name": "adl", "method.accum_steps": 0}),
    Row("accum_steps-with-fdg", "method.accum_steps", {"method.accum_steps": 4}),
    Row("aux_channels=0", "method.aux_channels", {"method.name": "dgl", "method.aux_channels": 0}),
    # pipeline
    Row("k<1", "pipeline.k", {"pipeline.k": 0}),
    Row("replicas<1", "pipeline.replicas", {"pipeline.replicas": 0}),
    Row("k>blocks", "pipeline.k", {"pipeline.k": 8}),  # tiny has 7 blocks
    Row("cost-unknown", "pipeline.cost", {"pipeline.cost": "params"}),
    Row("split-not-a-list", "pipeline.split", {"pipeline.split": "half"}),
    Row("split-of-bools", "pipeline.split", {"pipeline.split": [True]}),
    Row("split-length", "pipeline.split", {"pipeline.k": 3, "pipeline.split": [2]}),
    Row("split-not-increasing", "pipeline.split", {"pipeline.k": 3, "pipeline.split": [4, 2]}),
    Row("split-out-of-range", "pipeline.split", {"pipeline.split": [9]}),
    Row("split-zero", "pipeline.split", {"pipeline.split": [0]}),
    Row("world!=k", "pipeline.k", {"pipeline.k": 3}, world=2),
    # trainer
    Row("batch=0", "trainer.batch_size", {"trainer.batch_size": 0}),
    Row("batch%replicas", "trainer.batch_size", {"pipeline.replicas": 3}, world=6),  # 16 over 3 replicas
    Row("eval_batch_size=0", "trainer.eval_batch_size", {"trainer.eval_batch_size": 0}),
    Row("epochs=0", "trainer.epochs", {"trainer.epochs": 0}),
    Row("max_steps=0", "trainer.max_steps", {"trainer.max_steps": 0}),
    Row("fp16", "trainer.precision", {"trainer.precision": "fp16"}),
    Row("nan_policy", "trainer.nan_policy", {"trainer.nan_policy": "ignore"}),
    Row("threads=-1", "trainer.threads", {"trainer.threads": -1}),
    Row("channels-last-unknown", "trainer.channels_last", {"trainer.channels_last": "nhwc"}),
    # optimizer and schedule
    Row("optim", "optim.name", {"optim.name": "lamb"}),
    Row("lr=0", "optim.lr", {"optim.lr": 0.0}),
    Row("momentum=-1", "optim.momentum", {"optim.momentum": -1}),
    Row("momentum=1", "optim.momentum", {"optim.momentum": 1.0}),
    Row("nesterov-without-momentum", "optim.nesterov", {"optim.nesterov": True, "optim.momentum": 0.0}),
    Row("weight_decay<0", "optim.weight_decay", {"optim.weight_decay": -1e-4}),
    Row("betas>=1", "optim.betas", {"optim.name": "adam", "optim.betas": (0.9, 1.0)}),
    Row("sched", "sched.name", {"sched.name": "linear"}),
    Row("milestones-decreasing", "sched.milestones", {"sched.milestones": [3, 2]}),
    Row("milestones-repeated", "sched.milestones", {"sched.milestones": [2, 2]}),
    Row("milestone-zero", "sched.milestones", {"sched.milestones": [0, 2]}),
    Row("gamma=0", "sched.gamma", {"sched.gamma": 0.0}),
    Row("warmup<0", "sched.warmup_epochs", {"sched.warmup_epochs": -1}),
    # processes
    Row("backend", "dist.backend", {"dist.backend": "mpi"}),
    Row("nccl-without-gpu", "dist.backend", {"dist.backend": "nccl"}, cuda=(False, 0)),
    Row("nccl-fewer-gpus-than-ranks-at-one-per-gpu", "dist.ranks_per_gpu", {"dist.backend": "auto", "dist.ranks_per_gpu": 1},
        cuda=(True, 1)),
    Row("timeout=0", "dist.timeout_s", {"dist.timeout_s": 0}),
    Row("timeout=1ms", "dist.timeout_s", {"dist.timeout_s": 0.001}),
    Row("max_restarts<0", "dist.max_restarts", {"dist.max_restarts": -1}),
    Row("ranks_per_gpu=0", "dist.ranks_per_gpu", {"dist.ranks_per_gpu": 0}),
    # outputs
    Row("keep=0", "checkpoint.keep", {"checkpoint.keep": 0}),
    Row("every_epochs=0", "checkpoint.every_epochs", {"checkpoint.every_epochs": 0}),
    Row("checkpoint-dir-absolute", "checkpoint.dir", {"checkpoint.dir": "/tmp/ckpt"}),
    Row("checkpoint-dir-outside", "checkpoint.dir", {"checkpoint.dir": "../other"}),
    Row("progress", "logging.progress", {"logging.progress": "sometimes"}),
    Row("log_every_steps=0", "logging.log_every_steps", {"logging.log_every_steps": 0}),
    Row("resume-path", "resume", {"resume": "/nonexistent/run"}),
    Row("progress_every_s<0", "logging.progress_every_s", {"logging.progress_every_s": -1.0}),
    Row("staleness_every_steps<0", "logging.staleness_every_steps", {"logging.staleness_every_steps": -1}),
    # models and text (each model is built on the meta device and given one sample of the data)
    Row("auto-split-weightless-blocks", "pipeline.k", {"model.name": "torchvision", "model.args": {"arch": "resnet18"},
                                                       "pipeline.k": 13}),
    Row("gpt-without-text", "model.name", {"model.name": "gpt"}),
    Row("custom-not-importable", "model._target_", {"model.name": "custom", "model._target_": "no_such_module.fn"}),
    Row("model-rejects-input", "model", {"model.name": "torchvision",
                                         "model.args": {"arch": "vit_b_16", "image_size": 64}}),
    Row("model-wrong-output", "model", {"model.name": "custom", "model._target_": f"{__name__}.two_logits"}),
    Row("text-tokens", "data.tokens", {"data.name": "text", "data.tokens": "word"}),
    Row("text-context=0", "data.context", {"data.name": "text", "data.context": 0}),
    Row("text-val_fraction=1", "data.val_fraction", {"data.name": "text", "data.val_fraction": 1.0}),
    Row("text-missing-file", "data.root", {"data.name": "text", "data.root": "/nonexistent/input.txt"}),
    Row("text-bpe-vocab_size=256", "data.vocab_size", {"data.name": "text", "data.tokens": "bpe", "data.vocab_size": 256}),
    Row("peak_tflops=0", "logging.peak_tflops", {"logging.peak_tflops": 0.0}),
    Row("eps=0", "optim.eps", {"optim.eps": 0.0}),
    Row("warmup_steps<0", "sched.warmup_steps", {"sched.warmup_steps": -1}),
    Row("min_lr_ratio>1", "sched.min_lr_ratio", {"sched.min_lr_ratio": 1.5}),
    # parity variants and correctors
    Row("variant-unknown", "model.variant", {"model.variant": "theirs"}),
    Row("variant-official-tiny", "model.variant", {"model.variant": "official"}),
    Row("std-two-values", "data.std", {"data.std": (0.2, 0.2)}),
    Row("corrector-unknown", "corrector.name", {"corrector.name": "magic"}),
    Row("corrector-with-bp", "corrector.name", {"corrector.name": "predict", "method.name": "bp"}),
    Row("predict-recompute", "corrector.name", {"corrector.name": "predict", "method.stash": "recompute"}),
    Row("predict-adam", "corrector.name", {"corrector.name": "predict", "optim.name": "adam", "optim.lr": 0.001,
                                            "optim.momentum": 0.0}),
    Row("dc_lambda<0", "corrector.dc_lambda", {"corrector.name": "dc", "corrector.dc_lambda": -1.0}),
    Row("dc_momentum=1", "corrector.dc_momentum", {"corrector.name": "dc", "corrector.dc_momentum": 1.0}),
    Row("anneal_steps=0", "corrector.anneal_steps", {"corrector.name": "lr_by_delay", "corrector.anneal_steps": 0}),
    # the other treatments of delayed gradients (issue 33)
    Row("anneal_fraction>1", "corrector.anneal_fraction", {"corrector.name": "lr_by_delay",
                                                           "corrector.anneal_fraction": 1.5}),
    Row("anneal_fraction-predict", "corrector.anneal_fraction", {"corrector.name": "predict",
                                                                 "corrector.anneal_fraction": 0.5}),
    Row("predict_adam-sgd", "corrector.name", {"corrector.name": "predict_adam"}),
    Row("predict_adam-recompute", "corrector.name", {"corrector.name": "predict_adam", "optim.name": "adam",
                                                     "method.stash": "recompute"}),
    Row("sync_warmup<0", "method.sync_warmup_steps", {"method.sync_warmup_steps": -1}),
    Row("sync_warmup-ddg", "method.sync_warmup_steps", {"method.name": "ddg", "method.sync_warmup_steps": 4}),
    Row("clip_norm=0", "optim.clip_norm", {"optim.clip_norm": 0.0}),
    Row("spike-bp", "optim.spike_compensation", {"optim.spike_compensation": True, "method.name": "bp"}),
    Row("spike-adamw", "optim.spike_compensation", {"optim.spike_compensation": True, "optim.name": "adamw"}),
    Row("spike-nesterov", "optim.spike_compensation", {"optim.spike_compensation": True, "optim.nesterov": True}),
    Row("delay_momentum=1", "optim.delay_momentum_max", {"optim.delay_momentum_max": 1.0}),
    # command-line keys that name nothing (issue 29: Hydra advised "+pipeline.kk=2")
    Row("typo-kk", "pipeline.kk", cli=("pipeline.kk=2",)),
    Row("target-without-custom", "model._target_", cli=("model=resnet20", "model._target_=pkg.module.fn")),
]


def two_logits(num_classes: int = 10) -> list[torch.nn.Module]:
    """A model=custom target whose output does not match the data (2 logits for 10 classes)."""
    return [torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2)]


def _apply(cfg: Config, overrides: dict[str, object]) -> None:
    for key, value in overrides.items():
        if "." in key:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
        else:
            setattr(cfg, key, value)


def _error(row: Row, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> ConfigError:
    """The ConfigError the row's configuration raises (fails the test if it raises none)."""
    with monkeypatch.context() as patch, pytest.raises(ConfigError) as err:
        if row.cuda is not None:
            patch.setattr(torch.cuda, "is_available", lambda: row.cuda[0])
            patch.setattr(torch.cuda, "device_count", lambda: row.cuda[1])
        if row.cli is not None:
            validation.check_overrides(list(row.cli))
        if row.raw is not None:
            Config.from_dict(row.raw)
        cfg = small_config()
        _apply(cfg, row.overrides)
        if row.folder is not None:
            root = tmp / row.id
            for sub in row.folder:
                (root / sub / "cls").mkdir(parents=True)
            cfg.data.root = str(root)
        validate(cfg, world_size=row.world)
        if row.cuda is not None:
            check_devices(cfg, cfg.world_size)
    return err.value


CHECKED = (validation.__file__, schema.__file__)  # Config.from_dict's checks are the schema's, the rest validation's


def _site(err: ConfigError) -> tuple[str, int]:
    """The file and line whose check raised ``err``."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename in CHECKED]
    frame = [f for f in frames if f.name != "_require"][-1]
    return frame.filename, frame.lineno


def _checks() -> dict[tuple[str, int], str]:
    """Every check: each ``_require(...)`` call and each ``raise ConfigError`` outside ``_require``, by file
    and line, with its source text."""
    found = {}
    for path in CHECKED:
        source = Path(path).read_text()
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, ast.FunctionDef) or fn.name == "_require":
                continue
            for node in ast.walk(fn):
                call = node.exc if isinstance(node, ast.Raise) else node
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) in ("_require", "ConfigError"):
                    found[path, node.lineno] = ast.get_source_segment(source, node).splitlines()[0]
    return found


def test_the_base_config_is_valid() -> None:
    validate(small_config(), world_size=2)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_config_is_rejected_naming_the_key(row: Row, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = str(_error(row, tmp_path, monkeypatch))
    assert message.startswith(f"{row.key}: "), message
    assert "\n" not in message


def test_every_check_has_a_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting a check fails its row above; adding one without a row fails here."""
    checks = _checks()
    assert len(checks) > 50, "found too few checks: is validation.py still written with _require?"
    tripped = {_site(_error(row, tmp_path, monkeypatch)) for row in ROWS}
    missing = {line: text for line, text in checks.items() if line not in tripped}
    assert not missing, f"checks without a row in ROWS: {missing}"


def test_resume_must_be_a_directory(tmp_path: Path) -> None:
    cfg = small_config()
    (tmp_path / "module0-replica0.pt").write_bytes(b"")
    cfg.resume = str(tmp_path / "module0-replica0.pt")
    with pytest.raises(ConfigError, match="^resume: .*checkpoint directory"):
        validate(cfg)


CLI_BASE = ["model=tiny", "data=synthetic", "logging.tensorboard=false"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("override,key", [  # one process each: the rest of the table runs in-process above
    ("pipeline.k=0", "pipeline.k"),
    pytest.param("method.beta=1.5", "method.beta", marks=pytest.mark.long),
    ("+trainer.bogus=1", "trainer.bogus"),
    pytest.param("resume=/nonexistent/run", "resume", marks=pytest.mark.long),
    ("trainer.seed=-1", "trainer.seed"),  # issue 27: these failed in a worker, naming no key
    pytest.param("optim.lr=inf", "optim.lr", marks=pytest.mark.long),
    pytest.param("optim.lr=1e300", "optim.lr", marks=pytest.mark.long),
    pytest.param("trainer.threads=100000", "trainer.threads", marks=pytest.mark.long),
    ("pipeline.kk=2", "pipeline.kk: unknown key; did you mean pipeline.k?"),  # issue 29: the exact line
    pytest.param("trainer.batchsize=8", "trainer.batchsize: unknown key; did you mean trainer.batch_size?", marks=pytest.mark.long),
    ("model._target_=pkg.module.fn", "model._target_: names the builder of your own model and needs model=custom"),
])
def test_cli_exits_2_with_one_line_before_starting_workers(override: str, key: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fdg_dist.train", *CLI_BASE, override, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fdg-train: invalid configuration: {key}"), proc.stderr
    assert not (run_dir / "train.log").exists()  # no worker started, no process group


@pytest.mark.timeout(60)
def test_a_sweep_over_an_invalid_seed_starts_no_job(tmp_path: Path) -> None:
    """Issue 27: ``-m trainer.seed=-1,0`` ran job 0 into a worker's failure, and job 1 never ran."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "fdg_dist.train", "-m", *CLI_BASE, "trainer.seed=-1,0",
                           f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "fdg-train: invalid configuration in sweep job 0 (model=tiny data=synthetic logging.tensorboard=False "
        "trainer.seed=-1): trainer.seed: -1 "
        f"must be in 0..{2**32 - 1} (2**32 - 1); no job was started"], proc.stderr
    assert not sweep.exists()


@pytest.mark.timeout(60)
def test_torchrun_world_size_mismatch_is_rejected_by_every_rank(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fdg_dist.train", *CLI_BASE, "pipeline.k=3", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=50)
    assert proc.returncode != 0
    assert proc.stderr.count("invalid configuration: pipeline.k: the launcher started 2 processes") == 2, proc.stderr
    assert not (tmp_path / "run" / "train.log").exists()


def test_official_variant_only_where_the_authors_have_it() -> None:

    cfg = small_config(**{"model.variant": "official"})
    with pytest.raises(ConfigError, match="model.variant: variant=official exists for resnet20"):
        validate(cfg)
    cfg.model.name = "resnet20"
    validate(cfg)
    cfg.model.variant = "paper"
    with pytest.raises(ConfigError, match="model.variant: 'paper' is not one of ours, official"):
        validate(cfg)


def test_valid_overrides_pass_the_key_check() -> None:
    """Groups, sweeps, builder arguments, Hydra's own keys, ``+``/``~`` and model=custom with its target."""
    validation.check_overrides(["model=custom", "model._target_=pkg.fn", "model.width=4", "method.beta=0.5,1",
                                "pipeline.k=range(2,5)", "hydra.run.dir=x", "hydra/launcher=slurm", "+trainer.x=1",
                                "~logging.trace", "resume=never", "experiment=quick_synthetic"])
