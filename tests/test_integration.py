"""syncsn's layers where code written for torch's classes and for OpenMMLab meets them.

- SyncBatchNorm is a torch.nn.SyncBatchNorm: constructor, repr and state dict compared with
  torch's own; both converters; DistributedDataParallel's CPU check.
- The switchable layers are _BatchNorm layers: the mmdet ``norm_eval`` pattern and
  mmengine's optimizer constructor (``norm_decay_mult``) treat them as batch normalization.
- mmengine / mmcv: registration, scoped names, mmcv's build_norm_layer as the reference for
  the (name, layer) form, mmengine's converter.
- State dicts in the SSN authors' format load, frozen selections included.
- The public API has real signatures and documented arguments, shapes and examples.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import subprocess
import sys
import types
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

import syncsn
from syncsn import batchnorm

pytestmark = pytest.mark.timeout(120)

SN_CLASSES = [
    syncsn.SwitchNorm1d,
    syncsn.SwitchNorm2d,
    syncsn.SwitchNorm3d,
    syncsn.SyncSwitchNorm1d,
    syncsn.SyncSwitchNorm2d,
    syncsn.SyncSwitchNorm3d,
    syncsn.SparseSwitchNorm1d,
    syncsn.SparseSwitchNorm2d,
    syncsn.SparseSwitchNorm3d,
    syncsn.SyncSparseSwitchNorm1d,
    syncsn.SyncSparseSwitchNorm2d,
    syncsn.SyncSparseSwitchNorm3d,
]


# --- SyncBatchNorm as a torch.nn.SyncBatchNorm ----------------------------------------------


def test_syncbatchnorm_is_torchs_class_with_its_constructor() -> None:
    assert issubclass(syncsn.SyncBatchNorm, nn.SyncBatchNorm)
    assert isinstance(syncsn.SyncBatchNorm(4), _BatchNorm)

    def shape(cls: type) -> list[tuple]:
        params = inspect.signature(cls.__init__).parameters.values()
        return [(p.name, p.kind, p.default) for p in params]

    assert shape(syncsn.SyncBatchNorm) == shape(nn.SyncBatchNorm)


def _configs() -> list[dict]:
    configs = [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}]
    if batchnorm.TORCH_HAS_BIAS:
        configs.append({"bias": False})
    return configs


@pytest.mark.parametrize("config", _configs(), ids=str)
def test_syncbatchnorm_repr_and_state_dict_equal_torchs(config: dict) -> None:
    ours, theirs = syncsn.SyncBatchNorm(6, **config), nn.SyncBatchNorm(6, **config)
    assert repr(ours) == repr(theirs)
    mine, other = ours.state_dict(), theirs.state_dict()
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in other.items()}
    with torch.no_grad():
        for t in theirs.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 2.0)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_syncbatchnorm_without_bias_computes_batchnorm_without_bias() -> None:
    if not batchnorm.TORCH_HAS_BIAS:  # torch before 2.13: no bias argument, as torch's
        with pytest.raises(TypeError):
            syncsn.SyncBatchNorm(5, bias=False)
        return
    layer, reference = syncsn.SyncBatchNorm(5, bias=False), nn.BatchNorm2d(5, bias=False)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        reference.weight.copy_(layer.weight)
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64) * 3 + 1
    layer, reference = layer.double(), reference.double()
    assert layer.bias is None and "bias" not in layer.state_dict()
    assert torch.allclose(layer(x), reference(x), rtol=1e-10, atol=1e-10)
    assert torch.allclose(layer.running_var, reference.running_var, rtol=1e-10)


def _mixed_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        syncsn.SyncBatchNorm(4),
        syncsn.SwitchNorm2d(4),
        syncsn.SyncSwitchNorm2d(4),
        syncsn.SparseSwitchNorm2d(4),
        syncsn.SyncSparseSwitchNorm2d(4),
    )


def test_classmethod_converter_gives_syncsn_layers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    weight = model[1].weight
    out = syncsn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(out[1]) is syncsn.SyncBatchNorm and type(out[2][0]) is syncsn.SyncBatchNorm
    assert out[1].weight is weight
    root = syncsn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2))
    assert type(root) is syncsn.SyncBatchNorm


def test_torchs_converter_keeps_syncsn_layers() -> None:
    model = _mixed_model()
    before = list(model)
    group = types.SimpleNamespace(name="a group")  # the converter only stores it
    out = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert type(out[1]) is nn.SyncBatchNorm  # torch's own conversion still happens
    for i in range(2, len(before)):
        assert out[i] is before[i], type(before[i]).__name__
    for i in (2, 4, 6):  # the synchronized ones take the group, as torch's layers would
        assert out[i].process_group is group
    sn = syncsn.SwitchNorm2d(3)
    assert nn.SyncBatchNorm.convert_sync_batchnorm(sn) is sn


def test_ddp_cpu_check_exempts_only_syncsn_layers() -> None:
    """DistributedDataParallel refuses a CPU model with torch's SyncBatchNorm (which cannot
    run there) but not one with syncsn's (run under DDP on gloo in test_ddp.py)."""
    refused = []

    def log_and_throw(kind: type, message: str) -> None:
        refused.append(message)
        raise kind(message)

    ddp = types.SimpleNamespace(device_type="cpu", _log_and_throw=log_and_throw)
    check = DistributedDataParallel._passing_sync_batchnorm_handle
    check(ddp, nn.Sequential(syncsn.SyncBatchNorm(3), syncsn.SyncSwitchNorm2d(3)))
    assert refused == []
    with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
        check(ddp, nn.Sequential(syncsn.SyncBatchNorm(3), nn.SyncBatchNorm(3)))


def test_patches_are_installed_once() -> None:
    converter = nn.SyncBatchNorm.convert_sync_batchnorm
    check = DistributedDataParallel._passing_sync_batchnorm_handle
    fuse = torch.nn.utils.fusion.fuse_conv_bn_eval
    syncsn._torch_compat.install()
    assert nn.SyncBatchNorm.convert_sync_batchnorm.__func__ is converter.__func__
    assert DistributedDataParallel._passing_sync_batchnorm_handle is check
    assert torch.nn.utils.fusion.fuse_conv_bn_eval is fuse is torch.nn.utils.fuse_conv_bn_eval


# --- the switchable layers as _BatchNorm layers ----------------------------------------------


@pytest.mark.parametrize("cls", SN_CLASSES, ids=lambda c: c.__name__)
def test_switchable_layers_are_batchnorm_layers(cls: type) -> None:
    layer = cls(4)
    assert isinstance(layer, _BatchNorm) and not isinstance(layer, nn.SyncBatchNorm)
    # _NormBase's constructor is not used: parameters, buffers and keys are the layer's own.
    expected = {"weight", "bias", "mean_weight", "var_weight", "running_mean", "running_var"}
    expected |= {"num_batches_tracked"}
    if "Sparse" in cls.__name__:
        expected |= {"radius", "frozen_mean", "frozen_var"}
    assert set(layer.state_dict()) == expected


class _Backbone(nn.Module):
    """The mmdet pattern: ``norm_eval`` keeps every batch-normalization layer in eval mode
    while the rest of the network trains (BN statistics frozen for small batches)."""

    def __init__(self, norms: list[nn.Module], norm_eval: bool = True) -> None:
        super().__init__()
        self.norm_eval = norm_eval
        self.layers = nn.Sequential(*[m for norm in norms for m in (nn.Conv2d(4, 4, 1), norm)])

    def train(self, mode: bool = True) -> _Backbone:
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_norm_eval_pattern_freezes_switchable_layers() -> None:
    norms = [
        syncsn.SwitchNorm2d(4),
        syncsn.SyncSwitchNorm2d(4),
        syncsn.SparseSwitchNorm2d(4),
        syncsn.SyncBatchNorm(4),
    ]
    model = _Backbone(norms).train()
    assert model.training and model.layers[0].training
    assert [m.training for m in norms] == [False] * len(norms)
    before = [m.running_mean.clone() for m in norms]
    model(torch.randn(2, 4, 5, 5) + 3)
    for m, saved in zip(norms, before, strict=True):
        assert torch.equal(m.running_mean, saved) and int(m.num_batches_tracked) == 0


def test_mmengine_norm_decay_mult_covers_switchable_layers() -> None:
    mmengine_optim = pytest.importorskip("mmengine.optim")
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        syncsn.SwitchNorm2d(4),
        syncsn.SyncSparseSwitchNorm2d(4),
        syncsn.SyncBatchNorm(4),
    )
    constructor = mmengine_optim.DefaultOptimWrapperConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.1, weight_decay=1e-4)),
        paramwise_cfg=dict(norm_decay_mult=0.0),
    )
    groups = constructor(model).optimizer.param_groups
    decay = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    assert decay[id(model[0].weight)] == 1e-4 and decay[id(model[0].bias)] == 1e-4
    for norm in model[1:]:
        for name, param in norm.named_parameters():
            assert decay[id(param)] == 0.0, f"{type(norm).__name__}.{name}"
    assert {"mean_weight", "var_weight"} <= {n for n, _ in model[1].named_parameters()}


def test_swa_update_bn_recomputes_switchable_statistics() -> None:
    """torch.optim.swa_utils.update_bn resets every _BatchNorm's statistics and averages them
    over a loader with momentum None: the mean of the per-batch BN-scope statistics."""
    from reference import sn_forward

    layer = syncsn.SwitchNorm2d(3).double()
    with torch.no_grad():
        layer.running_mean.fill_(5.0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    torch.optim.swa_utils.update_bn(batches, layer)
    params = [getattr(layer, n).detach() for n in ("weight", "bias", "mean_weight", "var_weight")]
    stats = [sn_forward(x, *params, eps=1e-5, training=True)[1] for x in batches]
    expected_mean = torch.stack([s.mean for s in stats]).mean(0)
    expected_var = torch.stack([s.var for s in stats]).mean(0)
    assert torch.allclose(layer.running_mean, expected_mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(layer.running_var, expected_var, rtol=1e-10, atol=1e-12)
    assert layer.momentum == 0.1 and int(layer.num_batches_tracked) == 3


# --- fusing convolution and normalization ---------------------------------------------------


def settled_on_bn(layer: nn.Module) -> nn.Module:
    """An SSN layer whose means and variances are frozen on BN, loaded as from a checkpoint,
    with random affine parameters and running statistics."""
    state = layer.state_dict()
    bn = torch.tensor(layer.scopes.index("bn"))
    state.update(frozen_mean=bn, frozen_var=bn)
    layer.load_state_dict(state)
    return randomized(layer)


def randomized(layer: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(layer, name).copy_(torch.randn(layer.num_features, generator=g))
        layer.running_var.copy_(torch.rand(layer.num_features, generator=g) + 0.5)
    return layer.eval()


def conv_norm(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, norm.num_features, 3), norm).eval()


# A layer whose output depends on each input's IN / LN statistics: never fused.
UNFUSABLE = [
    lambda: syncsn.SwitchNorm2d(4),
    lambda: syncsn.SyncSwitchNorm2d(4),
    lambda: syncsn.SparseSwitchNorm2d(4),  # not frozen
    lambda: syncsn.SwitchNormAct2d(4),
]


@pytest.mark.parametrize("make", UNFUSABLE, ids=lambda f: type(f()).__name__)
def test_fusing_a_switchable_layer_is_refused(make) -> None:
    model = conv_norm(randomized(make()))
    conv, norm = model
    name = type(norm).__name__
    for fuse in (torch.nn.utils.fusion.fuse_conv_bn_eval, torch.nn.utils.fuse_conv_bn_eval):
        with pytest.raises(ValueError, match=rf"fuse_conv_bn_eval: cannot fuse {name}\(4\).*"
                           r"IN / LN statistics of each input.*Leave it unfused"):  # fmt: skip
            fuse(conv, norm)
    linear = nn.Linear(3, 4).eval()
    for fuse in (torch.nn.utils.fusion.fuse_linear_bn_eval, torch.nn.utils.fuse_linear_bn_eval):
        with pytest.raises(ValueError, match=r"fuse_linear_bn_eval: cannot fuse .*LN statistics"):
            fuse(linear, randomized(syncsn.SwitchNorm1d(4)))


def test_mmcv_fuse_conv_bn_refuses_a_switchable_layer_before_changing_anything() -> None:
    cnn = pytest.importorskip("mmcv.cnn")
    model = nn.Sequential(conv_norm(nn.BatchNorm2d(4)), conv_norm(syncsn.SwitchNorm2d(4)))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"mmcv.cnn.fuse_conv_bn: cannot fuse SwitchNorm2d"):
        cnn.fuse_conv_bn(model)
    assert type(model[0][1]) is nn.BatchNorm2d  # the BatchNorm before it is not fused either
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match=r"cannot fuse SparseSwitchNorm2d.*variances on no scope"):
        sys.modules["mmcv.cnn.utils.fuse_conv_bn"]._fuse_conv_bn(*conv_norm(ssn_on_in()))


def ssn_on_in() -> nn.Module:
    layer = syncsn.SparseSwitchNorm2d(4)
    state = layer.state_dict()
    state["frozen_mean"] = torch.tensor(layer.scopes.index("in"))
    layer.load_state_dict(state)
    return randomized(layer)


FUSABLE = [
    lambda: nn.BatchNorm2d(4),
    lambda: syncsn.SyncBatchNorm(4),
    lambda: settled_on_bn(syncsn.SparseSwitchNorm2d(4)),
    lambda: settled_on_bn(syncsn.SyncSparseSwitchNorm2d(4)),
]


@pytest.mark.parametrize("make", FUSABLE, ids=lambda f: type(f()).__name__)
def test_batchnorm_and_ssn_settled_on_bn_fuse_exactly(make) -> None:
    """torch's and mmcv's fusions give the unfused output (a BatchNorm in eval mode)."""
    x = torch.randn(2, 3, 9, 9)
    model = conv_norm(randomized(make()))
    want = model(x)
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(*model)
    assert torch.allclose(fused(x), want, atol=1e-5)
    cnn = pytest.importorskip("mmcv.cnn")
    fused_model = cnn.fuse_conv_bn(model)
    assert type(fused_model[1]) is nn.Identity
    assert torch.allclose(fused_model(x), want, atol=1e-5)


def test_fx_and_quantization_fusers_refuse_switchable_layers() -> None:
    import torch.ao.quantization
    import torch.fx.experimental.optimization

    model = conv_norm(syncsn.SwitchNorm2d(4))
    with pytest.raises(torch.fx.proxy.TraceError):  # fx cannot trace the layer
        torch.fx.experimental.optimization.fuse(model)
    with pytest.raises(AssertionError, match="did not find fuser method"):
        torch.ao.quantization.fuse_modules(model, [["0", "1"]])
    assert type(model[1]) is syncsn.SwitchNorm2d


# --- mmengine / mmcv --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mm():
    registry = pytest.importorskip("mmengine.registry")
    cnn = pytest.importorskip("mmcv.cnn")
    import syncsn.integrations as integrations

    return types.SimpleNamespace(
        MODELS=registry.MODELS,
        Registry=registry.Registry,
        mmcv_build=cnn.build_norm_layer,
        integrations=integrations,
    )


def test_mmengine_builds_syncsn_layers_by_name(mm) -> None:
    for name, cls in mm.integrations.MMENGINE_NAMES.items():
        layer = mm.MODELS.build(dict(type=name, num_features=6))
        assert type(layer) is cls and layer.num_features == 6
    assert mm.MODELS.get("SyncSN") is syncsn.SyncSwitchNorm2d
    assert mm.MODELS.get("SSN3d") is syncsn.SparseSwitchNorm3d
    # mmcv's own names keep their meaning.
    theirs = mm.MODELS.get("SyncBN")
    assert issubclass(theirs, nn.SyncBatchNorm) and not issubclass(theirs, syncsn.SyncBatchNorm)
    assert mm.MODELS.get("LN") is nn.LayerNorm


def test_scoped_names_from_a_downstream_registry(mm) -> None:
    """mmdet and mmseg build from child registries of mmengine's MODELS."""
    downstream = mm.MODELS.children.get("syncsn_test") or mm.Registry(
        "model", parent=mm.MODELS, scope="syncsn_test"
    )
    assert downstream.get("SyncSN") is syncsn.SyncSwitchNorm2d
    assert downstream.get("syncsn.SyncBN") is syncsn.SyncBatchNorm
    assert downstream.get("syncsn.SSN1d") is syncsn.SparseSwitchNorm1d
    layer = downstream.build(dict(type="syncsn.SyncBN", num_features=3))
    assert type(layer) is syncsn.SyncBatchNorm


CONFIGS = [
    dict(type="SyncSN"),
    dict(type="SN", requires_grad=False, eps=1e-3),
    dict(type="SSN"),
    dict(type="SyncSSN", using_bn=False),
    dict(type="BN"),
    dict(type="GN", num_groups=2),
    dict(type="IN", affine=True),
    dict(type=syncsn.SwitchNorm2d, momentum=0.01),
    dict(type=nn.GroupNorm, num_groups=4),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: str(c["type"]))
@pytest.mark.parametrize("postfix", ["", 1, "_a"])
def test_named_form_matches_mmcv(mm, cfg: dict, postfix) -> None:
    theirs_name, theirs = mm.mmcv_build(cfg, 8, postfix=postfix)
    ours_name, ours = syncsn.build_named_norm_layer(cfg, 8, postfix=postfix)
    assert ours_name == theirs_name
    assert type(ours) is type(theirs) and repr(ours) == repr(theirs)
    assert [p.requires_grad for p in ours.parameters()] == [
        p.requires_grad for p in theirs.parameters()
    ]


def test_scoped_names_need_no_import_of_syncsn() -> None:
    """mmengine imports syncsn.registry by itself for a type in the scope 'syncsn'."""
    pytest.importorskip("mmengine")
    code = (
        "import sys\n"
        "from mmengine.registry import MODELS\n"
        "assert 'syncsn' not in sys.modules\n"
        "layer = MODELS.build(dict(type='syncsn.SyncSN', num_features=4))\n"
        "print(type(layer).__name__, MODELS.get('SSN').__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SyncSwitchNorm2d", "SparseSwitchNorm2d"]


# Builds every name through mmcv's build_norm_layer and mmengine's MODELS.build, in a process
# that imports the modules of argv[1] in that order first, and prints the classes' names.
IMPORT_ORDER_PROBE = """
import importlib, json, sys, warnings
warnings.filterwarnings("error", message="syncsn")
for name in sys.argv[1].split(","):
    importlib.import_module(name)
import mmcv.cnn, mmengine.model, mmengine.registry, torch, syncsn
built = {}
for name in json.loads(sys.argv[2]):
    layer = mmcv.cnn.build_norm_layer(dict(type=name), 8)[1]
    again = mmengine.registry.MODELS.build(dict(type=name, num_features=8))
    built[name] = [type(layer).__qualname__, type(again).__qualname__]
kept = mmengine.model.convert_sync_batchnorm(torch.nn.Sequential(syncsn.SwitchNorm2d(4)))
try:
    mmcv.cnn.fuse_conv_bn(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), syncsn.SwitchNorm2d(4)))
    fused = "fused"
except ValueError:
    fused = "refused"
print(json.dumps({
    "built": built,
    "converted": type(kept[0]).__qualname__,
    "fusion": fused,
    "loader": type(mmengine.registry.__loader__).__qualname__,
}))
"""


@pytest.mark.parametrize(
    "order",
    ["syncsn,mmcv.cnn", "mmcv.cnn,syncsn", "syncsn,mmengine.registry", "mmengine,syncsn"],
)
def test_names_build_whichever_is_imported_first(order: str) -> None:
    """Plain and scoped names, in mmcv's and mmengine's builders, without custom_imports,
    whether syncsn is imported before or after mmengine (a fresh interpreter each)."""
    pytest.importorskip("mmcv.cnn")
    from syncsn.integrations import MMENGINE_NAMES

    expected = {name: cls.__qualname__ for name, cls in MMENGINE_NAMES.items()}
    expected.update({f"syncsn.{name}": cls for name, cls in expected.items()})
    expected["syncsn.SyncBN"] = syncsn.SyncBatchNorm.__qualname__
    expected["SyncBN"] = nn.SyncBatchNorm.__qualname__  # mmcv's own name keeps its meaning
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ORDER_PROBE, order, json.dumps(sorted(expected))],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["built"] == {name: [cls, cls] for name, cls in expected.items()}
    # mmengine's SyncBatchNorm converter leaves syncsn's layers alone in this order too.
    assert result["converted"] == "SwitchNorm2d"
    # mmcv's fuse_conv_bn refuses a switchable layer in this order too.
    assert result["fusion"] == "refused"
    # The import hook leaves mmengine's modules with their own loader.
    assert result["loader"] == "SourceFileLoader"


def test_import_hook_runs_its_action_once_the_module_is_executed(tmp_path, monkeypatch) -> None:
    from syncsn.integrations import _ImportHook

    (tmp_path / "syncsn_hooked_pkg").mkdir()
    (tmp_path / "syncsn_hooked_pkg" / "__init__.py").write_text("VALUE = 1\n")
    (tmp_path / "syncsn_hooked_pkg" / "child.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[tuple[str, int]] = []

    def record(module: types.ModuleType) -> None:
        seen.append((module.__name__, module.VALUE))

    def fail(module: types.ModuleType) -> None:
        raise KeyError("the registry changed")

    hook = _ImportHook({"syncsn_hooked_pkg": record, "syncsn_hooked_pkg.child": fail})
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    for name in ("syncsn_hooked_pkg", "syncsn_hooked_pkg.child"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import syncsn_hooked_pkg  # type: ignore[import-not-found]

    assert seen == [("syncsn_hooked_pkg", 1)]  # executed before the action ran
    assert type(syncsn_hooked_pkg.__loader__).__name__ == "SourceFileLoader"
    assert syncsn_hooked_pkg.__spec__.loader is syncsn_hooked_pkg.__loader__
    # A failing action is a warning: the import itself succeeds.
    with pytest.warns(RuntimeWarning, match=r"could not register .*KeyError.*registry changed"):
        import syncsn_hooked_pkg.child  # type: ignore[import-not-found]
    assert syncsn_hooked_pkg.child.VALUE == 2
    assert seen == [("syncsn_hooked_pkg", 1)]


def test_named_form_of_layer_norm(mm) -> None:
    # The SN paper's LN, GroupNorm(1, C); mmcv's LN is torch.nn.LayerNorm (not the same).
    name, layer = syncsn.build_named_norm_layer("LN", 8, postfix=2)
    assert name == "ln2" and type(layer) is nn.GroupNorm and layer.num_groups == 1
    assert type(mm.mmcv_build(dict(type="LN"), 8)[1]) is nn.LayerNorm


def test_a_name_taken_by_another_class_is_left_alone(mm) -> None:
    private = mm.Registry("model")
    private.register_module(name="SN", module=nn.BatchNorm2d)
    with pytest.warns(UserWarning, match=r"'SN'.*already belongs to .*BatchNorm2d"):
        mm.integrations._register(private, "SN", syncsn.SwitchNorm2d, force=False)
    assert private.get("SN") is nn.BatchNorm2d
    mm.integrations._register(private, "SN", syncsn.SwitchNorm2d, force=True)
    assert private.get("SN") is syncsn.SwitchNorm2d
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mm.integrations.register_mmengine()  # again: nothing to say


def test_mmengine_converter_keeps_syncsn_layers(mm) -> None:
    import mmengine.model

    model = _mixed_model()
    before = list(model)
    out = mmengine.model.convert_sync_batchnorm(model)
    assert type(out[1]) is nn.SyncBatchNorm
    for i in range(2, len(before)):
        assert out[i] is before[i], type(before[i]).__name__


# --- the SSN authors' state dicts ----------------------------------------------------------


def _authors_ssn_state(c: int, mean_scope: int | None, var_scope: int | None) -> dict:
    """A state dict in the layout of the SSN authors' SSN2d: (1, C, 1, 1) affine parameters,
    (1, C, 1) running statistics (starting at 0), a one-element radius, 0/1 flags
    ``mean_fixed`` / ``var_fixed``, and frozen logits overwritten with the one-hot choice."""
    g = torch.Generator().manual_seed(3)

    def logits(scope: int | None) -> torch.Tensor:
        if scope is None:
            return torch.randn(3, generator=g)
        return torch.nn.functional.one_hot(torch.tensor(scope), 3).float()

    return {
        "weight": torch.rand(1, c, 1, 1, generator=g) + 0.5,
        "bias": torch.randn(1, c, 1, 1, generator=g),
        "mean_weight": logits(mean_scope),
        "var_weight": logits(var_scope),
        "running_mean": torch.randn(1, c, 1, generator=g),
        "running_var": torch.rand(1, c, 1, generator=g) + 0.5,
        "mean_fixed": torch.LongTensor([0 if mean_scope is None else 1]),
        "var_fixed": torch.LongTensor([0 if var_scope is None else 1]),
        "radius": torch.tensor([0.4]),
    }


@pytest.mark.parametrize(
    "cls", [syncsn.SparseSwitchNorm2d, syncsn.SyncSparseSwitchNorm2d], ids=lambda c: c.__name__
)
def test_ssn_authors_state_dict_loads_with_frozen_selection(cls: type) -> None:
    c = 5
    state = _authors_ssn_state(c, mean_scope=1, var_scope=2)  # means on LN, variances on BN
    layer = cls(c).double()
    layer.load_state_dict(state, strict=True)
    assert layer.frozen_scopes == ("ln", "bn")
    assert layer.radius.shape == () and layer.radius.item() == pytest.approx(0.4)
    assert layer.weight.shape == (c,) and layer.running_var.shape == (c,)
    # The authors' eval output for these selections: LN means, running variances.
    x = torch.randn(3, c, 4, 6, dtype=torch.float64) * 2 + 1
    mean_ln = x.mean(dim=(1, 2, 3), keepdim=True)
    var = state["running_var"].double().view(1, c, 1, 1)
    w, b = (state[k].double() for k in ("weight", "bias"))
    expected = (x - mean_ln) / torch.sqrt(var + 1e-5) * w + b
    got = layer.eval()(x)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)
    # Our own layout round-trips strictly.
    cls(c).double().load_state_dict(layer.state_dict(), strict=True)


def test_ssn_authors_state_dict_not_frozen() -> None:
    state = _authors_ssn_state(4, mean_scope=None, var_scope=0)
    layer = syncsn.SparseSwitchNorm2d(4)
    layer.load_state_dict(state, strict=True)
    assert layer.frozen_scopes == (None, "in")
    assert torch.equal(layer.mean_weight, state["mean_weight"])


# --- the public API: real signatures, documented -------------------------------------------

# Builders that pass keyword arguments on to the layer they build.
FORWARDING = {"build_norm_layer", "build_named_norm_layer"}


@pytest.mark.parametrize("name", syncsn.__all__)
def test_public_api_signatures_and_docstrings(name: str) -> None:
    obj = getattr(syncsn, name)
    params = inspect.signature(obj).parameters.values()
    kinds = {p.kind for p in params}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds, name
    if name not in FORWARDING:
        assert inspect.Parameter.VAR_KEYWORD not in kinds, name
    doc = inspect.getdoc(obj) or ""
    documented = [p.name for p in params if p.name != "self"]
    assert documented == [] or "Args:" in doc, f"{name}: no Args section"
    for arg in documented:
        assert re.search(rf"\b{arg}\b", doc), f"{name}: argument {arg} not documented"
    assert "Example" in doc, f"{name}: no example"
    if inspect.isclass(obj) and issubclass(obj, nn.Module):
        assert "Shape:" in doc, f"{name}: no Shape section"


def test_package_is_typed() -> None:
    from pathlib import Path

    assert (Path(syncsn.__file__).parent / "py.typed").is_file()
    assert "py.typed" in (Path(syncsn.__file__).parents[1] / "setup.cfg").read_text()
