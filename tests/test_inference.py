"""The exported model's metadata and transform (issue 16): ImageFolder class names in label order,
normalisation identical to training's, every usual image type accepted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fdg_dist import data, inference
from fdg_dist.config import Config, DataConfig
from fdg_dist.run import final_model


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_imagefolder_class_names_and_measured_normalisation_are_exported(tmp_path: Path) -> None:
    from torchvision.io import write_png

    for split in ("train", "val"):
        for k, cls in enumerate(("dog", "cat")):  # ImageFolder order is sorted: cat=0, dog=1
            (tmp_path / split / cls).mkdir(parents=True)
            write_png(torch.full((3, 8, 8), 40 + 100 * k, dtype=torch.uint8), str(tmp_path / split / cls / "0.png"))
    cfg = Config()
    cfg.model.name = "tiny"
    cfg.data = DataConfig(name="imagefolder", root=str(tmp_path), num_classes=2, image_size=8)
    train, test = data.load(cfg.data, 0)
    assert train.classes == test.classes == ("cat", "dog")
    assert train.labels.tolist() == [0, 1] and train.images[0].eq(140).all()  # "cat" holds the 140s
    meta = final_model.metadata(cfg, train)
    assert (meta["classes"], meta["num_classes"], meta["model"], meta["image_size"]) == (["cat", "dog"], 2, {"name": "tiny"}, 8)
    assert meta["mean"] == pytest.approx([90 / 255] * 3) and meta["std"] == pytest.approx([50 / 255] * 3)


def test_transform_equals_the_training_normalisation_for_every_input_type() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    transform = inference.Transform(mean, std, 4, ("a", "b"))
    batch = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    want = data.Normalize(mean, std)(batch)
    assert torch.equal(transform(batch), want)
    assert torch.equal(transform(batch[1]), want[1])  # one image in, one image out
    assert torch.equal(transform(batch[0].permute(1, 2, 0).numpy()), want[0])  # (H, W, C) array
    from PIL import Image

    assert torch.equal(transform(Image.fromarray(np.ascontiguousarray(batch[0].permute(1, 2, 0).numpy()))), want[0])
    torch.testing.assert_close(transform(batch.float() / 255), want)  # float in 0..1
    assert transform(torch.zeros(3, 9, 7, dtype=torch.uint8)).shape == (3, 4, 4)  # resized to image_size
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        transform(torch.zeros(1, 4, 4, dtype=torch.uint8))


def test_load_model_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="final_model.pt not found"):
        inference.load_model(tmp_path)


class _OpensAFile:
    """Unpickled, it creates ``path``: what a hostile state file would do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (str(self.path), "w")


def _run_dir_naming(tmp_path: Path, model: dict) -> Path:
    """A run directory as a stranger could hand it over: its final_model.json names ``model``."""
    import json

    run = tmp_path / "their_run"
    run.mkdir()
    torch.save({}, run / final_model.WEIGHTS)
    meta = {"format": final_model.FORMAT, "model": model, "num_classes": 2, "data": "synthetic", "classes": ["a", "b"],
            "image_size": 4, "mean": [0.5] * 3, "std": [0.25] * 3}
    (run / final_model.METADATA).write_text(json.dumps(meta))
    return run


@pytest.mark.parametrize("target,args", [
    ("torch.load", {"weights_only": False}),  # f: the payload, added below
    ("shutil.copyfile", {}),
])
def test_load_model_runs_no_code_a_custom_run_names_without_trust_code(tmp_path: Path, target: str,
                                                                       args: dict) -> None:
    """Issue 27: final_model.json of a model=custom run names a function, which load_model used to call."""
    payload, written = tmp_path / "state.pt", tmp_path / "written"
    torch.save(_OpensAFile(written), payload)
    args = {"f": str(payload), **args} if target == "torch.load" else {"src": str(payload), "dst": str(written)}
    run = _run_dir_naming(tmp_path, {"name": "custom", "_target_": target, **args})
    with pytest.raises(ValueError) as refused:
        inference.load_model(run)
    assert str(refused.value) == (
        f"{run / final_model.METADATA}: this model is built by calling {target!r}, code that the run directory "
        "names; load_model(..., trust_code=True) imports and runs it: do so only for a run directory you trust")
    assert not written.exists()


def test_load_model_builds_a_trusted_custom_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With trust_code=True the named function builds the model and the weights load into it."""
    (tmp_path / "two_blocks.py").write_text(
        "from torch import nn\n\ndef net(num_classes):\n"
        "    return [nn.Flatten(), nn.Linear(48, num_classes)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = _run_dir_naming(tmp_path, {"name": "custom", "_target_": "two_blocks.net"})
    weights = {"1.weight": torch.arange(96.0).view(2, 48), "1.bias": torch.tensor([1.0, -1.0])}
    torch.save(weights, run / final_model.WEIGHTS)
    model, transform = inference.load_model(run, trust_code=True)
    assert torch.equal(model.state_dict()["1.weight"], weights["1.weight"]) and transform.classes == ("a", "b")


@pytest.mark.parametrize("text,reason", [
    ('{"format": 2, "model": {"name": "tiny"}, "num_cl', "is damaged (JSONDecodeError: "),
    ('{"format": 2, "model": {"name": "tiny"}}', "lacks num_classes, mean, std, image_size, classes: not a "),
    ("[1, 2]", "lacks model, num_classes"),
])
def test_a_damaged_final_model_json_is_one_line_naming_it(tmp_path: Path, text: str, reason: str) -> None:
    run = _run_dir_naming(tmp_path, {"name": "tiny"})
    (run / final_model.METADATA).write_text(text)
    with pytest.raises(ValueError) as err:
        inference.load_model(run)
    assert str(err.value).startswith(f"{run / final_model.METADATA} ") and reason in str(err.value)
    assert "\n" not in str(err.value)
