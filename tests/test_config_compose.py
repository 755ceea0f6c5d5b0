"""Hydra composition of ``conf/``: every group option and every experiment preset composes, converts to a
``Config`` and validates, the defaults are the paper's setting, and each preset is the table row its name
says.  Composition bugs (a typo in a YAML key, a preset that silently keeps the default model) would
otherwise only show up when a long run starts."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, readme_example, write_text
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fdg_dist import models
from fdg_dist.cli import config_from_hydra  # also registers the fdg_run_id resolver
from fdg_dist.config import Config, ConfigError
from fdg_dist.config.paper import PAPER_ROWS
from fdg_dist.validation import validate

CONF = REPO / "conf"
GROUPS = ("model", "data", "method", "corrector", "optim", "sched")
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
ROW = re.compile(r"(?P<data>cifar10|cifar100)_(?P<model>.+)_k(?P<k>\d+)")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """An ImageFolder root that passes validation (train/ and val/); no images are read by ``validate``."""
    for split in ("train", "val"):
        (tmp_path / split / "cls").mkdir(parents=True)
    return tmp_path


@pytest.fixture(scope="module")
def hydra_conf() -> Iterator[None]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


@pytest.fixture
def partners(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Options that only validate beside another: a language model and its text, an own model's function."""
    text = write_text(tmp_path / "input.txt")
    (tmp_path / "my_model.py").write_text(readme_example()[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    corpus = [f"data.root={text}", "data.tokens=char", f"data.num_classes={len(set(text.read_text()))}",
              "data.context=16"]
    return {"model=gpt": ["data=text", *corpus], "data=text": ["model=gpt", *corpus[1:], f"data.root={text}"],
            "model=custom": ["model._target_=my_model.mlp"], "corrector=predict_adam": ["optim=adamw"]}


@pytest.fixture
def composed(hydra_conf: None, image_root: Path, partners: dict[str, list[str]]) -> Callable[..., Config]:
    """``compose`` → ``Config`` → ``validate``, as ``fdg-train`` does; imagefolder gets a valid root, options
    that need a partner get it."""

    def run(*overrides: str) -> Config:
        overrides = tuple(o for first in overrides for o in (first, *partners.get(first, [])))
        raw = compose("train", overrides=list(overrides), return_hydra_config=False)
        cfg = config_from_hydra(raw)
        if cfg.data.name == "imagefolder" and not any(o.startswith("data.root=") for o in overrides):
            cfg.data.root = str(image_root)
        validate(cfg)
        return cfg

    return run


def test_every_group_has_options() -> None:
    for group in (*GROUPS, "experiment"):
        assert options(group), f"conf/{group}/ is empty"
    assert set(options("model")) == set(models.names()), "conf/model/ and the model zoo disagree"


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_group_option_composes_and_validates(composed: Callable[..., Config], group: str, option: str) -> None:
    cfg = composed(f"{group}={option}")
    assert getattr(cfg, group).name == option


def test_imagefolder_needs_a_root(hydra_conf: None) -> None:
    cfg = config_from_hydra(compose("train", overrides=["data=imagefolder", "data.root=/nonexistent"]))
    with pytest.raises(ConfigError, match="data.root"):
        validate(cfg)


def test_defaults_are_the_papers_setting(composed: Callable[..., Config]) -> None:
    cfg = composed()
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert not cfg.optim.nesterov
    assert (cfg.trainer.batch_size, cfg.trainer.epochs) == (128, 300)
    assert (cfg.sched.name, cfg.sched.milestones, cfg.sched.gamma, cfg.sched.warmup_epochs) == (
        "multistep", [150, 225, 275], 0.1, 0)
    assert (cfg.model.name, cfg.data.name, cfg.method.name, cfg.method.beta) == ("resnet56", "cifar10", "fdg", 1.0)
    assert (cfg.pipeline.k, cfg.pipeline.split, cfg.trainer.precision) == (2, "auto", "fp32")
    assert cfg.experiment is None


def test_speed_settings_default_to_auto_and_take_explicit_values(composed: Callable[..., Config]) -> None:
    """``auto`` (resolved per device by ``run.devices`` in the worker) is what users run; an explicit value
    on the command line arrives typed (a YAML bool) and validates."""
    cfg = composed()
    assert (cfg.trainer.channels_last, cfg.pipeline.cost) == ("auto", "auto")
    cfg = composed("trainer.channels_last=false", "pipeline.cost=flops")
    assert (cfg.trainer.channels_last, cfg.pipeline.cost) == (False, "flops")
    assert composed("trainer.channels_last=true", "pipeline.cost=time").trainer.channels_last is True


def test_the_papers_rows_have_presets() -> None:
    assert set(PAPER_ROWS) | {"quick_synthetic", "budget_cifar10_resnet20", "budget_long_cifar10_resnet20",
                              "shakespeare_char_gpt", "shakespeare_char_cpu"} == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PAPER_ROWS))
def test_preset_is_its_table_row(composed: Callable[..., Config], name: str) -> None:
    cfg = composed(f"experiment={name}")
    row = ROW.fullmatch(name)
    assert row is not None, f"preset name {name!r} is not <data>_<model>_k<K>"
    assert cfg.experiment == name
    assert (cfg.data.name, cfg.data.num_classes) == (row["data"], 100 if row["data"] == "cifar100" else 10)
    assert (cfg.model.name, cfg.pipeline.k) == (row["model"], int(row["k"]))
    paper = PAPER_ROWS[name]
    assert (cfg.method.name, cfg.method.beta, cfg.corrector.name) == ("fdg", paper.beta, "none")
    if not name.endswith("wrn28_10_k4"):  # the preset's comment quotes its row: stale numbers fail here
        head = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()[1]
        assert f"{paper.fdg_beta1:.2f}% (β=1) / {paper.fdg_best:.2f}% (β={paper.beta:g})" in head, head
    # A row changes only what defines it; the training recipe stays the paper's.
    assert (cfg.optim.lr, cfg.trainer.batch_size, cfg.trainer.epochs, cfg.sched.milestones) == (
        0.1, 128, 300, [150, 225, 275])


def test_quick_synthetic_is_small(composed: Callable[..., Config]) -> None:
    cfg = composed("experiment=quick_synthetic")
    assert (cfg.experiment, cfg.model.name, cfg.data.name, cfg.trainer.epochs) == ("quick_synthetic", "tiny",
                                                                                   "synthetic", 2)
    assert not cfg.checkpoint.enabled


def test_command_line_overrides_a_preset(composed: Callable[..., Config]) -> None:
    cfg = composed("experiment=cifar10_resnet56_k2", "pipeline.k=3", "method.beta=1.0", "method=bp")
    assert (cfg.pipeline.k, cfg.method.name, cfg.method.beta, cfg.model.name) == (3, "bp", 1.0, "resnet56")


RECIPES = {"near_bp_k2": (2, "fdg", "lr_by_delay", 1), "near_bp_k4": (4, "adl", "none", 4)}  # K, method, corrector, M


@pytest.mark.parametrize("preset", ["budget_cifar10_resnet20", "budget_long_cifar10_resnet20"])
def test_a_recipe_applies_on_top_of_a_preset(composed: Callable[..., Config], preset: str) -> None:
    """Each recipe sets what docs/budget-reproduction.md measured (the K, the method, β = 1, Nesterov) and keeps
    the preset's model, data and budget, and a step's batch (ADL: M micro-batches of 128/M); the command line
    still wins over both."""
    assert sorted(RECIPES) == options("recipe")
    base = composed(f"experiment={preset}")
    for name, (k, method, corrector, accum) in RECIPES.items():
        cfg = composed(f"experiment={preset}", f"recipe={name}")
        assert (cfg.recipe, cfg.pipeline.k, cfg.method.name, cfg.corrector.name) == (name, k, method, corrector)
        assert (cfg.method.beta, cfg.optim.nesterov, cfg.method.accum_steps) == (1.0, True, accum)
        assert cfg.trainer.batch_size * accum == base.trainer.batch_size == 128
        assert (cfg.model, cfg.data, cfg.trainer.epochs, cfg.sched) == (base.model, base.data, base.trainer.epochs,
                                                                        base.sched)
        assert composed(f"experiment={preset}", f"recipe={name}", "pipeline.k=3").pipeline.k == 3


@pytest.mark.parametrize("budget,preset", [("short", "budget_cifar10_resnet20"), ("long", "budget_long_cifar10_resnet20")])
def test_every_parity_sweep_point_composes_and_validates(composed: Callable[..., Config], budget: str,
                                                        preset: str) -> None:
    """benchmarks/parity_sweep.sh runs each line as ``experiment=PRESET OVERRIDES``: a typo would fail minutes in."""
    lines = (REPO / "benchmarks" / f"parity_points_{budget}.txt").read_text().splitlines()
    points = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    assert len({name for name, *_ in points}) == len(points) >= 3
    for _, *overrides in points:
        composed(f"experiment={preset}", *overrides)


def test_run_dir_resolvers(hydra_conf: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the hydra node (as the app sees it) the custom resolver gives one timestamped run dir, shared by
    every rank under torchrun; Hydra writes no ``.hydra/`` itself (fdg-train does, once the run is accepted)."""
    for var in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(var, raising=False)
    raw: DictConfig = compose("train", overrides=["experiment=quick_synthetic"], return_hydra_config=True)
    HydraConfig().set_config(raw)
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", raw.hydra.run.dir)
    assert raw.hydra.output_subdir is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("RANK", "1")
    assert raw.hydra.run.dir == "outputs/torchrun-abc"


def test_budget_preset_is_the_readme_recipe(composed: Callable[..., Config]) -> None:
    cfg = composed("experiment=budget_cifar10_resnet20", "pipeline.k=3", "corrector=predict")
    assert (cfg.model.name, cfg.data.name, cfg.data.train_subset, cfg.data.test_subset) == (
        "resnet20", "imagefolder", 4096, 2500)
    assert (cfg.sched.name, cfg.trainer.epochs, cfg.optim.lr, cfg.trainer.batch_size) == ("cosine", 5, 0.1, 128)
    assert (cfg.pipeline.k, cfg.corrector.name, cfg.method.beta, cfg.pipeline.cost) == (3, "predict", 1.0, "flops")
    assert cfg.logging.staleness_every_steps == 10


def test_long_budget_preset_is_the_whole_train_split(composed: Callable[..., Config]) -> None:
    cfg = composed("experiment=budget_long_cifar10_resnet20", "pipeline.k=4")
    assert (cfg.model.name, cfg.data.name, cfg.data.train_subset, cfg.data.test_subset) == (
        "resnet20", "imagefolder", None, None)
    assert (cfg.sched.name, cfg.trainer.epochs, cfg.optim.lr, cfg.pipeline.cost) == ("cosine", 5, 0.1, "flops")


def test_delay_treatments_compose_from_the_command_line(composed: Callable[..., Config]) -> None:
    """Every treatment of issue 33 is a key of its own section: they combine with any corrector and each other."""
    cfg = composed("corrector=lr_by_delay", "corrector.anneal_fraction=0.25", "optim.spike_compensation=true",
                   "optim.delay_momentum_max=0.99", "optim.clip_norm=1.0", "method.sync_warmup_steps=16")
    assert (cfg.corrector.name, cfg.corrector.anneal_fraction, cfg.optim.spike_compensation) == ("lr_by_delay", 0.25, True)
    assert (cfg.optim.delay_momentum_max, cfg.optim.clip_norm, cfg.method.sync_warmup_steps) == (0.99, 1.0, 16)
    cfg = composed("optim=adamw", "corrector=predict_adam", "optim.clip_norm=1.0", "method=adl",
                   "method.sync_warmup_steps=8")
    assert (cfg.corrector.name, cfg.optim.clip_norm, cfg.method.sync_warmup_steps) == ("predict_adam", 1.0, 8)
