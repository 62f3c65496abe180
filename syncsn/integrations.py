"""syncsn's layers in OpenMMLab configs (mmengine, mmcv, mmdet, mmseg, ...).

Importing this module registers the layers into mmengine's root ``MODELS`` registry, where
mmcv's ``build_norm_layer`` and every OpenMMLab codebase look norm layers up::

    # in a config
    custom_imports = dict(imports=["syncsn.integrations"], allow_failed_imports=False)
    norm_cfg = dict(type="SyncSN", requires_grad=True)

Names registered without a scope, next to mmcv's ``BN``, ``SyncBN``, ``GN``, ``LN``, ``IN``:
``SN``, ``SyncSN``, ``SSN``, ``SyncSSN``, each also with ``1d`` / ``2d`` / ``3d`` (the bare name
is 2d). Every syncsn layer is also registered in the scope ``syncsn``, where ``SyncBN`` is
:class:`syncsn.SyncBatchNorm` (which runs on CPU/gloo too): ``dict(type="syncsn.SyncBN")``.
mmengine imports ``syncsn.registry`` by itself when a config names a type in that scope, so
scoped names need no ``custom_imports``; a process that imports syncsn after mmengine
registers both kinds of names.

mmcv's own names keep their meaning: ``SyncBN`` is ``torch.nn.SyncBatchNorm`` and ``LN`` is
``torch.nn.LayerNorm`` (syncsn's registry calls ``GroupNorm(1, C)`` LN; in mmengine configs
write ``dict(type="GN", num_groups=1)`` for it). A name another package has already
registered for another class is left to it, with a warning.

Registering also makes mmengine's ``convert_sync_batchnorm`` (the runner's ``sync_bn``
option) keep syncsn's layers: syncsn's layers are ``_BatchNorm`` instances, and it would
otherwise replace them, switchable ones included, by ``torch.nn.SyncBatchNorm``.

Nothing happens when mmengine is not installed; :func:`register_mmengine` then raises.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import warnings
from typing import Any

from torch import nn

from . import sparse_switchnorm as ssn
from . import switchnorm as sn
from ._torch_compat import SYNCSN_LAYERS
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


def register_mmengine(force: bool = False) -> None:
    """Register syncsn's layers into mmengine's ``MODELS`` (again: no effect).

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
    from mmengine.registry import MODELS, Registry

    scoped = MODELS.children.get(SCOPE)
    if scoped is None:
        scoped = Registry("model", parent=MODELS, scope=SCOPE)
    for name, cls in MMENGINE_NAMES.items():
        _register(MODELS, name, cls, force)
    for name, cls in {**MMENGINE_NAMES, **_SCOPED_ONLY}.items():
        _register(scoped, name, cls, force)
    _keep_layers_in_mmengine_converter()


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


def _keep_layers_in_mmengine_converter() -> None:
    """Wrap mmengine's convert_sync_batchnorm where it is defined and where it is imported."""
    import mmengine.model
    import mmengine.model.utils as utils

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
    # for the children too.
    places: list[Any] = [utils, mmengine.model, sys.modules.get("mmengine.runner.runner")]
    for place in places:
        if place is not None and getattr(place, "convert_sync_batchnorm", None) is original:
            place.convert_sync_batchnorm = convert_sync_batchnorm


def _installed() -> bool:
    return importlib.util.find_spec("mmengine") is not None


if _installed():
    register_mmengine()
