"""Model zoo: parameter counts, block structure, state_dict keys, determinism, aux heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fdg_dist import models, partition

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
    assert models.names() == sorted([*EXPECTED_PARAMS, "tiny"])


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
    with pytest.raises(ValueError):
        models.aux_head((4, 3, 8), 10)
