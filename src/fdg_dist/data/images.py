"""Datasets as in-memory tensors, and reproducible epochs of batches over them.

Images are uint8 (N, C, H, W) tensors; text (``data=text``) is one token stream cut into sequences of
``data.context`` tokens, each paired with the same tokens shifted by one (next-token prediction).
Only pipeline module 0 reads images or text.  Every random choice (epoch order, crop offsets, flips, subsets) is
drawn from a generator seeded by a stable hash of (seed, epoch, batch index), never from global RNG
state, so batch b of epoch e is the same tensor whether the run started at epoch 0, resumed from a
checkpoint, or is replayed by the single-process reference simulation.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F

from fdg_dist.config import DataConfig
from fdg_dist.util.text import first_line

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
PAD = 4  # the paper's augmentation: zero-pad 4 pixels, random crop back to size, random h-flip


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


@dataclass
class TextSet:
    """A token stream read as sequences of ``context`` tokens: sequence i is tokens [o + iT, o + (i+1)T) and its
    targets the tokens one further, for an epoch's offset o in [0, T) (so training sees every cut)."""

    tokens: torch.Tensor  # uint8 (vocabulary ≤ 256) or int32, one dimension
    context: int
    vocab: list[str] | None  # character-level: the characters, in id order; byte-level: None

    def __len__(self) -> int:
        """Sequences per epoch, the same for every offset."""
        return max((len(self.tokens) - self.context) // self.context, 0)

    @property
    def num_classes(self) -> int:
        return 256 if self.vocab is None else len(self.vocab)

    def sequences(self, idx: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, next tokens) of sequences ``idx`` at ``offset``, each int64 (len(idx), context)."""
        starts = offset + idx * self.context
        window = self.tokens[starts[:, None] + torch.arange(self.context + 1)].long()
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


@dataclass(frozen=True)
class SampleSpec:
    """One sample as the model sees it: input shape and dtype, and the shape of its labels."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    label_shape: tuple[int, ...] = ()


def sample_spec(cfg: DataConfig) -> SampleSpec:
    """Images: float (3, S, S) with one label; text: int64 tokens (T,) with T next-token labels."""
    if cfg.name == "text":
        return SampleSpec((cfg.context,), torch.int64, (cfg.context,))
    return SampleSpec((3, cfg.image_size, cfg.image_size), torch.float32)


def describe(data: ImageSet | TextSet) -> str:
    if isinstance(data, TextSet):
        kind = "bytes" if data.vocab is None else f"characters ({data.num_classes} distinct)"
        return f"{len(data.tokens)} {kind}, {len(data)} sequences of {data.context}"
    n, c, h, w = data.images.shape
    return f"{n} images {c}x{h}x{w}, {data.num_classes} classes"


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed from the parts; unlike ``hash()`` it is identical across processes and Python runs."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*parts))


# ------------------------------------------------------------------------------------------------ loading
def load(cfg: DataConfig, seed: int) -> tuple[ImageSet, ImageSet] | tuple[TextSet, TextSet]:
    """(train, test) for ``cfg.name``, each cut to ``cfg.train_subset`` / ``cfg.test_subset`` if set."""
    if cfg.name == "text":
        return _text(cfg)
    if cfg.name == "synthetic":
        train, test = _synthetic(cfg, seed)
    elif cfg.name in CIFAR_STATS:
        train, test = _cifar(cfg)
    elif cfg.name == "imagefolder":
        train, test = _imagefolder(cfg, seed)
    else:
        raise ValueError(f"data.name: unknown dataset {cfg.name!r}")
    for split in (train, test):
        if split.num_classes != cfg.num_classes:
            raise ValueError(f"data.num_classes is {cfg.num_classes} but {cfg.name} has {split.num_classes} classes")
        if split.images.shape[-2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"data.image_size is {cfg.image_size} but {cfg.name} images are "
                             f"{tuple(split.images.shape[-2:])}; resize the images or set data.image_size")
    if cfg.std is not None:  # e.g. the FDG authors' CIFAR-10 std (0.2023, 0.1994, 0.2010)
        train, test = (replace(split, std=tuple(cfg.std)) for split in (train, test))
    return _subset(train, cfg.train_subset, seed, "train"), _subset(test, cfg.test_subset, seed, "test")


def _subset(data: ImageSet, n: int | None, seed: int, split: str) -> ImageSet:
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
    perm = torch.randperm(len(labels), generator=_generator(seed, "subset", split))
    shuffled = labels[perm]
    rank = torch.empty_like(perm)
    for c in shuffled.unique():
        where = (shuffled == c).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    return perm[torch.argsort(rank, stable=True)[:n]].sort().values


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def _synthetic(cfg: DataConfig, seed: int) -> tuple[ImageSet, ImageSet]:
    """Each class is a fixed random low-frequency colour pattern; samples add a random brightness and noise.

    Learnable by a small CNN in a few epochs yet not trivially (noise is comparable to the signal), and
    the 4x4 pattern survives the crop/flip augmentation well enough.
    """
    s = cfg.image_size
    patterns = torch.randn(cfg.num_classes, 3, 4, 4, generator=_generator(seed, "synthetic", "classes"))
    patterns = F.interpolate(patterns, size=(s, s), mode="bilinear", align_corners=False)

    def draw(n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(seed, "synthetic", split)
        labels = (torch.arange(n) % cfg.num_classes)[torch.randperm(n, generator=g)]
        brightness = torch.randn(n, 1, 1, 1, generator=g) * 15
        noise = torch.randn(n, 3, s, s, generator=g) * 40
        images = (128 + 40 * patterns[labels] + brightness + noise).round_().clamp_(0, 255)
        return images.to(torch.uint8).contiguous(), labels

    train_x, train_y = draw(cfg.train_size, "train")
    test_x, test_y = draw(cfg.test_size, "test")
    mean, std = _channel_stats(train_x)
    classes = tuple(f"class{i}" for i in range(cfg.num_classes))
    return (ImageSet(train_x, train_y, cfg.num_classes, mean, std, classes),
            ImageSet(test_x, test_y, cfg.num_classes, mean, std, classes))


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


def _cifar(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    """torchvision's CIFAR arrays used whole (no per-sample PIL)."""
    check_available(cfg, download=False)
    mean, std = CIFAR_STATS[cfg.name]
    return tuple(  # type: ignore[return-value]
        ImageSet(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(),
                 torch.tensor(d.targets, dtype=torch.int64), len(d.classes), mean, std, tuple(d.classes))
        for d in _cifar_splits(cfg))


def _imagefolder(cfg: DataConfig, seed: int) -> tuple[ImageSet, ImageSet]:
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
    mean, std = _channel_stats(train_x)
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


def text_tokens(cfg: DataConfig) -> tuple[torch.Tensor, list[str] | None]:
    """The file ``data.root`` as token ids, and its vocabulary (None for bytes), checked against the config.

    Character level: the file's distinct characters, sorted, over the whole file (train and validation).
    """
    path = Path(cfg.root) if cfg.root else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"data.root: {cfg.root!r} is not a file; data=text needs data.root to be a text file")
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"data.root: {cfg.root!r} is empty; data=text trains on the text of that file")
    if cfg.tokens == "byte":
        ids, vocab = torch.frombuffer(bytearray(raw), dtype=torch.uint8), None
        size = 256
    else:
        try:
            codes = np.frombuffer(raw.decode("utf-8").encode("utf-32-le"), dtype=np.uint32)
        except UnicodeDecodeError as e:
            raise ValueError(f"data.root: {cfg.root!r} is not UTF-8 text ({e}); use data.tokens=byte") from None
        points, inverse = np.unique(codes, return_inverse=True)
        vocab = [chr(c) for c in points]
        size = len(vocab)
        ids = torch.from_numpy(inverse.astype(np.uint8 if size <= 256 else np.int32))
    if cfg.num_classes != size:
        what = "bytes" if vocab is None else f"distinct characters in {path.name}"
        raise ValueError(f"data.num_classes={cfg.num_classes} but the vocabulary is {size} {what}; "
                         f"set data.num_classes={size}")
    return ids, vocab


def _text(cfg: DataConfig) -> tuple[TextSet, TextSet]:
    """The first (1 - val_fraction) of the file trains, the rest validates (file order, no shuffling);
    ``train_subset``/``test_subset`` keep the first N sequences of each."""
    ids, vocab = text_tokens(cfg)
    cut = int(len(ids) * (1 - cfg.val_fraction))
    sets = []
    for part, subset, split in ((ids[:cut], cfg.train_subset, "training"), (ids[cut:], cfg.test_subset, "validation")):
        if subset is not None:
            part = part[:(subset + 1) * cfg.context]
        text = TextSet(part.clone(), cfg.context, vocab)
        if len(text) < 1:
            raise ValueError(f"data.context={cfg.context}: the {split} text ({len(part)} tokens of {cfg.root}) holds "
                             f"no sequence of that length plus one; lower data.context or data.val_fraction")
        sets.append(text)
    return sets[0], sets[1]


# ------------------------------------------------------------------------------------------------ batching
def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Global batch sizes of one epoch over n samples: full batches, then a partial one (no drop_last)."""
    full, rest = divmod(n, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def shard_bounds(n: int, replica: int, replicas: int) -> tuple[int, int]:
    """[start, stop) of replica's contiguous slice of a global batch of n.

    A full batch splits exactly; a partial last batch splits as evenly as possible, the first n % R
    replicas taking one sample more (a last batch smaller than R leaves some replicas an empty slice).
    """
    base, extra = divmod(n, replicas)
    start = replica * base + min(replica, extra)
    return start, start + base + (replica < extra)


def shard_size(n: int, per_replica: int, replica: int, replicas: int) -> int:
    """Size of replica's slice of a global batch of n (``per_replica`` = batch_size // R, checked)."""
    if n > per_replica * replicas:
        raise ValueError(f"global batch of {n} exceeds {replicas} replicas x {per_replica}")
    start, stop = shard_bounds(n, replica, replicas)
    return stop - start


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


class Batches:
    """One epoch at a time of (x, y) batches; order and augmentation depend only on (seed, epoch, batch).

    Images: normalised float (n, 3, H, W) and labels (n,); text: tokens and next tokens, int64 (n, T), the
    training epoch's sequence offset drawn from (seed, epoch), 0 for evaluation.
    """

    def __init__(self, data: ImageSet | TextSet, batch_size: int, *, train: bool, augment: bool, seed: int,
                 device: torch.device | str = "cpu", shard: tuple[int, int] = (0, 1)) -> None:
        replica, replicas = shard
        if batch_size % replicas:
            raise ValueError(f"trainer.batch_size={batch_size} must divide by the {replicas} data-parallel replicas")
        if not 0 <= replica < replicas:
            raise ValueError(f"shard {shard}: replica index out of range")
        self.data, self.batch_size, self.train, self.augment, self.seed = data, batch_size, train, augment, seed
        self.device = torch.device(device)
        self.replica, self.replicas = replica, replicas
        self._normalize = None if isinstance(data, TextSet) else Normalize(data.mean, data.std, self.device)

    def batch_sizes(self) -> list[int]:
        return [shard_size(n, self.batch_size // self.replicas, self.replica, self.replicas)
                for n in batch_sizes(len(self.data), self.batch_size)]

    def num_batches(self) -> int:
        return len(batch_sizes(len(self.data), self.batch_size))

    def order(self, epoch: int) -> torch.Tensor:
        """Sample indices of the epoch: a seeded permutation when training, dataset order otherwise."""
        n = len(self.data)
        return torch.randperm(n, generator=_generator(self.seed, "order", epoch)) if self.train else torch.arange(n)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches start_batch.. of the epoch; batch b is the same tensor whichever batch iteration began at."""
        order = self.order(epoch)
        cuda = self.device.type == "cuda"
        text = isinstance(self.data, TextSet)
        offset = self._offset(epoch) if text else 0
        for b, n in enumerate(batch_sizes(len(self.data), self.batch_size)):
            if b < start_batch:
                continue
            lo, hi = shard_bounds(n, self.replica, self.replicas)
            idx = order[b * self.batch_size + lo:b * self.batch_size + hi]
            if text:
                x, y = self.data.sequences(idx, offset)
            else:
                x, y = self.data.images[idx], self.data.labels[idx]
                if self.train and self.augment:
                    x = augment(x, *self._draw(epoch, b, n, lo, hi))
            if cuda:
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=cuda)
            if not text:
                x = self._normalize(x)
            yield x, y.to(self.device, non_blocking=cuda)

    def _offset(self, epoch: int) -> int:
        """Where a text epoch's sequences start: random in [0, context) when training, so every epoch cuts the
        stream elsewhere; 0 for evaluation."""
        if not self.train:
            return 0
        return int(torch.randint(0, self.data.context, (1,), generator=_generator(self.seed, "offset", epoch)))

    def _draw(self, epoch: int, b: int, n: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crop offsets and flips for the whole global batch, then this shard's rows: shards agree with it."""
        g = _generator(self.seed, "augment", epoch, b)
        dy, dx = torch.randint(0, 2 * PAD + 1, (2, n), generator=g)
        flip = torch.randint(0, 2, (n,), generator=g).bool()
        return dy[lo:hi], dx[lo:hi], flip[lo:hi]


def augment(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Zero-pad by PAD, crop the original size at (dy, dx), mirror where flip: one gather for the batch.

    Output pixel (i, j) of sample k is padded[k, :, dy+i, dx+j], or dx+(W-1-j) when flipped.
    """
    B, C, H, W = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    rows = dy[:, None] + torch.arange(H)
    j = torch.arange(W)
    cols = dx[:, None] + torch.where(flip[:, None], W - 1 - j, j)
    flat = rows[:, :, None] * (W + 2 * PAD) + cols[:, None, :]  # (B, H, W) offsets into a padded plane
    return padded.flatten(2).gather(2, flat.flatten(1)[:, None, :].expand(B, C, H * W)).view(B, C, H, W)
