"""Converting other libraries' norm layers: timm's norm-act layers and the frozen BatchNorms
of torchvision, timm and detectron2, and timm models built from them.

syncsn recognises these classes by package and class name, without importing the package.
:func:`foreign` gives the package's own class where the package imports (tests/thirdparty.py
loads torchvision and timm without their compiled operators), else the class rebuilt below
with the package's structure (constructor state, forward, module path).
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import thirdparty
import torch
import torch.nn.functional as TF
from torch import Tensor, nn

import syncsn
from syncsn import norm_act

thirdparty.install()  # before foreign() imports torchvision or timm


def foreign(module: str, name: str, rebuilt: type) -> type:
    """The class ``module.name`` when its package imports, else the rebuilt one."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # not installed, or its compiled parts do not load here
        return rebuilt


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d: BatchNorm2d, then ``drop``, then ``act``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, apply_act=True, act_layer=nn.ReLU, act_kwargs=None,
                 inplace=True, drop_layer=None, device=None, dtype=None):  # fmt: skip
        factory = {"device": device, "dtype": dtype}
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, **factory)  # fmt: skip
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        kwargs = dict(act_kwargs or {}, **({"inplace": True} if inplace else {}))
        self.act = act_layer(**kwargs) if act_layer is not None and apply_act else nn.Identity()

    def forward(self, x):
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        x = TF.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                          bn_training, factor, self.eps)  # fmt: skip
        return self.act(self.drop(x))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm.layers.norm_act.SyncBatchNormAct: ``act`` and ``drop`` set by timm's converter."""

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: statistics and affine as buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """timm.layers.norm_act.FrozenBatchNormAct2d (an nn.Module with the same buffers)."""

    def __init__(self, num_features: int, eps: float = 1e-5, act_layer=nn.ReLU):
        super().__init__(num_features, eps)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


BatchNormAct2d.__module__ = SyncBatchNormAct.__module__ = "timm.layers.norm_act"
FrozenBatchNormAct2d.__module__ = "timm.layers.norm_act"
FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"
BatchNormAct2d = foreign("timm.layers.norm_act", "BatchNormAct2d", BatchNormAct2d)
SyncBatchNormAct = foreign("timm.layers.norm_act", "SyncBatchNormAct", SyncBatchNormAct)
FrozenBatchNormAct2d = foreign("timm.layers.norm_act", "FrozenBatchNormAct2d", FrozenBatchNormAct2d)
FrozenBatchNorm2d = foreign("torchvision.ops.misc", "FrozenBatchNorm2d", FrozenBatchNorm2d)


class DropChannels(nn.Module):
    """A deterministic stand-in for timm's drop layers (zeroes every other channel)."""

    def forward(self, x: Tensor) -> Tensor:
        keep = torch.arange(x.shape[1], device=x.device) % 2 == 0
        return x * keep.view(1, -1, 1, 1).to(x.dtype)


def randomize_(layer: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(layer, name)
            t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "var" in name or name == "weight"
                    else torch.randn(t.shape, generator=g))  # fmt: skip
    return layer


def norm_act_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layer = BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=DropChannels)
    return nn.Sequential(nn.Conv2d(3, 6, 3), randomize_(layer, seed))


# converter -> (the class timm's BatchNormAct2d becomes, the plain class of its norm)
TARGETS = {
    "sn": (syncsn.convert_switchnorm, syncsn.SwitchNormAct2d, syncsn.SwitchNorm2d),
    "syncsn": (syncsn.convert_sync_switchnorm, syncsn.SyncSwitchNormAct2d,
               syncsn.SyncSwitchNorm2d),
    "ssn": (lambda m: syncsn.convert_switchnorm(m, sparse=True), syncsn.SparseSwitchNormAct2d,
            syncsn.SparseSwitchNorm2d),
    "syncssn": (lambda m: syncsn.convert_sync_switchnorm(m, sparse=True),
                syncsn.SyncSparseSwitchNormAct2d, syncsn.SyncSparseSwitchNorm2d),
    "syncbn": (syncsn.convert_sync_batchnorm, syncsn.SyncBatchNormAct, syncsn.SyncBatchNorm),
}  # fmt: skip


@pytest.mark.parametrize("target", list(TARGETS))
def test_timm_norm_act_converts_keeping_act_drop_and_state(target) -> None:
    convert, cls, plain_cls = TARGETS[target]
    model = norm_act_model()
    old = model[1]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: p for k, p in old.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = convert(model)[1]
    assert type(new) is cls
    assert new.act is old.act and new.drop is old.drop
    assert all(getattr(new, k) is p for k, p in params.items())
    assert new.running_mean is old.running_mean and new.running_var is old.running_var
    converted_state = new.state_dict()
    for key, value in state.items():
        if key.startswith("1."):
            assert torch.equal(converted_state[key[2:]], value), key
    # The same norm, then drop, then act.
    plain = plain_cls(6)
    plain.load_state_dict(converted_state, strict=True)
    x = torch.randn(4, 6, 5, 5)
    for training in (True, False):
        new.train(training), plain.train(training)
        want = TF.silu(DropChannels()(plain(x)))
        assert torch.allclose(new(x), want, atol=1e-6), training


def test_timm_norm_act_through_sync_and_back() -> None:
    """BatchNormAct2d -> SyncBatchNormAct -> revert_sync: a local norm-act layer computing
    what timm's did, in training and in eval."""
    model = norm_act_model()
    reference = norm_act_model()  # the same, untouched
    x = torch.randn(4, 3, 7, 7)
    local = syncsn.revert_sync(syncsn.convert_sync_batchnorm(model))
    assert type(local[1]) is syncsn.BatchNormAct2d
    assert local[1].act is model[1].act
    for training in (True, False):
        local.train(training), reference.train(training)
        assert torch.allclose(local(x), reference(x), atol=1e-6), training
    # A switchable norm-act layer goes back to its local twin, same state.
    sync = syncsn.convert_sync_switchnorm(norm_act_model(), init="bn")
    state = sync.state_dict()
    back = syncsn.revert_sync(sync)
    assert type(back[1]) is syncsn.SwitchNormAct2d
    assert back.state_dict().keys() == state.keys()


def test_timm_sync_batchnorm_act_converts() -> None:
    layer = SyncBatchNormAct(6)
    layer.act, layer.drop = nn.Hardswish(), DropChannels()
    bare = SyncBatchNormAct(6)  # timm's forward also allows a layer without act or drop
    new = syncsn.convert_sync_switchnorm(nn.Sequential(layer, bare))
    assert type(new[0]) is syncsn.SyncSwitchNormAct2d and new[0].act is layer.act
    assert type(new[1]) is syncsn.SyncSwitchNormAct2d
    assert isinstance(new[1].act, nn.Identity) and isinstance(new[1].drop, nn.Identity)


def test_norm_act_layers_take_timms_arguments() -> None:
    layer = syncsn.SyncSwitchNormAct2d(
        4, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}, inplace=False
    )
    assert isinstance(layer.act, nn.LeakyReLU) and layer.act.negative_slope == 0.2
    assert not layer.act.inplace
    assert isinstance(syncsn.SwitchNormAct2d(4, apply_act=False).act, nn.Identity)
    assert isinstance(syncsn.BatchNormAct2d(4).act, nn.ReLU)  # timm's default
    with pytest.raises(TypeError, match=r"act_layer must be a module class.*'silu'"):
        syncsn.SwitchNormAct2d(4, act_layer="silu")
    with pytest.raises(ValueError, match=r"no norm-act layer for SwitchNorm3d"):
        norm_act.with_act(syncsn.SwitchNorm3d)


# --- frozen BatchNorms ----------------------------------------------------------------------


def frozen_model(cls=FrozenBatchNorm2d) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3), randomize_(cls(6), seed=2), nn.BatchNorm2d(6))


def test_frozen_batchnorm_is_left_alone_and_named() -> None:
    model = frozen_model()
    with pytest.warns(UserWarning) as record:
        out = syncsn.convert_sync_switchnorm(model)
    assert len(record) == 1
    message = str(record[0].message)
    assert "layer '1' (FrozenBatchNorm2d)" in message and "convert_frozen=True" in message
    assert type(out[1]) is FrozenBatchNorm2d and type(out[2]) is syncsn.SyncSwitchNorm2d


@pytest.mark.parametrize("cls", [FrozenBatchNorm2d, FrozenBatchNormAct2d])
def test_frozen_batchnorm_converted_on_request(cls) -> None:
    """convert_frozen=True: a trainable layer that starts from the frozen statistics, so
    that SyncBatchNorm in eval mode computes exactly what the frozen layer did."""
    model = frozen_model(cls)
    frozen = model[1]
    x = torch.randn(2, 3, 8, 8)
    want = model.eval()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = syncsn.convert_sync_batchnorm(model, convert_frozen=True)
    new = out[1]
    expected = syncsn.SyncBatchNormAct if hasattr(frozen, "act") else syncsn.SyncBatchNorm
    assert type(new) is expected
    assert isinstance(new.weight, nn.Parameter) and new.weight.requires_grad
    assert torch.equal(new.weight, frozen.weight) and torch.equal(new.bias, frozen.bias)
    assert new.running_mean is frozen.running_mean and new.eps == frozen.eps
    if hasattr(frozen, "act"):
        assert new.act is frozen.act
    assert torch.allclose(out.eval()(x), want, atol=1e-6)
    # SN from the same statistics, started as BN: within 1e-3 in eval mode.
    sn = syncsn.convert_switchnorm(frozen_model(cls), init="bn", convert_frozen=True)
    assert torch.allclose(sn.eval()(x), want, atol=1e-3)
    sn[1].train()(torch.randn(2, 6, 4, 4)).sum().backward()  # trainable
    assert sn[1].weight.grad is not None and sn[1].mean_weight.grad is not None


class PlainFrozen(FrozenBatchNorm2d):
    """A subclass that adds nothing: a frozen BatchNorm all the same."""


class ClampedFrozen(FrozenBatchNorm2d):
    """A subclass that adds behaviour, which converting would drop."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).clamp(min=0)


def test_subclasses_of_frozen_batchnorms_are_named_or_converted() -> None:
    """A plain subclass is a frozen BatchNorm (left alone with its reason, or converted on
    request); one that overrides forward is listed for what it adds, even on request."""
    with pytest.warns(UserWarning) as record:
        out = syncsn.convert_sync_switchnorm(frozen_model(PlainFrozen))
    assert len(record) == 1
    message = str(record[0].message)
    assert "layer '1' (PlainFrozen): its statistics" in message and "convert_frozen" in message
    assert type(out[1]) is PlainFrozen
    model = frozen_model(PlainFrozen)
    x = torch.randn(2, 3, 8, 8)
    want = model.eval()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = syncsn.convert_sync_batchnorm(model, convert_frozen=True)
    assert type(out[1]) is syncsn.SyncBatchNorm
    assert torch.allclose(out.eval()(x), want, atol=1e-6)
    for convert_frozen in (False, True):
        with pytest.warns(UserWarning) as record:
            out = syncsn.convert_switchnorm(
                frozen_model(ClampedFrozen), convert_frozen=convert_frozen
            )
        assert len(record) == 1
        message = str(record[0].message)
        assert "layer '1' (ClampedFrozen): its class ClampedFrozen defines forward" in message
        assert type(out[1]) is ClampedFrozen and type(out[2]) is syncsn.SwitchNorm2d


# --- one warning per call -------------------------------------------------------------------


class FusedBNReLU(nn.BatchNorm2d):
    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(super().forward(x))


def test_one_warning_per_call_at_the_callers_line() -> None:
    """Many layers left alone: one warning that lists each with its reason, attributed to
    this file (the caller's line), not to syncsn."""
    model = nn.Sequential(*[FusedBNReLU(4) for _ in range(5)], FrozenBatchNorm2d(4))
    with pytest.warns(UserWarning) as record:
        syncsn.convert_sync_switchnorm(model)
    assert len(record) == 1
    assert record[0].filename == __file__
    message = str(record[0].message)
    assert "left 6 normalization layer(s) unchanged" in message
    for i in range(5):
        assert f"layer '{i}' (FusedBNReLU): its class FusedBNReLU defines forward" in message
    assert "layer '5' (FrozenBatchNorm2d)" in message
    # The same through SyncBatchNorm's classmethod: still the caller's line.
    with pytest.warns(UserWarning) as record:
        syncsn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(FusedBNReLU(4)))
    assert len(record) == 1 and record[0].filename == __file__


# --- timm models ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, count", [("efficientnet_b0", 49), ("regnety_002", 44)])
def test_timm_models_built_from_norm_act_layers(name, count) -> None:
    """Every BatchNormAct2d becomes a SyncSwitchNormAct2d with its activation, without a
    warning; the BatchNorm checkpoint loads (the logits aside); the model trains and
    reverts to local layers."""
    timm = thirdparty.import_module("timm")
    torch.manual_seed(15)
    model = timm.create_model(name, pretrained=False, num_classes=3)
    checkpoint = model.state_dict()
    acts = {n: type(m.act) for n, m in model.named_modules() if hasattr(m, "act")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = syncsn.convert_sync_switchnorm(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, syncsn.SyncSwitchNormAct2d)}
    assert len(layers) == count
    assert all(type(m.act) is acts[n] for n, m in layers.items())
    missing, unexpected = model.load_state_dict(checkpoint, strict=False)
    assert not unexpected
    assert all(key.endswith(("mean_weight", "var_weight")) for key in missing)
    x = torch.randn(2, 3, 32, 32)
    model.train()(x).square().mean().backward()
    local = syncsn.revert_sync(model).eval()
    assert sum(isinstance(m, syncsn.SwitchNormAct2d) for m in local.modules()) == count
    assert torch.isfinite(local(x)).all()


def test_the_warning_names_only_what_the_converter_would_convert() -> None:
    """revert_sync does not report a BatchNorm it would never touch, nor the BatchNorm
    converters a switchable layer."""
    sn = syncsn.SwitchNorm2d(4)
    sn.register_forward_hook(lambda *args: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        syncsn.revert_sync(nn.Sequential(FusedBNReLU(4), FrozenBatchNorm2d(4)))
        syncsn.convert_sync_batchnorm(nn.Sequential(sn))
        syncsn.convert_switchnorm(nn.Sequential(sn))
    sync = syncsn.SyncSwitchNorm2d(4)
    sync.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"layer '0' \(SyncSwitchNorm2d\).*hooks"):
        syncsn.revert_sync(nn.Sequential(sync))
