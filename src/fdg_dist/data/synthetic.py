"""Synthetic images: a learnable stand-in for CIFAR that needs no files (tests, CI, quick runs).

Must not read files or touch global random state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fdg_dist.config import DataConfig
from fdg_dist.data.images import ImageSet, channel_stats
from fdg_dist.data.seeds import generator


def load_synthetic(cfg: DataConfig, seed: int) -> tuple[ImageSet, ImageSet]:
    """Each class is a fixed random low-frequency colour pattern; samples add a random brightness and noise.

    Learnable by a small CNN in a few epochs yet not trivially (noise is comparable to the signal), and
    the 4x4 pattern survives the crop/flip augmentation well enough.
    """
    s = cfg.image_size
    patterns = torch.randn(cfg.num_classes, 3, 4, 4, generator=generator(seed, "synthetic", "classes"))
    patterns = F.interpolate(patterns, size=(s, s), mode="bilinear", align_corners=False)

    def draw(n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = generator(seed, "synthetic", split)
        labels = (torch.arange(n) % cfg.num_classes)[torch.randperm(n, generator=g)]
        brightness = torch.randn(n, 1, 1, 1, generator=g) * 15
        noise = torch.randn(n, 3, s, s, generator=g) * 40
        images = (128 + 40 * patterns[labels] + brightness + noise).round_().clamp_(0, 255)
        return images.to(torch.uint8).contiguous(), labels

    train_x, train_y = draw(cfg.train_size, "train")
    test_x, test_y = draw(cfg.test_size, "test")
    mean, std = channel_stats(train_x)
    classes = tuple(f"class{i}" for i in range(cfg.num_classes))
    return (ImageSet(train_x, train_y, cfg.num_classes, mean, std, classes),
            ImageSet(test_x, test_y, cfg.num_classes, mean, std, classes))
