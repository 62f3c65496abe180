"""build_norm_layer: every name, the 1d/3d spellings, keyword arguments and errors."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn

import syncsn
from syncsn import registry
from syncsn.convert import revert_sync
from syncsn.registry import (
    abbreviation,
    build_named_norm_layer,
    build_norm_layer,
    norm_layer_names,
    register_norm,
)
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
    group = mock.Mock(spec=dist.ProcessGroup)
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
    with pytest.raises(TypeError, match=r"registered name .* or a dict.*got None"):
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


# --- OpenMMLab-style configs -----------------------------------------------------------------


def test_dict_config_with_requires_grad() -> None:
    cfg = dict(type="SyncSN", requires_grad=False, eps=1e-3, using_bn=False)
    layer = build_norm_layer(cfg, 6)
    assert type(layer) is syncsn.SyncSwitchNorm2d and layer.eps == 1e-3
    assert layer.scopes == ("in", "ln")
    assert [p.requires_grad for p in layer.parameters()] == [False] * 4
    assert cfg == dict(type="SyncSN", requires_grad=False, eps=1e-3, using_bn=False)
    assert all(p.requires_grad for p in build_norm_layer(dict(type="SN"), 6).parameters())


def test_dict_config_with_a_class_and_keyword_arguments() -> None:
    layer = build_norm_layer(dict(type=syncsn.SwitchNorm3d, momentum=0.01), 4, affine=False)
    assert type(layer) is syncsn.SwitchNorm3d and layer.momentum == 0.01 and not layer.affine
    gn = build_norm_layer(dict(type=nn.GroupNorm, num_groups=2), 8)
    assert (gn.num_groups, gn.num_channels) == (2, 8)


def test_dict_config_errors() -> None:
    with pytest.raises(TypeError, match=r"needs a 'type'.*\['eps'\]"):
        build_norm_layer(dict(eps=1e-3), 4)
    with pytest.raises(ValueError, match="eps given both in the config and as keyword"):
        build_norm_layer(dict(type="SN", eps=1e-3), 4, eps=1e-4)
    with pytest.raises(TypeError, match="requires_grad must be True or False, got 'no'"):
        build_norm_layer(dict(type="SN", requires_grad="no"), 4)
    with pytest.raises(TypeError, match="nn.Module class, got the class int"):
        build_norm_layer(dict(type=int), 4)
    with pytest.raises(ValueError, match="unknown normalization layer 'Nope'"):
        build_norm_layer(dict(type="Nope"), 4)


@pytest.mark.parametrize(
    "cfg, name",
    [
        ("BN", "bn"),
        ("SyncBN3d", "bn"),
        ("SN", "bn"),  # a _BatchNorm: BatchNorm checkpoints keep their keys
        (dict(type="SyncSSN"), "bn"),
        (dict(type="GN", num_groups=2), "gn"),
        ("IN1d", "in"),
        ("LN", "ln"),
    ],
)
def test_named_form(cfg, name: str) -> None:
    assert build_named_norm_layer(cfg, 4)[0] == name
    assert build_named_norm_layer(cfg, 4, postfix=3)[0] == f"{name}3"
    assert build_named_norm_layer(cfg, 4, postfix="_x")[0] == f"{name}_x"
    with pytest.raises(TypeError, match="postfix must be an int or a str"):
        build_named_norm_layer(cfg, 4, postfix=1.5)


def test_abbreviations_follow_class_attributes_and_names(restore_registry) -> None:
    class FancyNorm(nn.Module):
        _abbr_ = "fn"

        def __init__(self, num_features: int) -> None:
            super().__init__()

    class MyLayerNormalization(nn.Module):
        def __init__(self, num_features: int) -> None:
            super().__init__()

    assert abbreviation(FancyNorm) == "fn" and abbreviation(MyLayerNormalization) == "ln"
    assert abbreviation(nn.Identity) == "norm_layer"
    register_norm("Fancy", FancyNorm)
    register_norm("Other", FancyNorm, abbr="other")
    assert build_named_norm_layer("Fancy", 4, postfix=1)[0] == "fn1"
    assert build_named_norm_layer("Other", 4)[0] == "other"
