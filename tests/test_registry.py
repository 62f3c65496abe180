"""build_norm_layer: every name, the 1d/3d spellings, keyword arguments and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import syncsn
from syncsn import registry
from syncsn.convert import revert_sync
from syncsn.registry import build_norm_layer, norm_layer_names, register_norm
from syncsn.sparse_switchnorm import (
    SparseSwitchNorm1d,
    SparseSwitchNorm2d,
    SparseSwitchNorm3d,
    SyncSparseSwitchNorm1d,
    SyncSparseSwitchNorm2d,
    SyncSparseSwitchNorm3d,
)

BY_DIM = {
    "BN": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "SyncBN": {d: syncsn.SyncBatchNorm for d in (1, 2, 3)},
    "SN": {1: syncsn.SwitchNorm1d, 2: syncsn.SwitchNorm2d, 3: syncsn.SwitchNorm3d},
    "SyncSN": {1: syncsn.SyncSwitchNorm1d, 2: syncsn.SyncSwitchNorm2d, 3: syncsn.SyncSwitchNorm3d},
    "SSN": {1: SparseSwitchNorm1d, 2: SparseSwitchNorm2d, 3: SparseSwitchNorm3d},
    "SyncSSN": {1: SyncSparseSwitchNorm1d, 2: SyncSparseSwitchNorm2d, 3: SyncSparseSwitchNorm3d},
    "IN": {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
    "LN": {d: nn.GroupNorm for d in (1, 2, 3)},
}


@pytest.mark.parametrize("name", sorted(BY_DIM))
def test_names_and_dimensionality(name: str) -> None:
    for dim, cls in BY_DIM[name].items():
        layer = build_norm_layer(f"{name}{dim}d", 8)
        assert type(layer) is cls
        assert getattr(layer, "num_features", getattr(layer, "num_channels", None)) == 8
    assert type(build_norm_layer(name, 8)) is BY_DIM[name][2]  # the bare name is 2d
    assert type(build_norm_layer(name.lower(), 8)) is BY_DIM[name][2]  # case-insensitive


def test_bn_is_torch_and_syncbn_is_ours() -> None:
    assert type(build_norm_layer("BN", 4)) is torch.nn.BatchNorm2d
    assert type(build_norm_layer("SyncBN", 4)) is syncsn.SyncBatchNorm


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_syncbn_spelling_is_remembered_for_revert(dim: int) -> None:
    assert type(revert_sync(build_norm_layer(f"SyncBN{dim}d", 4))) is BY_DIM["BN"][dim]


def test_keyword_arguments_reach_the_layer() -> None:
    bn = build_norm_layer("BN3d", 4, eps=1e-3, momentum=None, affine=False)
    assert (bn.eps, bn.momentum, bn.affine) == (1e-3, None, False)
    group = object()
    sn = build_norm_layer("SyncSN", 4, process_group=group, using_bn=False, last_gamma=True)
    assert sn.process_group is group and sn.scopes == ("in", "ln")
    assert torch.equal(sn.weight, torch.zeros(4))
    assert build_norm_layer("SyncBN", 4, process_group=group).process_group is group
    inst = build_norm_layer("IN", 4, affine=True)
    assert inst.affine and inst.weight.shape == (4,)


def test_group_and_layer_norm() -> None:
    gn = build_norm_layer("GN", 32, num_groups=8, eps=1e-6)
    assert (gn.num_groups, gn.num_channels, gn.eps) == (8, 32, 1e-6)
    with pytest.raises(ValueError, match=r"GN needs num_groups.*num_groups=32"):
        build_norm_layer("GN", 64)
    ln = build_norm_layer("LN", 6)
    assert (ln.num_groups, ln.num_channels) == (1, 6)
    # Layer normalization over (C, H, W) of each sample, with a per-channel affine.
    x = torch.randn(2, 6, 3, 4)
    flat = x.flatten(1)
    expected = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(
        flat.var(1, unbiased=False, keepdim=True) + ln.eps
    )
    assert torch.allclose(ln(x), expected.view_as(x), atol=1e-5)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown normalization layer 'FooNorm'") as info:
        build_norm_layer("FooNorm", 4)
    for name in ("BN", "SyncBN", "SN", "SyncSN", "SSN", "SyncSSN", "GN", "IN", "LN", "SN3d"):
        assert name in str(info.value).split("known names: ")[1].split(", ")
    with pytest.raises(ValueError, match="unknown normalization layer None"):
        build_norm_layer(None, 4)


@pytest.fixture
def restore_registry():
    saved = dict(registry._BUILDERS)
    yield
    registry._BUILDERS.clear()
    registry._BUILDERS.update(saved)


def test_register_a_name(restore_registry) -> None:
    register_norm("FrozenBN", lambda c, **kw: nn.BatchNorm2d(c, **kw).eval())
    assert "FrozenBN" in norm_layer_names()
    layer = build_norm_layer("frozenbn", 4, eps=0.5)
    assert type(layer) is nn.BatchNorm2d and not layer.training and layer.eps == 0.5
    with pytest.raises(ValueError, match=r"'sn' is already registered \(as 'SN'\).*overwrite=True"):
        register_norm("sn", nn.BatchNorm2d)
    register_norm("SN", nn.BatchNorm2d, overwrite=True)
    assert type(build_norm_layer("SN", 4)) is nn.BatchNorm2d
