"""Converters (BatchNorm <-> switchable / synchronized layers) and switch-weight inspection.

The model under test is the segmentation example's DeepLabV3 on a ResNet-50 trunk built with
torch.nn.BatchNorm2d, at a small width and a 64x64 input to stay fast. The two-rank case runs
one DistributedDataParallel training step of the converted model and compares it with the
local SN model on the concatenated batch, in float64.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF
from dist_world import DistWorld
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import syncsn
import syncsn.registry  # noqa: F401 - wires the sparse layers into the converters
from syncsn.convert import (
    BN_INIT_LOGIT_GAP,
    convert_switchnorm,
    convert_sync_batchnorm,
    convert_sync_switchnorm,
    revert_sync,
)
from syncsn.inspect import format_switch_weights, switch_weights
from syncsn.sparse_switchnorm import SparseSwitchNorm2d, SyncSparseSwitchNorm2d

_MODEL_FILE = Path(__file__).resolve().parents[1] / "examples" / "segmentation" / "model.py"
_spec = importlib.util.spec_from_file_location("segmentation_model", _MODEL_FILE)
segmentation_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(segmentation_model)

SN = {1: syncsn.SwitchNorm1d, 2: syncsn.SwitchNorm2d, 3: syncsn.SwitchNorm3d}
SYNC_SN = {1: syncsn.SyncSwitchNorm1d, 2: syncsn.SyncSwitchNorm2d, 3: syncsn.SyncSwitchNorm3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@pytest.fixture(scope="module")
def world():
    """Two gloo ranks for this module's distributed case."""
    w = DistWorld(2)
    yield w
    w.close()


def deeplab(seed: int = 0) -> nn.Module:
    """ResNet-50 DeepLabV3 with BatchNorm2d, width 8, no dropout (for exact comparisons)."""
    torch.manual_seed(seed)
    model = segmentation_model.DeepLabV3(
        num_classes=3, norm_layer=nn.BatchNorm2d, backbone="resnet50", base_width=8
    )
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def randomize_bn_(model: nn.Module, seed: int) -> None:
    """Non-trivial affine parameters and running statistics on every norm layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (_BatchNorm, syncsn.switchnorm._SwitchNorm)):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def calibrate_in_eval_(model: nn.Module, x: torch.Tensor) -> None:
    """Give every BatchNorm the statistics of its own eval-mode input on ``x``.

    Stands in for a trained network evaluated on its data distribution, whose activations
    match its running statistics at every layer. (An untrained network's train-mode running
    statistics do not describe its eval-mode activations at all.)
    """

    def set_stats(m: nn.Module, args: tuple) -> None:
        m.running_mean.copy_(args[0].mean(dim=(0, 2, 3)))
        m.running_var.copy_(args[0].var(dim=(0, 2, 3)))

    handles = [
        m.register_forward_pre_hook(set_stats)
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()


def count(model: nn.Module, cls: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


# --- the ResNet-50 DeepLab ------------------------------------------------------------------


@pytest.mark.parametrize(
    "convert, target",
    [
        (convert_sync_switchnorm, syncsn.SyncSwitchNorm2d),
        (convert_switchnorm, syncsn.SwitchNorm2d),
        (convert_sync_batchnorm, syncsn.SyncBatchNorm),
    ],
)
def test_deeplab_every_batchnorm_converted(convert, target) -> None:
    model = deeplab()
    n_bn = count(model, nn.BatchNorm2d)
    assert n_bn > 50  # a ResNet-50 trunk plus the head
    converted = convert(model)
    assert count(converted, target) == n_bn
    norm_kinds = (_BatchNorm, syncsn.switchnorm._SwitchNorm)
    assert count(converted, norm_kinds) == n_bn  # nothing else left behind
    if target is not syncsn.SwitchNorm2d:
        # Sync layers are named after their place, the same on every rank (SYNCSN_DEBUG).
        for name, m in converted.named_modules():
            if isinstance(m, target):
                assert m.sync_name == name
    converted.train()
    y = converted(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 3, 64, 64) and torch.isfinite(y).all()


def test_init_bn_matches_batchnorm_in_eval() -> None:
    model = deeplab(seed=1)
    randomize_bn_(model, seed=2)
    calibrate_in_eval_(model, torch.randn(8, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        errors = {}
        for convert in (convert_switchnorm, convert_sync_switchnorm):
            converted = convert(copy.deepcopy(model), init="bn").eval()
            errors[convert.__name__] = rel_err(converted(x), expected)
        uniform = convert_switchnorm(copy.deepcopy(model), init="uniform").eval()
        uniform_err = rel_err(uniform(x), expected)
    assert max(errors.values()) <= 1e-3, errors
    assert uniform_err > 1e-2  # the comparison can tell a switchable network from a BN one


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_init_logits(dim: int) -> None:
    bn_init = convert_switchnorm(BN[dim](4), init="bn")
    k = len(bn_init.scopes)
    for logits, weights in zip(
        (bn_init.mean_weight, bn_init.var_weight), bn_init.mixing_weights(), strict=True
    ):
        assert bn_init.scopes[-1] == "bn"
        assert logits.tolist() == [0.0] * (k - 1) + [BN_INIT_LOGIT_GAP]
        expected_bn = math.exp(BN_INIT_LOGIT_GAP) / (math.exp(BN_INIT_LOGIT_GAP) + k - 1)
        assert weights[-1].item() == pytest.approx(expected_bn, rel=1e-6)
    uniform = convert_switchnorm(BN[dim](4))
    assert uniform.mean_weight.tolist() == [1.0] * k == uniform.var_weight.tolist()
    with pytest.raises(ValueError, match="init must be 'uniform' or 'bn'.*'sparse'"):
        convert_switchnorm(BN[dim](4), init="sparse")


# --- what is carried over -------------------------------------------------------------------


def _frozen_bn(dim: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    bn = BN[dim](5, eps=1e-3, momentum=0.05, dtype=dtype)
    randomize_bn_(bn, seed=dim)
    bn.num_batches_tracked.fill_(7)
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    return bn.eval()


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("convert", [convert_switchnorm, convert_sync_switchnorm])
def test_state_carried_into_switchnorm(dim: int, convert) -> None:
    bn = _frozen_bn(dim, torch.float64)
    model = nn.Sequential(nn.Identity(), bn)
    out = convert(model)
    new = out[1]
    expected = (SYNC_SN if convert is convert_sync_switchnorm else SN)[dim]
    assert type(new) is expected
    assert new.weight is bn.weight and new.bias is bn.bias  # shared, not copied
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert getattr(new, name) is getattr(bn, name)
    assert (new.eps, new.momentum, new.affine) == (1e-3, 0.05, True)
    assert not new.training
    assert new.mean_weight.dtype == torch.float64 == new.var_weight.dtype
    # Logits of a layer whose parameters were frozen are frozen too.
    assert not new.mean_weight.requires_grad and not new.var_weight.requires_grad


def test_training_flag_requires_grad_and_momentum_none() -> None:
    bn = nn.BatchNorm2d(3, momentum=None).train()
    new = convert_sync_switchnorm(bn)
    assert new.training and new.momentum is None
    assert new.weight.requires_grad and new.mean_weight.requires_grad


def test_device_and_dtype_kept() -> None:
    bn = nn.BatchNorm2d(4, device="meta", dtype=torch.float16)
    for convert in (convert_sync_switchnorm, convert_sync_batchnorm):
        new = convert(copy.deepcopy(bn))
        for t in (*new.parameters(), new.running_mean, new.running_var):
            assert t.device.type == "meta" and t.dtype == torch.float16


def test_affine_false_and_bias_false() -> None:
    plain = convert_switchnorm(nn.BatchNorm2d(4, affine=False))
    assert plain.weight is None and plain.bias is None and not plain.affine
    bn = nn.BatchNorm2d(4, bias=False)
    for convert in (convert_switchnorm, convert_sync_switchnorm, convert_sync_batchnorm):
        new = convert(copy.deepcopy(bn))
        assert new.bias is None and new.weight is not None, convert.__name__
        assert "bias" not in new.state_dict()
        assert "bias=False" in repr(new)
    back = revert_sync(convert_sync_batchnorm(copy.deepcopy(bn)))
    assert type(back) is nn.BatchNorm2d and back.bias is None


def _checkpoint_model() -> nn.Sequential:
    """Norm layers without a bias and without running statistics, as in some backbones."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4, bias=False),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.BatchNorm2d(4),
    )


def test_checkpoints_load_strictly_after_conversion() -> None:
    checkpoint = _checkpoint_model().state_dict()
    for convert in (convert_sync_batchnorm, convert_switchnorm, convert_sync_switchnorm):
        model = convert(_checkpoint_model())
        keys = set(model.state_dict())
        added = {k for k in keys if k.endswith(("mean_weight", "var_weight"))}
        assert keys - added == set(checkpoint), convert.__name__
        if added:
            result = model.load_state_dict(checkpoint, strict=False)
            assert set(result.missing_keys) == added and result.unexpected_keys == []
        else:
            model.load_state_dict(checkpoint, strict=True)
    back = revert_sync(convert_sync_switchnorm(_checkpoint_model()))
    assert set(back.state_dict()) == set(convert_switchnorm(_checkpoint_model()).state_dict())


def test_untracked_running_stats_carried_over() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = convert_switchnorm(nn.BatchNorm2d(4, track_running_stats=False))
    assert not new.track_running_stats and new.running_mean is None
    # Batch statistics in eval mode too, as the BatchNorm layer it replaced.
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    assert torch.allclose(new.eval()(x), new.train()(x))
    twin = convert_sync_switchnorm(new)
    assert not twin.track_running_stats and twin.running_mean is None


def test_batchnorm1d_of_one_feature_converts() -> None:
    """One feature: the LN scope's variance over it is 0 (as IN's over one pixel)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = convert_switchnorm(nn.Sequential(nn.BatchNorm1d(1)))
    assert type(out[0]) is syncsn.SwitchNorm1d
    y = out[0](torch.randn(6, 1))
    assert torch.isfinite(y).all()


def test_root_is_converted_and_shared_layers_stay_shared() -> None:
    assert type(convert_switchnorm(nn.BatchNorm3d(4))) is syncsn.SwitchNorm3d
    shared = nn.BatchNorm2d(4)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared), "c": shared})
    out = convert_sync_switchnorm(model)
    assert out["a"] is out["b"][0] is out["c"]
    assert type(out["a"]) is syncsn.SyncSwitchNorm2d


# --- dimension-agnostic SyncBatchNorm -------------------------------------------------------


def test_torch_sync_batchnorm_dimensionality_from_dim() -> None:
    for dim in (1, 2, 3):
        new = convert_sync_switchnorm(nn.SyncBatchNorm(4), dim=dim)
        assert type(new) is SYNC_SN[dim]
        assert type(revert_sync(nn.SyncBatchNorm(4), dim=dim)) is BN[dim]
    assert type(convert_switchnorm(nn.SyncBatchNorm(4))) is syncsn.SwitchNorm2d  # default
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3.*got 4"):
        convert_sync_switchnorm(nn.SyncBatchNorm(4), dim=4)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_sync_batchnorm_remembers_what_it_replaced(dim: int) -> None:
    model = nn.Sequential(BN[dim](4))
    sync = convert_sync_batchnorm(model)
    assert type(sync[0]) is syncsn.SyncBatchNorm
    # dim=2 is the fallback: the recorded dimensionality must win over it.
    assert type(convert_sync_switchnorm(copy.deepcopy(sync))[0]) is SYNC_SN[dim]
    assert type(revert_sync(sync)[0]) is BN[dim]


def test_convert_sync_batchnorm_computes_batchnorm() -> None:
    bn = nn.BatchNorm2d(4, momentum=0.3)
    randomize_bn_(bn, seed=5)
    sync = convert_sync_batchnorm(copy.deepcopy(bn))
    x = torch.randn(3, 4, 5, 6)
    for training in (True, False):
        bn.train(training)
        sync.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = bn(xa), sync(xb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert torch.allclose(ya, yb, rtol=1e-5, atol=1e-5)
        assert torch.allclose(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
        assert torch.allclose(bn.running_var, sync.running_var, rtol=1e-6)


# --- switchable layers ----------------------------------------------------------------------


def test_local_switchnorm_to_sync_keeps_its_logits_and_state() -> None:
    sn = syncsn.SwitchNorm2d(4, using_moving_average=False, last_gamma=True)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.1, 2.0, -1.0]))
    new = convert_sync_switchnorm(sn, init="bn")  # init applies to BatchNorm layers only
    assert type(new) is syncsn.SyncSwitchNorm2d
    assert new.mean_weight is sn.mean_weight and new.var_weight is sn.var_weight
    assert new.running_var is sn.running_var
    assert (new.using_moving_average, new.last_gamma) == (False, True)
    # Already synchronized layers get the requested group.
    group = object()
    assert convert_sync_switchnorm(new, process_group=group).process_group is group


def test_sparse_layers_convert_to_their_twins() -> None:
    ssn = SparseSwitchNorm2d(4)
    ssn.radius.fill_(0.3)
    sync = convert_sync_switchnorm(ssn)
    assert type(sync) is SyncSparseSwitchNorm2d
    assert sync.radius is ssn.radius and sync.mean_weight is ssn.mean_weight
    assert type(revert_sync(sync)) is SparseSwitchNorm2d


def test_revert_sync_gives_identical_eval_outputs() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        syncsn.SyncSwitchNorm2d(6),
        SyncSparseSwitchNorm2d(6),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 5),
        nn.BatchNorm1d(5),
    )
    model = convert_sync_batchnorm(model)
    randomize_bn_(model, seed=3)
    with torch.no_grad():
        model[3].mean_weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    params = dict(model.named_parameters())
    local = revert_sync(model)
    assert [type(local[i]) for i in (1, 3, 4, 7)] == [
        nn.BatchNorm2d,
        syncsn.SwitchNorm2d,
        SparseSwitchNorm2d,
        nn.BatchNorm1d,
    ]
    assert all(p is params[name] for name, p in local.named_parameters())
    with torch.no_grad():
        assert torch.equal(local(x), expected)


# --- layers the converters do not know ------------------------------------------------------


class RenamedBN(nn.BatchNorm2d):
    """Adds nothing: only a different default."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, eps=1e-3)


class FusedBNReLU(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class TaggedBN(nn.BatchNorm2d):
    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.scale = 2.0


class OwnBatchNorm(_BatchNorm):
    """Straight from torch's base class: no dimensionality the converters could go by."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        pass


def test_subclasses_that_add_nothing_are_converted() -> None:
    new = convert_sync_switchnorm(nn.Sequential(RenamedBN(4)))[0]
    assert type(new) is syncsn.SyncSwitchNorm2d and new.eps == 1e-3


@pytest.mark.parametrize(
    "layer, reason",
    [
        (FusedBNReLU(4), "defines forward"),
        (TaggedBN(4), "state a BatchNorm2d does not have: scale"),
        (syncsn.SwitchNorm2d(4), "hooks"),
        (OwnBatchNorm(4), "not one the converters know"),
        (nn.LazyBatchNorm2d(), "not materialized yet; run one forward pass first"),
    ],
)
def test_layers_with_unknown_behaviour_are_left_with_a_warning(layer, reason) -> None:
    if isinstance(layer, syncsn.SwitchNorm2d):
        layer.register_forward_hook(lambda *args: None)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), layer), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=rf"layer '0\.1' \({type(layer).__name__}\).*{reason}"):
        out = convert_sync_switchnorm(model)
    assert out[0][1] is layer
    assert type(out[1]) is syncsn.SyncSwitchNorm2d  # the rest is still converted


def test_known_layers_convert_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        revert_sync(convert_sync_switchnorm(deeplab()))


# --- leaving layers alone, hooks, bad input -------------------------------------------------


def head_model() -> nn.Module:
    """backbone (two BN), head with a pooling branch (one BN each)."""
    cbr = lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())  # noqa: E731
    return nn.ModuleDict(
        {
            "backbone": nn.Sequential(cbr(), cbr()),
            "head": nn.ModuleDict(
                {"conv": cbr(), "pool": nn.Sequential(nn.AdaptiveAvgPool2d(1), cbr())}
            ),
        }
    )


def converted_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, syncsn.switchnorm._SwitchNorm)}


ALL_NORMS = {"backbone.0.1", "backbone.1.1", "head.conv.1", "head.pool.1.1"}


@pytest.mark.parametrize(
    "exclude, left",
    [
        ("head.pool.1.1", {"head.pool.1.1"}),  # an exact name
        ("head.pool", {"head.pool.1.1"}),  # a module and everything inside it
        ("backbone.*", {"backbone.0.1", "backbone.1.1"}),  # a glob pattern
        (nn.AdaptiveAvgPool2d, set()),  # a class (the pool itself holds no norm)
        (nn.ModuleDict, ALL_NORMS),  # the root is a ModuleDict: nothing converted
        (lambda name, m: name.endswith("conv"), {"head.conv.1"}),  # a predicate
        (["backbone.0", lambda name, m: "pool" in name], {"backbone.0.1", "head.pool.1.1"}),
    ],
)
def test_exclude_leaves_chosen_modules_alone(exclude, left) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for convert in (convert_sync_switchnorm, convert_switchnorm):
            model = convert(head_model(), exclude=exclude)
            assert converted_names(model) == ALL_NORMS - left
            assert {n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d} == left
    model = convert_sync_batchnorm(head_model(), exclude=exclude)
    synced = {n for n, m in model.named_modules() if isinstance(m, syncsn.SyncBatchNorm)}
    assert synced == ALL_NORMS - left
    back = revert_sync(convert_sync_switchnorm(head_model()), exclude=exclude)
    assert {n for n, m in back.named_modules() if type(m) is syncsn.SyncSwitchNorm2d} == left


def test_exclude_takes_layers_the_converters_would_warn_about() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 1), FusedBNReLU(4), nn.BatchNorm2d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = convert_sync_switchnorm(model, exclude="1")
    assert type(out[1]) is FusedBNReLU and type(out[2]) is syncsn.SyncSwitchNorm2d


def test_exclude_patterns_that_match_nothing_are_reported() -> None:
    with pytest.warns(UserWarning, match=r"exclude pattern\(s\) 'head.pol' matched no module"):
        convert_switchnorm(head_model(), exclude=["head.pol", "backbone"])


@pytest.mark.parametrize("bad", [3, [nn.BatchNorm2d, 3.5]])
def test_exclude_of_the_wrong_kind_is_refused(bad) -> None:
    with pytest.raises(TypeError, match=r"exclude takes module names.*got (int 3|float 3.5)"):
        convert_switchnorm(head_model(), exclude=bad)


def test_exclude_takes_modules_by_identity() -> None:
    """A module is callable and a container is iterable: neither is taken for predicates.
    The module itself and everything inside it are left alone, alone or in a list; a module
    that is not part of the model is reported."""
    for wrap in (lambda m: m, lambda m: [m]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)),
        )
        inner = model[2]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = convert_switchnorm(model, exclude=wrap(inner))
        assert out[2] is inner and type(inner[1]) is nn.BatchNorm2d
        assert type(out[1]) is syncsn.SwitchNorm2d
    stranger = nn.Sequential(nn.BatchNorm2d(4))
    with pytest.warns(
        UserWarning, match=r"exclude module\(s\) Sequential are not part of the model"
    ):
        out = convert_switchnorm(head_model(), exclude=stranger)
    assert converted_names(out) == ALL_NORMS and type(stranger[0]) is nn.BatchNorm2d


@pytest.mark.parametrize("convert", [convert_sync_switchnorm, convert_switchnorm])
def test_a_shared_module_excluded_under_any_of_its_names_stays(convert) -> None:
    """A layer at two places is one layer: excluded under its second name, it stays at both
    (and whatever is inside an excluded module stays, even where it is also seen elsewhere)."""
    shared = nn.BatchNorm2d(4)
    for excluded in ("a", "b", "b.0"):
        model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared), "c": nn.BatchNorm2d(4)})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = convert(model, exclude=excluded)
        assert out["a"] is out["b"][0] is shared, excluded
        assert isinstance(out["c"], syncsn.switchnorm._SwitchNorm)
    block = nn.Sequential(shared)
    model = nn.ModuleDict({"block": block, "a": shared})
    out = convert(model, exclude="block")
    assert out["a"] is out["block"][0] is shared


@pytest.mark.parametrize(
    "convert", [convert_sync_switchnorm, convert_switchnorm, convert_sync_batchnorm, revert_sync]
)
def test_state_dict_hooks_move_to_the_new_layer(convert) -> None:
    """An old checkpoint's renamed key still maps through the layer's load pre-hook, its
    state-dict post-hook still runs, hooks get the new layer, and the handles remove them."""
    bn = nn.BatchNorm2d(3)
    if convert is revert_sync:
        bn = convert_sync_switchnorm(bn)
    seen = []

    def rename(module, state_dict, prefix, *args) -> None:
        seen.append(module)
        old = prefix + "gamma"
        if old in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(old)

    def mark(module, state_dict, prefix, local_metadata) -> None:
        state_dict[prefix + "marked"] = torch.ones(())

    handles = [bn.register_load_state_dict_pre_hook(rename), bn.register_state_dict_post_hook(mark)]
    model = convert(nn.Sequential(bn))
    new = model[0]
    assert new is not bn
    checkpoint = {k: v for k, v in model.state_dict().items() if k != "0.marked"}
    checkpoint["0.gamma"] = torch.full((3,), 3.0)
    del checkpoint["0.weight"]
    model.load_state_dict(checkpoint, strict=True)
    assert torch.equal(new.weight.detach(), torch.full((3,), 3.0))
    assert seen[-1] is new
    assert "0.marked" in model.state_dict()
    for handle in handles:
        handle.remove()
    assert "0.marked" not in model.state_dict()
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(checkpoint)


@pytest.mark.parametrize(
    "convert", [convert_sync_switchnorm, convert_switchnorm, convert_sync_batchnorm, revert_sync]
)
@pytest.mark.parametrize("given", [None, "resnet50", {"0.weight": torch.ones(2)}])
def test_a_model_is_required(convert, given) -> None:
    with pytest.raises(TypeError, match=rf"{convert.__name__} expects a torch.nn.Module.*got"):
        convert(given)


def test_sparse_conversion() -> None:
    model = convert_sync_switchnorm(
        nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm1d(4)), sparse=True
    )
    assert type(model[0]) is SyncSparseSwitchNorm2d
    assert type(model[1]) is syncsn.SyncSparseSwitchNorm1d
    assert type(convert_switchnorm(nn.BatchNorm2d(4), sparse=True)) is SparseSwitchNorm2d
    with pytest.raises(ValueError, match=r"init='bn' with sparse=True would select BN"):
        convert_switchnorm(nn.BatchNorm2d(4), sparse=True, init="bn")


# --- switch weights -------------------------------------------------------------------------


def test_switch_weights_and_table() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(4))
    model = convert_switchnorm(model, init="bn")
    sn2d = model[0]
    with torch.no_grad():
        sn2d.var_weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    model.append(syncsn.SyncSwitchNorm2d(4, using_bn=False))
    weights = switch_weights(model)
    assert list(weights) == ["0", "2", "3"]
    expected_var = torch.softmax(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 0)
    assert weights["0"]["var"] == pytest.approx(tuple(expected_var.tolist()), rel=1e-6)
    gap = math.exp(BN_INIT_LOGIT_GAP)
    assert weights["0"]["mean"] == pytest.approx((1 / (gap + 2), 1 / (gap + 2), gap / (gap + 2)))
    assert weights["2"]["mean"][0] is None  # SwitchNorm1d has no IN scope
    assert weights["2"]["var"][1:] == pytest.approx((1 / (gap + 1), gap / (gap + 1)))
    assert weights["3"]["mean"] == pytest.approx((0.5, 0.5, None))

    table = format_switch_weights(weights).splitlines()
    assert table[0].split() == ["layer", "mean", "IN", "mean", "LN", "mean", "BN", "|"] + [
        "var",
        "IN",
        "var",
        "LN",
        "var",
        "BN",
    ]
    assert table[1].split() == ["0", "0.000", "0.000", "1.000", "|", "0.090", "0.245", "0.665"]
    assert table[2].split()[:2] == ["2", "-"] and table[3].split()[3] == "-"
    assert (
        format_switch_weights(switch_weights(syncsn.SwitchNorm2d(2)))
        .splitlines()[1]
        .startswith("(root)")
    )


# --- two ranks: one DistributedDataParallel step ---------------------------------------------


def _ddp_step(rank: int, state: dict, xs: list, targets: list) -> dict:
    model = deeplab().double()
    model.load_state_dict(state)
    model = convert_sync_switchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    loss = TF.cross_entropy(ddp(xs[rank]), targets[rank])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    return {
        "loss": loss.item(),
        "grads": grads,
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "buffers": {name: b.clone() for name, b in model.named_buffers()},
    }


def _convert_inside_ddp(rank: int) -> list[str]:
    messages = []
    for convert in (convert_sync_switchnorm, convert_switchnorm, convert_sync_batchnorm):
        ddp = nn.parallel.DistributedDataParallel(
            nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        )
        try:
            convert(ddp)
        except RuntimeError as error:
            messages.append(str(error))
        assert type(ddp.module[1]) is nn.BatchNorm2d  # nothing changed
        # A wrapped model inside another module is refused alike.
        with pytest.raises(RuntimeError, match=r"its submodule 'inner' is wrapped"):
            convert(nn.ModuleDict({"inner": ddp}))
    return messages


@pytest.mark.timeout(400)
def test_a_model_inside_ddp_is_refused(world) -> None:
    """DDP does not synchronize parameters added after wrapping: the converters refuse and
    name the order (convert, then wrap) and how to rewrap."""
    for messages in world.run(_convert_inside_ddp):
        assert len(messages) == 3
        for message in messages:
            assert "wrapped in DistributedDataParallel" in message
            assert "Convert first, then wrap" in message and "(ddp.module)" in message


@pytest.mark.timeout(400)  # includes starting the world on a busy machine
def test_ddp_training_step_on_two_ranks(world) -> None:
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(1, 3, 64, 64, generator=g, dtype=torch.float64) for _ in range(2)]
    targets = [torch.randint(0, 3, (1, 64, 64), generator=g) for _ in range(2)]
    model = deeplab().double()
    randomize_bn_(model, seed=6)
    state = model.state_dict()
    results = world.run(_ddp_step, state, xs, targets, timeout=200)

    # The same step on one process: local SN on the concatenated batch.
    local = convert_switchnorm(model).train()
    loss = TF.cross_entropy(local(torch.cat(xs)), torch.cat(targets))
    loss.backward()
    assert sum(r["loss"] for r in results) / 2 == pytest.approx(loss.item(), rel=1e-10)
    expected = {name: p.grad for name, p in local.named_parameters()}
    assert set(results[0]["grads"]) == set(expected)
    assert any(name.endswith("mean_weight") for name in expected)
    for name, grad in expected.items():
        for r in results:  # DDP's averaged gradient is the full-batch gradient, on each rank
            err = (r["grads"][name] - grad).norm() / grad.norm().clamp(min=1e-30)
            assert err <= 1e-8, (name, err.item())
    for kind in ("params", "buffers"):
        for name, value in results[0][kind].items():
            assert torch.equal(value, results[1][kind][name]), (kind, name)
    for name, buf in local.named_buffers():
        assert torch.allclose(results[0]["buffers"][name], buf, rtol=1e-10, atol=0), name
