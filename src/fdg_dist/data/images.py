"""Image datasets as uint8 (N, C, H, W) tensors in memory: CIFAR through torchvision's arrays, ImageFolder trees
decoded once, their per-channel statistics, seeded subsets, and the normalisation the network sees.

Must not know about batches, pipelines or process groups; only pipeline module 0 reads images.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import torch

from fdg_dist.config import DataConfig
from fdg_dist.data.seeds import generator
from fdg_dist.util.text import first_line

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W), contiguous
    labels: torch.Tensor  # int64 (N,)
    num_classes: int
    mean: tuple[float, ...]  # per channel, 0..1 units
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()  # name of label i; what an exported model's outputs mean

    def __len__(self) -> int:
        return len(self.labels)


def subset(data: ImageSet, n: int | None, seed: int, split: str) -> ImageSet:
    """The first n samples of a seeded class-interleaved shuffle, kept in dataset order.

    Interleaving (every class's 1st sample, then every class's 2nd, ...) keeps a small subset of a
    class-sorted ImageFolder balanced instead of all one class.
    """
    keep = _subset_indices(data.labels, n, seed, split)
    if keep is None:
        return data
    return ImageSet(data.images[keep].contiguous(), data.labels[keep].clone(), data.num_classes, data.mean, data.std,
                    data.classes)


def _subset_indices(labels: torch.Tensor, n: int | None, seed: int, split: str) -> torch.Tensor | None:
    """Sorted indices of the subset (None: keep all); depends only on the labels, so an ImageFolder can
    choose its subset before decoding anything."""
    if n is None or n >= len(labels):
        return None
    perm = torch.randperm(len(labels), generator=generator(seed, "subset", split))
    shuffled = labels[perm]
    rank = torch.empty_like(perm)
    for c in shuffled.unique():
        where = (shuffled == c).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    return perm[torch.argsort(rank, stable=True)[:n]].sort().values


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in 0..1 units, in chunks so a large set never exists as float all at once."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).div_(255).transpose(0, 1).flatten(1)
        total += x.sum(1)
        squares += x.square().sum(1)
    count = images.numel() // images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


class DataUnavailable(FileNotFoundError):
    """The dataset's files are not there and cannot be fetched; the message says what to do instead."""


def check_available(cfg: DataConfig, *, download: bool = True) -> None:
    """Fail in one line before any worker starts if a CIFAR root lacks its files; fetch them here, once, if
    ``data.download=true`` and ``download`` (under torchrun every process calls this: there module 0 fetches).

    ImageFolder roots are checked by ``validation.validate``; synthetic data needs no files.
    """
    if cfg.name not in CIFAR_STATS:
        return
    folder = _CIFAR_FOLDERS[cfg.name]
    if cfg.root in (None, ""):
        raise DataUnavailable(f"data.root: is required for data={cfg.name}: the folder that holds {folder}/")
    if (Path(cfg.root) / folder).is_dir():
        return
    if not cfg.download:
        raise DataUnavailable(f"data.root: {cfg.root!r} has no {folder}/; put the extracted CIFAR python version "
                              f"there (<data.root>/{folder}/), add data.download=true (needs internet), or train on "
                              "data=imagefolder data.root=DIR")
    if download:
        _cifar_splits(cfg)


def _cifar_splits(cfg: DataConfig) -> list:
    """torchvision's (train, test) CIFAR datasets, downloaded first if ``data.download=true``."""
    from torchvision import datasets

    folder = _CIFAR_FOLDERS[cfg.name]
    cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
    try:
        return [cls(cfg.root, train=train, download=cfg.download) for train in (True, False)]
    except (URLError, ConnectionError, TimeoutError) as e:  # offline: "Name or service not known"
        raise DataUnavailable(f"data.download: no network: put {folder} in data.root or use data=imagefolder "
                              f"({e})") from e
    except OSError as e:  # a read-only or full disk
        raise DataUnavailable(f"data.root: cannot fetch {cfg.name} into {cfg.root!r}: {e}") from e
    except RuntimeError as e:  # "Dataset not found or corrupted"
        raise DataUnavailable(f"data.root: {cfg.root!r}: {folder}/ is incomplete or corrupt ({e}); delete it and "
                              "run again with data.download=true, or put a complete copy there") from e


def load_cifar(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    """torchvision's CIFAR arrays used whole (no per-sample PIL)."""
    check_available(cfg, download=False)
    mean, std = CIFAR_STATS[cfg.name]
    return tuple(  # type: ignore[return-value]
        ImageSet(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(),
                 torch.tensor(d.targets, dtype=torch.int64), len(d.classes), mean, std, tuple(d.classes))
        for d in _cifar_splits(cfg))


def load_imagefolder(cfg: DataConfig, seed: int) -> tuple[ImageSet, ImageSet]:
    """train/ and val/ (or test/) decoded once into memory; mean/std measured on the (subset) training images.

    Only the subset's files are decoded (``load`` then finds nothing left to cut).  Measured statistics,
    not CIFAR constants, because a folder may hold anything (on the CIFAR-10 JPEG folder: mean within
    1e-4, std within 3e-3 of the CIFAR constants).
    """
    root = Path(cfg.root) if cfg.root else None
    if root is None or not (root / "train").is_dir():
        raise FileNotFoundError(f"data.root={cfg.root!r}: imagefolder needs data.root with train/ and val/ "
                                "(or test/), one subfolder per class")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if test_dir is None:
        raise FileNotFoundError(f"data.root={cfg.root!r}: no val/ or test/ folder next to train/")
    if not cfg.cache:
        raise NotImplementedError("data.cache=false (streaming from disk) is not supported yet; use "
                                  "data.cache=true, which needs all images in memory at one size")
    train_x, train_y, classes = _decode_folder(root / "train", cfg.train_subset, seed, "train")
    test_x, test_y, test_classes = _decode_folder(test_dir, cfg.test_subset, seed, "test")
    if test_classes != classes:
        raise ValueError(f"data.root={cfg.root!r}: {test_dir.name}/ has classes {test_classes}, "
                         f"train/ has {classes}")
    mean, std = channel_stats(train_x)
    return (ImageSet(train_x, train_y, len(classes), mean, std, tuple(classes)),
            ImageSet(test_x, test_y, len(classes), mean, std, tuple(classes)))


def _decode_folder(folder: Path, subset: int | None, seed: int, split: str
                   ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The images of an ImageFolder tree (or their subset) as one uint8 (N, 3, H, W) tensor, labels in
    ImageFolder order."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    classes, class_to_idx = find_classes(str(folder))
    _refuse_repeated_folders(folder)
    try:
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:  # torchvision names the empty classes but not the folder
        raise FileNotFoundError(f"data.root: {folder}: {e}") from e
    labels = torch.tensor([y for _, y in samples], dtype=torch.int64)
    keep = _subset_indices(labels, subset, seed, split)
    if keep is not None:
        samples, labels = [samples[i] for i in keep.tolist()], labels[keep]
    paths = [p for p, _ in samples]
    # torchvision 0.29 deprecates its decoders in favour of torchcodec (not a dependency here); one
    # warning per file would drown the log.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        images = _decode_files(paths)
    shapes = Counter(tuple(img.shape) for img in images)
    if len(shapes) > 1:
        common = shapes.most_common(1)[0][0]
        odd, shape = next((p, tuple(img.shape)) for p, img in zip(paths, images) if tuple(img.shape) != common)
        counts = ", ".join(f"{n} of {_size(k)}" for k, n in shapes.most_common())
        raise ValueError(f"data.root: {_named(odd)} is {_size(shape)}, unlike the others under {folder} ({counts}); "
                         "data.cache=true stacks all images into one tensor: resize or remove the odd ones")
    return torch.stack(images), labels, classes


def _refuse_repeated_folders(folder: Path) -> None:
    """Refuse a folder reached twice (a symbolic link back into its own tree, or a second link to a folder
    already read): torchvision follows links without noticing, and every image under it would count again,
    once per turn of the loop, as if the class had that many images."""
    seen = {os.path.realpath(folder)}
    for parent, subfolders, _ in os.walk(folder, followlinks=True):
        for name in list(subfolders):
            path = os.path.join(parent, name)
            real = os.path.realpath(path)
            if real in seen:
                raise ValueError(f"data.root: {path} leads to {real}, a folder already read (a symbolic link loop "
                                 "or a second link to one folder): its images would count twice; remove the link")
            seen.add(real)


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[-2]}x{shape[-1]}"


def _named(path: str) -> str:
    """A file as an error names it: the path and the class folder (its label)."""
    return f"{path} (class folder '{Path(path).parent.name}')"


def _decode_files(paths: list[str]) -> list[torch.Tensor]:
    """Decode as RGB uint8 (C, H, W); JPEGs (the common case) in one batched call, anything else one by one.

    A file that cannot be read or decoded is named (a batch that fails is decoded again file by file to
    find it). Serial on purpose: on the 2-core box neither two threads nor a batched call with 2 intra-op
    threads beat one thread (45k CIFAR JPEGs: ~1 s reading, ~1.5 s decoding).
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
    from torchvision.transforms.v2.functional import to_dtype

    def one(path: str, data: torch.Tensor) -> torch.Tensor:
        try:
            image = decode_image(data, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"data.root: cannot decode {_named(path)}: {first_line(str(e))}; "
                             "replace or remove it") from e
        # 16-bit PNGs decode as uint16: keep their 8 high bits, as every other image is 0..255
        return to_dtype(image, torch.uint8, scale=True) if image.dtype == torch.uint16 else image

    def read(path: str) -> torch.Tensor:
        try:
            if os.path.getsize(path) == 0:
                raise ValueError(f"data.root: cannot decode {_named(path)}: the file is empty; replace or remove it")
            return read_file(path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"data.root: cannot read {_named(path)}: {first_line(str(e))}") from e

    raw = [read(p) for p in paths]
    is_jpeg = [r[:2].tolist() == [0xFF, 0xD8] for r in raw]
    jpeg_paths = [p for p, j in zip(paths, is_jpeg) if j]
    jpeg_raw = [r for r, j in zip(raw, is_jpeg) if j]
    try:
        decoded = decode_jpeg(jpeg_raw, mode=ImageReadMode.RGB) if jpeg_raw else []
    except RuntimeError:  # one damaged JPEG fails the batch: find it
        decoded = [one(p, r) for p, r in zip(jpeg_paths, jpeg_raw)]
    jpegs = iter(decoded)
    return [next(jpegs) if j else one(p, r) for p, r, j in zip(paths, raw, is_jpeg)]


class Normalize:
    """uint8 images (0..255) to the network's input, (x/255 - mean)/std per channel.

    The one definition that training, evaluation and an exported model's transform share, so a model
    evaluated outside the pipeline sees bit-identical inputs.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu") -> None:
        shape = (1, -1, 1, 1)
        # (x/255 - mean)/std = x * scale - shift, with scale and shift computed once on the target device
        s = torch.tensor(std, dtype=torch.float32)
        self.scale = (1 / (255 * s)).view(shape).to(device)
        self.shift = (torch.tensor(mean, dtype=torch.float32) / s).view(shape).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A (N, C, H, W) batch; float input is taken as already in 0..255 units (and left unchanged)."""
        return x.to(torch.float32, copy=True).mul_(self.scale).sub_(self.shift)
