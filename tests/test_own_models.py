"""Models from outside the zoo (issue 19): your own blocks (model=custom) and torchvision classifiers.

The README's own-model example runs exactly as printed; an own model trains by every method equal to its
reference; torchvision models are cut into blocks that compute what torchvision computes, train equal to
the reference, and export a ``final_model.pt`` that loads with ``strict=True`` into torchvision's
constructor; models that cannot be cut are refused with a message saying what to do.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import (
    assert_same_weights,
    data_parallel_reference,
    final_state,
    readme_example,
    reference_state,
    run_pipeline,
    small_config,
)
from emulated import merged_state, run_emulated
from torch import nn

from fdg_dist import models
from fdg_dist.config import Config, ConfigError, ModelConfig
from fdg_dist.run.trainer import build_stage, split_table
from fdg_dist.validation import validate

METHODS = ["fdg", "bp", "ddg", "fr", "dgl", "adl"]


@pytest.fixture
def my_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The README example's my_model.py, importable."""
    (tmp_path / "my_model.py").write_text(readme_example()[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_model", None)
    yield importlib.import_module("my_model")
    sys.modules.pop("my_model", None)


def _custom(target: str, **overrides: object) -> Config:
    cfg = small_config(**overrides)
    cfg.model = ModelConfig("custom", target, {"width": 32})
    return cfg


# ------------------------------------------------------------------------------------- your own model
@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_readme_own_model_example_runs_exactly_as_printed(tmp_path: Path) -> None:
    """my_model.py and the command, copied from the README, run from a fresh directory with the installed
    ``fdg-train``; final_model.pt loads strictly into the model the function returns."""
    code, command = readme_example()
    (tmp_path / "my_model.py").write_text(code)
    argv = shlex.split(command)
    assert argv[0] == "fdg-train"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run([str(Path(sys.executable).with_name("fdg-train")), *argv[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (final,) = tmp_path.glob("outputs/*/*/final_model.pt")
    sys.path.insert(0, str(tmp_path))
    try:
        mlp = importlib.import_module("my_model").mlp
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_model", None)
    model = nn.Sequential(*mlp(width=128))
    model.load_state_dict(torch.load(final, weights_only=True), strict=True)
    assert (final.parent / "result.json").exists() and "split of custom:my_model.mlp" in (final.parent / "train.log").read_text()


@pytest.mark.parametrize("method", METHODS)
def test_own_model_trains_by_every_method_equal_to_its_reference(my_model, method: str) -> None:
    extra = {"method.accum_steps": 3} if method == "adl" else {}
    cfg = _custom("my_model.mlp", **{"method.name": method, "pipeline.k": 3, "trainer.max_steps": 8, **extra})
    state = merged_state(run_emulated(cfg, evaluate=False))
    assert_same_weights(state, data_parallel_reference(cfg, 1) if method == "bp" else reference_state(cfg))
    nn.Sequential(*my_model.mlp(width=32)).load_state_dict(state, strict=True)  # gets num_classes=10 by default


def test_returned_sequential_keeps_its_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An nn.Sequential with named children: the model's keys are its own, the split table names the blocks."""
    (tmp_path / "named.py").write_text(
        "from collections import OrderedDict\nfrom torch import nn\n\n"
        "def net(num_classes):\n"
        "    return nn.Sequential(OrderedDict(stem=nn.Flatten(), hidden=nn.Linear(3 * 32 * 32, 16), act=nn.ReLU(),\n"
        "                                     head=nn.Linear(16, num_classes)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = small_config(**{"pipeline.k": 2, "trainer.max_steps": 3})
    cfg.model = ModelConfig("custom", "named.net")
    validate(cfg)
    built = models.build_model(cfg.model, 10)
    assert built.block_names() == ["stem", "hidden", "act", "head"]
    state = built.model_state(merged_state(run_emulated(cfg, evaluate=False)))
    assert list(state) == ["hidden.weight", "hidden.bias", "head.weight", "head.bias"]
    built.whole.load_state_dict(state, strict=True)
    assert "stem .. hidden" in split_table(cfg, [0, 2, 4])


class _Residual(nn.Module):
    """A model whose forward is not a chain of its children."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x) + self.a(x)


class _OwnForward(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def residual() -> nn.Module:
    return _Residual()


def own_forward() -> nn.Module:
    return _OwnForward(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def tied() -> list[nn.Module]:
    shared = nn.Linear(3 * 32 * 32, 3 * 32 * 32)
    return [nn.Flatten(), shared, nn.Sequential(shared, nn.Linear(3 * 32 * 32, 10))]


def five_classes() -> list[nn.Module]:
    return [nn.Flatten(), nn.Linear(3 * 32 * 32, 5)]


@pytest.mark.parametrize(("target", "args", "key", "says"), [
    ("test_own_models.residual", {}, "model", "list of blocks"),
    ("test_own_models.own_forward", {}, "model", "its own forward"),
    ("test_own_models.tied", {}, "model", "tied weights"),
    ("test_own_models.five_classes", {}, "model", r"returns \(1, 5\).*data.num_classes"),
    ("no_such_module.blocks", {}, "model._target_", "cannot be imported"),
    ("???", {}, "model._target_", "model=custom needs"),
])
def test_models_that_cannot_be_cut_are_refused_saying_what_to_do(target: str, args: dict, key: str, says: str) -> None:
    cfg = small_config()
    cfg.model = ModelConfig("custom", target, args)
    with pytest.raises(ConfigError, match=rf"^{key}.*{says}"):
        validate(cfg)


def test_builder_arguments_are_checked_by_name() -> None:
    cfg = small_config()
    cfg.model = ModelConfig("torchvision", args={"arch": "resnet18", "widht": 3})
    with pytest.raises(ConfigError, match=r"^model: torchvision's resnet18 does not take \['widht'\]"):
        validate(cfg)
    cfg.model = ModelConfig("resnet20", args={"width": 3})
    with pytest.raises(ConfigError, match=r"^model\.width: model=resnet20 takes no argument"):
        validate(cfg)
    cfg.model = ModelConfig("torchvision", args={"arch": "googlenet"})
    with pytest.raises(ConfigError, match=r"^model\.arch=googlenet: GoogLeNet cannot be cut.*resnet\*"):
        validate(cfg)
    cfg.model = ModelConfig("torchvision", args={"arch": "resnet5"})
    with pytest.raises(ConfigError, match=r"^model\.arch='resnet5' is not a torchvision classification model"):
        validate(cfg)


def test_a_module_without_weights_is_refused_naming_the_split(my_model) -> None:
    cfg = _custom("my_model.mlp", **{"pipeline.k": 2, "pipeline.split": [1]})  # module 0 = the Flatten alone
    with pytest.raises(ValueError, match=r"pipeline\.split.*module 0 \(blocks \[0, 1\)"):
        build_stage(cfg, 2, 0, torch.device("cpu"))


# ----------------------------------------------------------------------------------------- torchvision
ARCHS = ["resnet18", "resnet50", "mobilenet_v3_small", "vit_b_16", "swin_t"]


def _tv(arch: str, **overrides: object) -> Config:
    cfg = small_config(**{"data.train_size": 16, "trainer.batch_size": 8, "trainer.eval_batch_size": 8, **overrides})
    cfg.model = ModelConfig("torchvision", args={"arch": arch, "image_size": 32})
    return cfg


@pytest.mark.parametrize("arch", [*ARCHS, "mobilenet_v2", "efficientnet_b0", "densenet121", "convnext_tiny",
                                  "regnet_x_400mf", "shufflenet_v2_x0_5", "mnasnet0_5", "squeezenet1_1"])
def test_torchvision_blocks_compute_what_torchvision_computes(arch: str) -> None:
    """Same seed, same weights under the same keys; the chained blocks equal the model's forward."""
    torch.manual_seed(0)
    built = models.build_model(ModelConfig("torchvision", args={"arch": arch, "image_size": 32}), 10)
    torch.manual_seed(0)
    ref = torchvision.models.get_model(arch, weights=None, num_classes=10,
                                       **({"image_size": 32} if arch.startswith("vit") else {}))
    assert_same_weights(built.whole.state_dict(), ref.state_dict())
    assert_same_weights(built.model_state(nn.Sequential(*built.blocks).state_dict()), ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ref.eval()
    with torch.no_grad():
        y = x
        for block in built.blocks:
            y = block.eval()(y)
        assert torch.equal(y, ref(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_final_model_loads_strictly_into_torchvision(arch: str) -> None:
    """Two modules trained one step (bp: no stash, the smallest memory for vit_b_16); the merged weights under
    the model's keys load with strict=True into torchvision's constructor."""
    cfg = _tv(arch, **{"method.name": "bp", "pipeline.k": 2, "trainer.max_steps": 1})
    state = models.build_model(cfg.model, 10, device="meta").model_state(merged_state(run_emulated(cfg, evaluate=False)))
    model = torchvision.models.get_model(arch, weights=None, num_classes=10,
                                         **({"image_size": 32} if arch.startswith("vit") else {}))
    model.load_state_dict(state, strict=True)
    assert_same_weights(model.state_dict(), state)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_torchvision_resnet18_pipeline_equals_reference_and_exports_torchvision_keys(run_dir: Path) -> None:
    cfg = _tv("resnet18", **{"pipeline.k": 2, "trainer.max_steps": 3, "method.beta": 0.5})
    validate(cfg)
    run_pipeline(cfg, run_dir)
    final = final_state(run_dir)
    want = models.build_model(cfg.model, 10, device="meta").model_state(reference_state(cfg))
    assert_same_weights(final, want)
    torchvision.models.resnet18(num_classes=10).load_state_dict(final, strict=True)
    table = (run_dir / "train.log").read_text()  # the split table names torchvision's blocks
    assert re.search(r"conv1 \.\. layer\d\.\d\n.* layer\d\.\d \.\. fc\n", table)


def test_automatic_split_never_leaves_a_module_without_weights(my_model) -> None:
    """The MLP's Flatten has no weights: an automatic split keeps it with the next block, and asks for at most
    as many modules as there are blocks with weights."""
    cfg = _custom("my_model.mlp", **{"pipeline.k": 3})
    assert build_stage(cfg, 3, 0, torch.device("cpu"))[2].bounds == [0, 2, 3, 4]
    cfg.pipeline.k = 4
    with pytest.raises(ConfigError, match=r"^pipeline\.k: K=4 modules but an automatic split .* only 3"):
        validate(cfg)


def test_model_arguments_round_trip_through_the_workers_dict() -> None:
    """Builder arguments sit beside model.name as in the YAML; workers and checkpoints see the same form."""
    raw = {**small_config().to_dict(), "model": {"name": "custom", "_target_": "my_model.mlp", "width": 64}}
    cfg = Config.from_dict(raw)
    assert (cfg.model._target_, cfg.model.args, cfg.model.label) == ("my_model.mlp", {"width": 64}, "custom:my_model.mlp")
    assert cfg.to_dict()["model"] == raw["model"] and Config.from_dict(cfg.to_dict()) == cfg
    assert small_config().to_dict()["model"] == {"name": "tiny"}  # zoo models: as before
    with pytest.raises(ConfigError, match=r"data\.widht"):
        Config.from_dict({**raw, "data": {"widht": 3}})  # other sections still reject unknown keys
