"""Model zoo: parameter counts, block structure, state_dict keys, determinism, aux heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fdg_dist import models
from fdg_dist.config import ModelConfig
from fdg_dist.split import partition

# Published sizes (He et al. 2016; Zagoruyko & Komodakis 2016; the CIFAR ResNet-18), 10 classes.
EXPECTED_PARAMS = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "resnet1202": 19.4e6,
    "resnet18": 11.2e6,
    "wrn28_10": 36.5e6,
}


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_names_sorted_and_complete() -> None:
    assert models.names() == sorted([*EXPECTED_PARAMS, "tiny", "gpt", "torchvision", "custom"])


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_param_counts_match_published(name: str) -> None:
    model = models.build(name, 10, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert _num_params(model) == pytest.approx(EXPECTED_PARAMS[name], rel=0.02)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"model\.name.*resnet20"):
        models.build_blocks("resnet21", 10)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "tiny"])
def test_forward_real_batch(name: str) -> None:
    model = models.build(name, 7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_tiny_is_small_fast_and_has_batchnorm() -> None:
    model = models.build("tiny", 10).eval()
    assert _num_params(model) < 20_000
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(model) >= 6
    # fast by count, not by a clock a loaded machine can stretch: under 10 MFLOPs an image, 1/14 of ResNet-20
    flops = sum(partition.block_costs(models.build_blocks("tiny", 10), (1, 3, 32, 32)))
    assert flops < 10e6 and 10 * flops < sum(partition.block_costs(models.build_blocks("resnet20", 10), (1, 3, 32, 32)))


def test_blocks_are_stem_residuals_head() -> None:
    blocks = models.build_blocks("resnet56", 10, device="meta")
    assert len(blocks) == 1 + 27 + 1
    assert isinstance(blocks[-1].fc, nn.Linear)


def test_deterministic_given_seed() -> None:
    torch.manual_seed(0)
    a = models.build("resnet20", 10).state_dict()
    torch.manual_seed(0)
    b = models.build("resnet20", 10).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_kaiming_convs_identity_bn() -> None:
    torch.manual_seed(0)
    model = models.build("resnet56", 10)
    conv = model[5].conv2
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1)
    bn = model[5].bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "wrn28_10", "tiny"])
def test_state_dict_keys_are_reindexed_block_keys(name: str) -> None:
    """A pipeline module owning blocks [a, b) rebuilds the full keys as f"{a + j}.{key}"."""
    blocks = models.build_blocks(name, 10, device="meta")
    full = models.build(name, 10, device="meta").state_dict()
    assembled = [f"{i}.{key}" for i, block in enumerate(blocks) for key in block.state_dict()]
    assert assembled == list(full)
    assert "0.conv.weight" in full


def test_aux_head_shapes() -> None:
    head = models.aux_head(torch.Size((4, 32, 16, 16)), 10)
    assert head(torch.randn(4, 32, 16, 16)).shape == (4, 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in head.modules())
    flat = models.aux_head((4, 64), 100)
    assert flat(torch.randn(4, 64)).shape == (4, 100)
    tokens = torch.randn(4, 5, 8)  # (N, T, C): per token for next-token labels, else of the mean token
    assert models.aux_head((4, 5, 8), 10, per_token=True)(tokens).shape == (4, 5, 10)
    assert models.aux_head((4, 5, 8), 10)(tokens).shape == (4, 10)
    with pytest.raises(ValueError):
        models.aux_head((4, 3, 8, 8, 2), 10)
    with pytest.raises(ValueError, match="per-token"):
        models.aux_head((4, 64), 10, per_token=True)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_official_variants_are_the_authors_models() -> None:
    """model.variant=official: the FDG authors' definitions — same block boundaries and output shape; the CIFAR
    ResNet has our parameters but pools only the top-left 6×6 of the 8×8 map; WRN-28-10 adds a bias to every
    convolution (ours has none) and its blocks take the stride on their second convolution."""
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    ours, official = models.build("resnet20", 10), models.build(ModelConfig(name="resnet20", variant="official"), 10)
    assert _count(official) == _count(ours) == 269_722 and len(official) == len(ours)
    official.eval()
    head_in = official[:-1](x)
    assert head_in.shape == (2, 64, 8, 8)
    moved = head_in.clone()
    moved[:, :, 6:, :] += 5.0  # outside the top-left 6x6 window: the head must not see it
    moved[:, :, :, 6:] += 5.0
    assert torch.equal(official[-1](moved), official[-1](head_in)) and official(x).shape == (2, 10)
    assert not torch.equal(ours[-1](moved), ours[-1](head_in))
    bn = [m.weight for m in official.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(w.min() >= 0 and w.max() < 1 for w in bn) and len({float(w[0].detach()) for w in bn}) > 1  # torch 1.0

    wrn, wrn_ours = models.build(ModelConfig(name="wrn28_10", variant="official"), 10, "meta"), models.build("wrn28_10", 10, "meta")
    conv_out = sum(m.out_channels for m in wrn.modules() if isinstance(m, torch.nn.Conv2d))
    assert _count(wrn) == _count(wrn_ours) + conv_out == 36_489_290  # "36.5M" in their README
    first = wrn[5]  # first block of stage 2 (160 -> 320 channels, stride 2)
    assert (first.conv1.stride, first.conv2.stride) == ((1, 1), (2, 2)) and wrn[-1].bn.momentum == 0.9
    assert wrn(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 10)
    with pytest.raises(ValueError, match="variant=official exists for"):
        models.build_blocks(ModelConfig(name="resnet18", variant="official"), 10)
