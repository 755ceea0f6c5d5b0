"""Data: deterministic sets, reproducible (seed, epoch, batch) batches, exact augmentation, loaders' errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fdg_dist import data
from fdg_dist.config import Config, DataConfig
from fdg_dist.data import images

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def synthetic(seed: int = 0, train_size: int = 100, test_size: int = 30) -> tuple[data.ImageSet, data.ImageSet]:
    return data.load(DataConfig(name="synthetic", train_size=train_size, test_size=test_size), seed)


def epoch_batches(loader: data.Batches, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch, start_batch=start))


def test_synthetic_is_deterministic_and_learnable() -> None:
    a, a_test = synthetic(0)
    b, _ = synthetic(0)
    c, _ = synthetic(1)
    assert a.images.dtype == torch.uint8 and a.images.shape == (100, 3, 32, 32) and a.images.is_contiguous()
    assert a.labels.dtype == torch.int64 and a_test.images.shape == (30, 3, 32, 32)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.images[:30], a_test.images)  # test is a different stream
    assert torch.bincount(a.labels, minlength=10).tolist() == [10] * 10
    # learnability proxy: class means are far apart relative to their spread
    big, _ = synthetic(0, train_size=2000)
    means = torch.stack([big.images[big.labels == k].float().mean(0) for k in range(10)]).flatten(1)
    between = torch.cdist(means, means)[~torch.eye(10, dtype=torch.bool)]
    assert between.min() > 100  # in 0..255 pixel units over 3072 values
    assert len(set(a.mean)) == 3 and all(0 < s < 1 for s in a.std)


def test_batch_sizes_include_partial_last_batch() -> None:
    assert data.batch_sizes(100, 32) == [32, 32, 32, 4]
    assert data.batch_sizes(96, 32) == [32, 32, 32]
    assert data.batch_sizes(5, 32) == [5]
    train, _ = synthetic()
    loader = data.Batches(train, 32, train=True, augment=True, seed=0)
    assert loader.num_batches() == 4 and loader.batch_sizes() == [32, 32, 32, 4]
    assert [len(y) for _, y in loader.epoch(0)] == [32, 32, 32, 4]
    with pytest.raises(ValueError, match="batch_size"):
        data.Batches(train, 32, train=True, augment=True, seed=0, shard=(0, 3))
    sharded = [data.Batches(train, 30, train=True, augment=True, seed=0, shard=(r, 3)) for r in range(3)]
    assert [s.batch_sizes() for s in sharded] == [[10, 10, 10, 4], [10, 10, 10, 3], [10, 10, 10, 3]]
    assert [data.shard_size(10, 10, r, 3) for r in range(3)] == [4, 3, 3]


def test_epochs_are_reproducible_resumable_and_complete() -> None:
    train, _ = synthetic()
    loader = data.Batches(train, 32, train=True, augment=True, seed=7)
    first = epoch_batches(loader, 3)
    again = epoch_batches(data.Batches(train, 32, train=True, augment=True, seed=7), 3)
    resumed = epoch_batches(loader, 3, start=2)
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert len(resumed) == 2
    for (x, y), (x2, y2) in zip(first[2:], resumed, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = epoch_batches(loader, 4)
    assert not torch.equal(first[0][0], other[0][0])
    assert not torch.equal(first[0][0], epoch_batches(data.Batches(train, 32, train=True, augment=True, seed=8), 3)[0][0])
    assert first[0][0].dtype == torch.float32 and first[0][0].shape == (32, 3, 32, 32)
    # every sample exactly once: un-augmented epochs reproduce the set as a permutation
    plain = data.Batches(train, 32, train=True, augment=False, seed=7)
    for e in (0, 1):
        order = plain.order(e)
        assert sorted(order.tolist()) == list(range(len(train)))
        y = torch.cat([y for _, y in plain.epoch(e)])
        assert torch.equal(y, train.labels[order])
    assert not torch.equal(plain.order(0), plain.order(1))
    x = torch.cat([x for x, _ in plain.epoch(0)])
    expected = (train.images[plain.order(0)].float() / 255 - torch.tensor(train.mean).view(1, 3, 1, 1)) \
        / torch.tensor(train.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)


def test_test_batches_are_fixed_order_without_augmentation() -> None:
    _, test = synthetic()
    loader = data.Batches(test, 16, train=False, augment=True, seed=0)
    y = torch.cat([y for _, y in loader.epoch(5)])
    assert torch.equal(y, test.labels)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(loader.epoch(0), loader.epoch(1), strict=True))


def test_shards_concatenate_to_the_global_batch() -> None:
    train, _ = synthetic()
    whole = epoch_batches(data.Batches(train, 30, train=True, augment=True, seed=3), 2)
    parts = [epoch_batches(data.Batches(train, 30, train=True, augment=True, seed=3, shard=(r, 3)), 2)
             for r in range(3)]
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[b][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[b][1] for p in parts]), y)


def test_augmentation_is_a_shifted_flipped_copy() -> None:
    x = torch.randint(1, 256, (4, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding is recognisable
    dy, dx = torch.tensor([0, 4, 8, 2]), torch.tensor([8, 4, 0, 7])
    flip = torch.tensor([False, False, True, True])
    out = data.augment(x, dy, dx, flip)
    for k in range(4):
        padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
        padded[:, 4:36, 4:36] = x[k]
        want = padded[:, dy[k]:dy[k] + 32, dx[k]:dx[k] + 32]
        assert torch.equal(out[k], want.flip(-1) if flip[k] else want)
    assert torch.equal(out[1], x[1])  # centre crop, no flip: the identity
    assert (out[0, :, :4] == 0).all() and (out[0, :, :, 28:] == 0).all()  # shifted in from the padding
    # and inside Batches: each augmented sample is such a copy of its source image
    train, _ = synthetic()
    loader = data.Batches(train, 32, train=True, augment=True, seed=1)
    xb, _ = next(loader.epoch(0))
    src = train.images[loader.order(0)[:32]]
    std, mean = torch.tensor(train.std).view(1, 3, 1, 1), torch.tensor(train.mean).view(1, 3, 1, 1)
    pixels = ((xb * std + mean) * 255).round().to(torch.uint8)
    for k in range(32):
        candidates = [data.augment(src[k:k + 1], torch.tensor([i]), torch.tensor([j]), torch.tensor([f]))[0]
                      for i in range(9) for j in range(9) for f in (False, True)]
        assert any(torch.equal(pixels[k], c) for c in candidates)


def test_subset_is_class_balanced_and_seeded() -> None:
    cfg = DataConfig(name="synthetic", train_size=200, test_size=50, train_subset=40, test_subset=20)
    train, test = data.load(cfg, 0)
    full, _ = synthetic(0, train_size=200, test_size=50)
    assert len(train) == 40 and len(test) == 20
    assert torch.bincount(train.labels, minlength=10).tolist() == [4] * 10
    # class-sorted data (like an ImageFolder) still yields every class
    sorted_set = data.ImageSet(full.images, full.labels.sort().values, 10, full.mean, full.std)
    sub = images.subset(sorted_set, 30, 0, "train")
    assert torch.bincount(sub.labels, minlength=10).tolist() == [3] * 10
    assert torch.equal(data.load(cfg, 0)[0].images, train.images)
    other = images.subset(sorted_set, 30, 1, "train")
    assert not torch.equal(sub.images, other.images)


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason=f"{SHARED_CIFAR} not present")
def test_imagefolder_subset_loads() -> None:
    cfg = DataConfig(name="imagefolder", root=str(SHARED_CIFAR), train_subset=500, test_subset=200)
    # only the chosen 700 files are decoded
    train, test = data.load(cfg, 0)
    assert train.images.shape == (500, 3, 32, 32) and test.images.shape == (200, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.num_classes == 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [50] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [20] * 10
    x, y = next(data.Batches(train, 128, train=True, augment=True, seed=0).epoch(0))
    assert x.shape == (128, 3, 32, 32) and y.max() < 10


def test_missing_cifar_names_data_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.root.*cifar-10-batches-py.*data\.download=true"):
        data.load(DataConfig(name="cifar10", root=str(tmp_path / "nowhere")), 0)
    with pytest.raises(FileNotFoundError, match=r"data\.root"):
        data.load(DataConfig(name="imagefolder", root=str(tmp_path)), 0)


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_imagefolder_decodes_png_and_rejects_mixed_sizes(tmp_path: Path) -> None:
    from torchvision.io import write_png

    for split, n in (("train", 3), ("val", 2)):
        for k, cls in enumerate(("b", "a")):  # ImageFolder order: sorted names, a=0, b=1
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                write_png(torch.full((3, 8, 8), 10 * k + i, dtype=torch.uint8), str(tmp_path / split / cls / f"{i}.png"))
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), num_classes=2, image_size=8)
    train, test = data.load(cfg, 0)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and len(test) == 4
    assert train.images[0].eq(10).all() and train.images[3].eq(0).all()
    write_png(torch.zeros(3, 9, 9, dtype=torch.uint8), str(tmp_path / "train" / "a" / "odd.png"))
    with pytest.raises(ValueError, match=r"odd\.png \(class folder 'a'\) is 9x9, unlike the others"):
        data.load(cfg, 0)


def _jpeg_folder(root: Path) -> DataConfig:
    """train/ and val/ with two classes of three 8x8 JPEGs each."""
    from torchvision.io import write_jpeg

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                write_jpeg(torch.full((3, 8, 8), 40 * i, dtype=torch.uint8), str(root / split / cls / f"{i}.jpg"))
    return DataConfig(name="imagefolder", root=str(root), num_classes=2, image_size=8)


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
@pytest.mark.parametrize("bad,content,reason", [
    ("empty.jpg", b"", "the file is empty"),
    ("notes.jpg", b"these are not pixels\n", "Unsupported image file"),
    ("cut.jpg", None, "truncated"),  # a JPEG cut after its first 20 bytes: fails the batched decode
])
def test_a_bad_image_is_named_with_its_class_folder(tmp_path: Path, bad: str, content: bytes | None,
                                                    reason: str) -> None:
    cfg = _jpeg_folder(tmp_path)
    good = (tmp_path / "train" / "dog" / "0.jpg").read_bytes()
    (tmp_path / "train" / "dog" / bad).write_bytes(good[:20] if content is None else content)
    with pytest.raises(ValueError) as err:
        data.load(cfg, 0)
    message = str(err.value)
    assert f"{tmp_path / 'train' / 'dog' / bad} (class folder 'dog')" in message and reason in message, message
    assert "\n" not in message


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_a_stray_image_of_another_size_is_named(tmp_path: Path) -> None:
    from torchvision.io import write_jpeg

    cfg = _jpeg_folder(tmp_path)
    write_jpeg(torch.zeros(3, 64, 64, dtype=torch.uint8), str(tmp_path / "val" / "cat" / "big.jpg"))
    with pytest.raises(ValueError, match=r"val/cat/big\.jpg \(class folder 'cat'\) is 64x64, unlike the others"
                                         r" under .*val \(6 of 8x8, 1 of 64x64\)"):
        data.load(cfg, 0)


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_an_empty_class_folder_is_named(tmp_path: Path) -> None:
    cfg = _jpeg_folder(tmp_path)
    (tmp_path / "train" / "emu").mkdir()
    with pytest.raises(FileNotFoundError, match=f"data.root: {tmp_path / 'train'}: .*emu"):
        data.load(cfg, 0)


def test_data_std_overrides_the_normalisation() -> None:
    """data.std: the FDG authors' CIFAR-10 std (parity runs) replaces the dataset's in both splits."""
    cfg = DataConfig(train_size=8, test_size=4)
    train, test = data.load(cfg, 0)
    cfg.std = [0.2023, 0.1994, 0.2010]
    train2, test2 = data.load(cfg, 0)
    assert train2.std == test2.std == (0.2023, 0.1994, 0.2010) != train.std
    assert torch.equal(train2.images, train.images) and train2.mean == train.mean


# ---------------------------------------------------------------------- issue 27: files read wrong or with a traceback
@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_a_16_bit_grayscale_png_is_read_as_its_8_high_bits(tmp_path: Path) -> None:
    """It decoded as uint16 and failed the stack ("Promotion for uint16 ... not supported")."""
    from PIL import Image

    cfg = _jpeg_folder(tmp_path)
    levels = (torch.arange(64, dtype=torch.int32).view(8, 8) * 1000).numpy().astype("uint16")
    Image.fromarray(levels).save(tmp_path / "train" / "cat" / "deep.png")  # mode I;16
    train, _ = data.load(cfg, 0)
    deep = train.images[train.labels.eq(0).nonzero()[-1, 0]]  # cat's last file: deep.png sorts after 2.jpg
    assert deep.dtype == torch.uint8
    assert torch.equal(deep, torch.from_numpy(levels // 256).to(torch.uint8).expand(3, 8, 8))


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
@pytest.mark.parametrize("link,to", [("train/dog/loop", "../dog"), ("train/cat/again", "../dog")])
def test_a_folder_reached_twice_through_a_link_is_refused(tmp_path: Path, link: str, to: str) -> None:
    """A loop (dog/loop -> ../dog) made class dog 3 + 3 x 40 images, silently; a second link to a folder
    counts its images twice (here in two classes)."""
    cfg = _jpeg_folder(tmp_path)
    (tmp_path / link).symlink_to(to, target_is_directory=True)
    with pytest.raises(ValueError) as err:
        data.load(cfg, 0)
    message = str(err.value)
    assert message.startswith(f"data.root: {tmp_path / link} leads to {tmp_path / 'train' / 'dog'}, a folder already "
                              "read (a symbolic link loop or a second link to one folder)"), message
    (tmp_path / link).unlink()
    (tmp_path / "elsewhere").mkdir()  # a link to a folder read nowhere else is fine
    (tmp_path / "train" / "dog" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    train, _ = data.load(cfg, 0)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("tokens", ["byte", "char"])
def test_an_empty_text_file_is_named(tmp_path: Path, tokens: str) -> None:
    """torch.frombuffer said "both buffer length (0) and count (-1) must not be 0"."""
    from fdg_dist.config import ConfigError
    from fdg_dist.validation import validate

    empty = tmp_path / "input.txt"
    empty.write_bytes(b"")
    cfg = DataConfig(name="text", root=str(empty), tokens=tokens)
    with pytest.raises(ValueError, match=f"^data.root: '{empty}' is empty; data=text trains on the text of that file$"):
        data.text_tokens(cfg)
    run = Config()
    run.model.name, run.data = "gpt", cfg
    with pytest.raises(ConfigError, match="^data.root: .* is empty"):
        validate(run)
