"""syncsn's layers in OpenMMLab configs (mmengine, mmcv, mmdet, mmseg, ...).

Importing syncsn (which imports this module) registers the layers into mmengine's root
``MODELS`` registry, where mmcv's ``build_norm_layer`` and every OpenMMLab codebase look norm
layers up. A config run by mmengine's tools, where no code of yours imports syncsn, asks for
the import::

    # in a config
    custom_imports = dict(imports=["syncsn.integrations"], allow_failed_imports=False)
    norm_cfg = dict(type="SyncSN", requires_grad=True)

Names registered without a scope, next to mmcv's ``BN``, ``SyncBN``, ``GN``, ``LN``, ``IN``:
``SN``, ``SyncSN``, ``SSN``, ``SyncSSN``, each also with ``1d`` / ``2d`` / ``3d`` (the bare name
is 2d). Every syncsn layer is also registered in the scope ``syncsn``, where ``SyncBN`` is
:class:`syncsn.SyncBatchNorm` (which runs on CPU/gloo too): ``dict(type="syncsn.SyncBN")``.
mmengine imports ``syncsn.registry`` by itself when a config names a type in that scope, so
scoped names need no ``custom_imports``.

``import syncsn`` registers both kinds of names, whichever of syncsn and mmengine (or mmcv,
mmdet, mmseg, which import it) a process imports first: with mmengine already imported, at
once; otherwise right after ``mmengine.registry`` is imported, by a hook in ``sys.meta_path``
that only watches for that module (and ``mmengine.model.utils``, for the converter below),
so that importing syncsn never imports mmengine itself.

mmcv's own names keep their meaning: ``SyncBN`` is ``torch.nn.SyncBatchNorm`` and ``LN`` is
``torch.nn.LayerNorm`` (syncsn's registry calls ``GroupNorm(1, C)`` LN; in mmengine configs
write ``dict(type="GN", num_groups=1)`` for it). A name another package has already
registered for another class is left to it, with a warning.

Registering also makes mmengine's ``convert_sync_batchnorm`` (the runner's ``sync_bn``
option) keep syncsn's layers: syncsn's layers are ``_BatchNorm`` instances, and it would
otherwise replace them, switchable ones included, by ``torch.nn.SyncBatchNorm``.

mmcv's ``fuse_conv_bn`` folds every ``_BatchNorm`` that follows a Conv2d into it. For a
switchable layer that gives a silently wrong model, so it raises a ValueError for one
instead, before changing anything (see :func:`syncsn._torch_compat.check_fusable`; the hook
also watches ``mmcv.cnn.utils.fuse_conv_bn``).

Nothing happens when mmengine is not installed (the hook never fires);
:func:`register_mmengine` then raises.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

from torch import nn

from . import sparse_switchnorm as ssn
from . import switchnorm as sn
from ._torch_compat import SYNCSN_LAYERS, check_fusable
from .batchnorm import SyncBatchNorm

__all__ = ["MMENGINE_NAMES", "SCOPE", "register_mmengine"]

#: The scope of the child registry that holds every syncsn layer.
SCOPE = "syncsn"

#: Names registered in mmengine's root MODELS registry (and in the ``syncsn`` scope).
MMENGINE_NAMES: dict[str, type[nn.Module]] = {}
for _prefix, _classes in (
    ("SN", (sn.SwitchNorm1d, sn.SwitchNorm2d, sn.SwitchNorm3d)),
    ("SyncSN", (sn.SyncSwitchNorm1d, sn.SyncSwitchNorm2d, sn.SyncSwitchNorm3d)),
    ("SSN", (ssn.SparseSwitchNorm1d, ssn.SparseSwitchNorm2d, ssn.SparseSwitchNorm3d)),
    (
        "SyncSSN",
        (ssn.SyncSparseSwitchNorm1d, ssn.SyncSparseSwitchNorm2d, ssn.SyncSparseSwitchNorm3d),
    ),
):
    MMENGINE_NAMES[_prefix] = _classes[1]
    for _dim, _cls in enumerate(_classes, start=1):
        MMENGINE_NAMES[f"{_prefix}{_dim}d"] = _cls

# Only in the syncsn scope: mmcv's unscoped SyncBN is torch's.
_SCOPED_ONLY: dict[str, type[nn.Module]] = {"SyncBN": SyncBatchNorm}

_MARK = "_syncsn_wraps"

# Where mmengine defines its registries and its SyncBatchNorm converter.
_REGISTRY_MODULE = "mmengine.registry"
_CONVERTER_MODULE = "mmengine.model.utils"
# Where mmcv defines fuse_conv_bn.
_FUSION_MODULE = "mmcv.cnn.utils.fuse_conv_bn"


def register_mmengine(force: bool = False) -> None:
    """Register syncsn's layers into mmengine's ``MODELS`` (again: no effect).

    Importing syncsn does this by itself (see the module's description); call it to
    replace names that other packages registered (``force=True``).

    Args:
        force: replace names that another package registered for other classes (default:
            leave them, with a warning).

    Raises:
        ImportError: mmengine is not installed.

    Example::

        >>> import syncsn.integrations  # registers; or call register_mmengine()
        >>> from mmengine.registry import MODELS
        >>> MODELS.build(dict(type="SyncSN", num_features=64))
    """
    if importlib.util.find_spec("mmengine") is None:
        raise ImportError(
            "syncsn.integrations.register_mmengine needs mmengine (pip install mmengine)"
        )
    import mmengine.registry

    _register_names(mmengine.registry, force)
    converters = sys.modules.get(_CONVERTER_MODULE)
    if converters is not None:  # else the import hook wraps it when it is imported
        _keep_layers_in_mmengine_converter(converters)


def _register_names(registries: ModuleType, force: bool = False) -> None:
    """Every name into ``registries.MODELS`` (mmengine.registry) and its ``syncsn`` child."""
    models, registry_class = registries.MODELS, registries.Registry
    scoped = models.children.get(SCOPE)
    if scoped is None:
        scoped = registry_class("model", parent=models, scope=SCOPE)
    for name, cls in MMENGINE_NAMES.items():
        _register(models, name, cls, force)
    for name, cls in {**MMENGINE_NAMES, **_SCOPED_ONLY}.items():
        _register(scoped, name, cls, force)


def _register(registry: Any, name: str, cls: type, force: bool) -> None:
    taken = registry.module_dict.get(name)
    if taken is cls:
        return
    if taken is not None and not force:
        warnings.warn(
            f"syncsn: the name {name!r} of mmengine's {registry.name!r} registry (scope "
            f"{registry.scope!r}) already belongs to {taken.__module__}.{taken.__qualname__}; "
            f"left to it. Use dict(type='{SCOPE}.{name}') for syncsn's {cls.__name__}.",
            UserWarning,
            stacklevel=3,
        )
        return
    registry.register_module(name=name, module=cls, force=True)


def _keep_layers_in_mmengine_converter(utils: ModuleType) -> None:
    """Wrap mmengine's convert_sync_batchnorm where it is defined (``utils``) and where it
    has been imported by name."""
    original = utils.convert_sync_batchnorm
    if hasattr(original, _MARK):
        return

    @functools.wraps(original)
    def convert_sync_batchnorm(module: nn.Module, implementation: str = "torch") -> nn.Module:
        if not isinstance(module, SYNCSN_LAYERS):
            return original(module, implementation)
        for name, child in module.named_children():
            module.add_module(name, convert_sync_batchnorm(child, implementation))
        return module

    setattr(convert_sync_batchnorm, _MARK, original)
    # The original recurses through the module's global name, so it reaches this wrapper
    # for the children too. Wrapped as soon as utils is imported, the importers below
    # (when they come later) import the wrapper.
    places = [utils] + [
        sys.modules.get(name)
        for name in ("mmengine.model", "mmengine.runner.runner", "mmengine._strategy.distributed")
    ]
    for place in places:
        if place is not None and getattr(place, "convert_sync_batchnorm", None) is original:
            setattr(place, "convert_sync_batchnorm", convert_sync_batchnorm)  # noqa: B010


def _refuse_switchable_in_mmcv_fusion(fusion: ModuleType) -> None:
    """Make mmcv's fuse_conv_bn (module ``fusion``) refuse switchable layers: the public
    function checks every layer it would fuse before fusing any (it changes the model in
    place), its helper ``_fuse_conv_bn`` checks the layer it is given."""
    original, helper = fusion.fuse_conv_bn, fusion._fuse_conv_bn
    if hasattr(original, _MARK):
        return

    @functools.wraps(original)
    def fuse_conv_bn(module: nn.Module) -> nn.Module:
        for layer in _mmcv_fused_layers(module):
            check_fusable(layer, "mmcv.cnn.fuse_conv_bn")
        return original(module)

    @functools.wraps(helper)
    def _fuse_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
        check_fusable(bn, "mmcv.cnn.fuse_conv_bn")
        return helper(conv, bn)

    setattr(fuse_conv_bn, _MARK, original)
    setattr(_fuse_conv_bn, _MARK, helper)
    setattr(fusion, "_fuse_conv_bn", _fuse_conv_bn)  # noqa: B010
    # The original recurses through the module's global name, so it reaches the wrapper for
    # the children too (which checks them again: cheap, and before any change).
    for place in [fusion] + [sys.modules.get(name) for name in ("mmcv.cnn.utils", "mmcv.cnn")]:
        if place is not None and getattr(place, "fuse_conv_bn", None) is original:
            setattr(place, "fuse_conv_bn", fuse_conv_bn)  # noqa: B010


def _mmcv_fused_layers(module: nn.Module) -> list[nn.Module]:
    """The norm layers mmcv's fuse_conv_bn(module) folds, found as it walks: a
    ``_BatchNorm`` child after a Conv2d child (other children in between are walked into
    and do not reset the Conv2d)."""
    found: list[nn.Module] = []
    last_conv = None
    for child in dict(module.named_children()).values():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            if last_conv is not None:
                found.append(child)
                last_conv = None
        elif isinstance(child, nn.Conv2d):
            last_conv = child
        else:
            found += _mmcv_fused_layers(child)
    return found


# --- registering when mmengine is imported after syncsn ------------------------------------


class _RunAfterExec(importlib.abc.Loader):
    """Executes a module with its own loader, then calls ``then(module)``."""

    def __init__(self, loader: Any, then: Callable[[ModuleType], None]) -> None:
        self.loader, self.then = loader, then

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps its real loader (inspect, importlib.resources and reloads use it).
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.then(module)


class _ImportHook(importlib.abc.MetaPathFinder):
    """Calls an action right after one of the watched modules is imported.

    It only finds the watched names, by asking the other finders of ``sys.meta_path``, and
    wraps their loader; every other import passes through untouched.
    """

    def __init__(self, actions: dict[str, Callable[[ModuleType], None]]) -> None:
        self.actions = actions

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        action = self.actions.get(fullname)
        if action is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RunAfterExec(spec.loader, _never_raises(action))
        return spec


def _never_raises(action: Callable[[ModuleType], None]) -> Callable[[ModuleType], None]:
    """The action, its failure turned into a warning: it must not break the import."""

    def run(module: ModuleType) -> None:
        try:
            action(module)
        except Exception as error:  # noqa: BLE001 - an optional integration
            how = (
                "call syncsn.integrations.register_mmengine() to see why"
                if module.__name__.startswith("mmengine")
                else f"syncsn's layers are not protected from {module.__name__}"
            )
            warnings.warn(
                f"syncsn: could not register its layers in or adjust {module.__name__} "
                f"({type(error).__name__}: {error}); {how}",
                RuntimeWarning,
                stacklevel=2,
            )

    return run


def _install() -> None:
    """Register now if mmengine's registries exist, else when they are imported; the same
    for the mmengine converter and mmcv's fusion."""
    if not any(isinstance(finder, _ImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(
            0,
            _ImportHook(
                {
                    _REGISTRY_MODULE: _register_names,
                    _CONVERTER_MODULE: _keep_layers_in_mmengine_converter,
                    _FUSION_MODULE: _refuse_switchable_in_mmcv_fusion,
                }
            ),
        )
    registries = sys.modules.get(_REGISTRY_MODULE)
    if registries is not None:
        _never_raises(_register_names)(registries)
    converters = sys.modules.get(_CONVERTER_MODULE)
    if converters is not None:
        _never_raises(_keep_layers_in_mmengine_converter)(converters)
    fusion = sys.modules.get(_FUSION_MODULE)
    if fusion is not None:
        _never_raises(_refuse_switchable_in_mmcv_fusion)(fusion)


_install()
