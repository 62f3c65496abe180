"""Normalization layers by name, for configs: ``build_norm_layer("SyncSN", 256)``.

A config is a registered name or an OpenMMLab-style dict, ``dict(type=NAME, requires_grad=True,
**layer_kwargs)``, whose ``type`` may also be a layer class::

    build_norm_layer("SyncSN", 256, process_group=group)
    build_norm_layer(dict(type="SyncSN", requires_grad=True), 256)
    name, layer = build_named_norm_layer(dict(type="SN"), 256, postfix=1)  # ("bn1", layer)

:func:`build_named_norm_layer` is the form of mmcv's ``build_norm_layer``: it returns the
layer with the attribute name mmcv gives it. To use the names in mmengine / mmdet / mmseg
configs, see :mod:`syncsn.integrations`.

Built-in names (case-insensitive; the bare name is the 2d layer, ``1d`` / ``2d`` / ``3d``
suffixes pick the dimensionality):

======================  =====================================================================
``BN``                  ``torch.nn.BatchNorm{1,2,3}d``
``SyncBN``              :class:`syncsn.SyncBatchNorm` (dimension-agnostic; the suffix is
                        remembered so that :func:`syncsn.revert_sync` gives BatchNorm{1,2,3}d)
``SN`` / ``SyncSN``     :class:`syncsn.SwitchNorm{1,2,3}d` / ``SyncSwitchNorm{1,2,3}d``
``SSN`` / ``SyncSSN``   ``SparseSwitchNorm{1,2,3}d`` / ``SyncSparseSwitchNorm{1,2,3}d``
``IN``                  ``torch.nn.InstanceNorm{1,2,3}d`` (torch's defaults: affine=False)
``GN``                  ``torch.nn.GroupNorm(num_groups, num_features)``; needs ``num_groups``
``LN``                  ``torch.nn.GroupNorm(1, num_features)``: layer normalization over
                        (C, *S) of each sample with a per-channel affine, the LN of the SN
                        paper; works for any input size. mmcv's ``LN`` is
                        ``torch.nn.LayerNorm`` (over the trailing dimensions) instead; the
                        mmengine registration leaves mmcv's meaning in place.
======================  =====================================================================

Keyword arguments go to the layer's constructor. Register more with :func:`register_norm`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

# The layers' names in mmengine's registries too, now or as soon as mmengine is imported
# (mmengine imports "syncsn.registry" by itself when a config names a type "syncsn.X").
from . import integrations  # noqa: F401
from . import sparse_switchnorm as ssn
from .batchnorm import SyncBatchNorm
from .convert import mark_dim, register_sync_twin
from .switchnorm import (
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    SyncSwitchNorm1d,
    SyncSwitchNorm2d,
    SyncSwitchNorm3d,
)

__all__ = [
    "NormConfig",
    "build_norm_layer",
    "build_named_norm_layer",
    "register_norm",
    "register_norm_family",
    "norm_layer_names",
    "abbreviation",
]

NormBuilder = Callable[..., nn.Module]
#: A registered name, or ``dict(type=NAME_OR_CLASS, requires_grad=True, **layer_kwargs)``.
NormConfig = str | Mapping[str, Any]

# lower-case name -> (name as registered, builder, abbreviation or None to infer it)
_BUILDERS: dict[str, tuple[str, NormBuilder, str | None]] = {}


def register_norm(
    name: str, builder: NormBuilder, *, overwrite: bool = False, abbr: str | None = None
) -> None:
    """Make ``build_norm_layer(name, num_features, **kwargs)`` call ``builder(num_features,
    **kwargs)``.

    Args:
        name: the config name; case-insensitive.
        builder: a layer class or a function ``(num_features, **kwargs) -> nn.Module``.
        overwrite: replace a name that is already registered (otherwise ValueError).
        abbr: the attribute-name prefix :func:`build_named_norm_layer` gives the layer;
            None: inferred from the built layer's class, as mmcv does (see
            :func:`abbreviation`).

    Example::

        >>> register_norm("FrozenBN", lambda c, **kw: nn.BatchNorm2d(c, **kw).eval())
        >>> build_norm_layer("FrozenBN", 64).training
        False
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_norm: name must be a non-empty str, got {name!r}")
    if not callable(builder):
        raise TypeError(
            f"register_norm: builder must be a layer class or a function, got {builder!r}"
        )
    key = name.lower()
    if key in _BUILDERS and not overwrite:
        raise ValueError(
            f"norm layer name {name!r} is already registered (as {_BUILDERS[key][0]!r}); "
            "pass overwrite=True to replace it"
        )
    _BUILDERS[key] = (name, builder, abbr)


def register_norm_family(
    name: str, by_dim: Mapping[int, NormBuilder], *, abbr: str | None = None
) -> None:
    """Register ``name`` (the 2d builder) and ``name1d`` / ``name2d`` / ``name3d``.

    Example::

        >>> register_norm_family("MyN", {1: MyNorm1d, 2: MyNorm2d, 3: MyNorm3d})
    """
    for dim, builder in by_dim.items():
        register_norm(f"{name}{dim}d", builder, abbr=abbr)
    register_norm(name, by_dim[2], abbr=abbr)


def norm_layer_names() -> list[str]:
    """Every registered name, as registered, sorted."""
    return sorted(name for name, _, _ in _BUILDERS.values())


def build_norm_layer(cfg: NormConfig, num_features: int, **kwargs: Any) -> nn.Module:
    """A new normalization layer for ``num_features`` channels.

    Args:
        cfg: a registered name (``"SyncSN"``), or a dict ``dict(type=..., requires_grad=True,
            **layer_kwargs)`` as in OpenMMLab configs, whose ``type`` is a registered name or
            a layer class, and ``requires_grad`` (default True) is set on every parameter of
            the new layer. The dict is not modified.
        num_features: the number of channels C of the input (N, C, *S).
        **kwargs: more arguments for the layer's constructor (also with a dict ``cfg``; a key
            given in both is an error).

    Returns:
        The layer.

    Raises:
        ValueError: unknown name (the message lists the known ones), or a key given twice.
        TypeError: ``cfg`` is neither a str nor a dict, or the dict has no ``type``.

    Example::

        >>> build_norm_layer("SyncSN", 256, process_group=group)
        >>> build_norm_layer(dict(type="SN", requires_grad=False, eps=1e-3), 256)
    """
    return _build(cfg, num_features, kwargs)[1]


def build_named_norm_layer(
    cfg: NormConfig, num_features: int, postfix: int | str = "", **kwargs: Any
) -> tuple[str, nn.Module]:
    """The form of mmcv's ``build_norm_layer``: ``(abbreviation + postfix, layer)``.

    Model code written for mmcv names its norm layers by the returned name (``self.bn1``,
    ``self.gn``), which is what state-dict keys of pretrained checkpoints use. The
    abbreviation follows mmcv's rules (:func:`abbreviation`): every batch-statistics layer,
    the switchable ones included, is ``"bn"``, so replacing ``BN`` by ``SN`` in a config keeps
    the keys of an ImageNet BatchNorm checkpoint; ``GN`` is ``"gn"``, ``IN`` ``"in"``,
    ``LN`` ``"ln"``.

    Args:
        cfg, num_features, **kwargs: as in :func:`build_norm_layer`.
        postfix: appended to the abbreviation (an int or a str).

    Returns:
        ``(name, layer)``.

    Example::

        >>> build_named_norm_layer(dict(type="SyncSN", requires_grad=True), 64, postfix=1)
        ('bn1', SyncSwitchNorm2d(64, eps=1e-05, ...))
    """
    if isinstance(postfix, bool) or not isinstance(postfix, (int, str)):
        raise TypeError(f"postfix must be an int or a str, got {postfix!r}")
    abbr, layer = _build(cfg, num_features, kwargs)
    return f"{abbr}{postfix}", layer


def abbreviation(layer_class: type) -> str:
    """The attribute-name prefix mmcv gives a norm layer class.

    The class's ``_abbr_`` attribute if it has one; else ``"in"`` for instance
    normalization, ``"bn"`` for any ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm,
    SyncBatchNorm, and syncsn's switchable layers), ``"gn"`` for GroupNorm, ``"ln"`` for
    LayerNorm; else from the class name, ``"norm_layer"`` when nothing matches.
    """
    if hasattr(layer_class, "_abbr_"):
        return str(layer_class._abbr_)
    for base, abbr in (
        (_InstanceNorm, "in"),
        (_BatchNorm, "bn"),
        (nn.GroupNorm, "gn"),
        (nn.LayerNorm, "ln"),
    ):
        if issubclass(layer_class, base):
            return abbr
    lowered = layer_class.__name__.lower()
    for word, abbr in (("batch", "bn"), ("group", "gn"), ("layer", "ln"), ("instance", "in")):
        if word in lowered:
            return abbr
    return "norm_layer"


def _build(cfg: NormConfig, num_features: int, kwargs: dict[str, Any]) -> tuple[str, nn.Module]:
    """(abbreviation, layer) for any accepted form of ``cfg``."""
    requires_grad = True
    if isinstance(cfg, Mapping):
        if "type" not in cfg:
            raise TypeError(
                "a norm layer config dict needs a 'type' (a registered name or a layer "
                f"class), got the keys {sorted(cfg)}"
            )
        options = {k: v for k, v in cfg.items() if k not in ("type", "requires_grad")}
        twice = sorted(set(options) & set(kwargs))
        if twice:
            raise ValueError(
                f"{', '.join(twice)} given both in the config and as keyword arguments"
            )
        requires_grad = cfg.get("requires_grad", True)
        if not isinstance(requires_grad, bool):
            raise TypeError(f"requires_grad must be True or False, got {requires_grad!r}")
        kwargs = {**options, **kwargs}
        kind = cfg["type"]
    elif isinstance(cfg, str):
        kind = cfg
    else:
        raise TypeError(
            "a norm layer config must be a registered name (e.g. 'SyncSN') or a dict "
            f"dict(type=..., **kwargs), got {cfg!r} ({type(cfg).__name__})"
        )
    layer: nn.Module
    if isinstance(kind, type):
        if not issubclass(kind, nn.Module):
            raise TypeError(
                f"a norm layer config's type must be a registered name or an nn.Module "
                f"class, got the class {kind.__qualname__}"
            )
        if issubclass(kind, nn.GroupNorm):
            # GroupNorm's first argument is num_groups; mmcv passes the channels by name.
            layer = kind(num_channels=num_features, **kwargs)
        else:
            layer = kind(num_features, **kwargs)
        abbr = abbreviation(kind)
    else:
        entry = _BUILDERS.get(kind.lower()) if isinstance(kind, str) else None
        if entry is None:
            raise ValueError(
                f"unknown normalization layer {kind!r}; known names: "
                f"{', '.join(norm_layer_names())}"
            )
        _, builder, abbr_or_none = entry
        layer = builder(num_features, **kwargs)
        abbr = abbr_or_none or abbreviation(type(layer))
    if not requires_grad:
        for param in layer.parameters():
            param.requires_grad_(False)
    return abbr, layer


def _sync_batchnorm(dim: int) -> NormBuilder:
    def build(num_features: int, **kwargs: Any) -> nn.Module:
        return mark_dim(SyncBatchNorm(num_features, **kwargs), dim)

    return build


def _group_norm(num_features: int, num_groups: int | None = None, **kwargs: Any) -> nn.Module:
    if num_groups is None:
        raise ValueError(
            f"GN needs num_groups, e.g. build_norm_layer('GN', {num_features}, num_groups=32)"
        )
    return nn.GroupNorm(num_groups, num_features, **kwargs)


def _layer_norm(num_features: int, **kwargs: Any) -> nn.Module:
    return nn.GroupNorm(1, num_features, **kwargs)


def _register_builtin() -> None:
    register_norm_family("BN", {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d})
    register_norm_family("SyncBN", {d: _sync_batchnorm(d) for d in (1, 2, 3)})
    register_norm_family("SN", {1: SwitchNorm1d, 2: SwitchNorm2d, 3: SwitchNorm3d})
    register_norm_family("SyncSN", {1: SyncSwitchNorm1d, 2: SyncSwitchNorm2d, 3: SyncSwitchNorm3d})
    register_norm_family("IN", {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d})
    register_norm("GN", _group_norm)
    register_norm_family("LN", {d: _layer_norm for d in (1, 2, 3)}, abbr="ln")


def _register_sparse() -> None:
    """SSN / SyncSSN and their converter twins (local <-> Sync)."""
    local = {1: ssn.SparseSwitchNorm1d, 2: ssn.SparseSwitchNorm2d, 3: ssn.SparseSwitchNorm3d}
    sync = {
        1: ssn.SyncSparseSwitchNorm1d,
        2: ssn.SyncSparseSwitchNorm2d,
        3: ssn.SyncSparseSwitchNorm3d,
    }
    register_norm_family("SSN", local)
    register_norm_family("SyncSSN", sync)
    for dim in (1, 2, 3):
        register_sync_twin(local[dim], sync[dim])


_register_builtin()
_register_sparse()
