"""The exported model's metadata and transform (issue 16): ImageFolder class names in label order,
normalisation identical to training's, every usual image type accepted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fdg_dist import data, inference
from fdg_dist.config import Config, DataConfig


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
    meta = inference.metadata(cfg, train)
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
