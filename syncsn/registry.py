"""Normalization layers by name, for configs: ``build_norm_layer("SyncSN", 256)``.

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
                        paper; works for any input size (``torch.nn.LayerNorm`` normalizes the
                        trailing dimensions instead, which is not what a conv network wants)
======================  =====================================================================

Keyword arguments go to the layer's constructor. Register more with :func:`register_norm`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

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

__all__ = ["build_norm_layer", "register_norm", "register_norm_family", "norm_layer_names"]

NormBuilder = Callable[..., nn.Module]

_BUILDERS: dict[str, tuple[str, NormBuilder]] = {}  # lower-case name -> (name, builder)


def register_norm(name: str, builder: NormBuilder, *, overwrite: bool = False) -> None:
    """Make ``build_norm_layer(name, num_features, **kwargs)`` call ``builder(num_features,
    **kwargs)``. Names are case-insensitive; registering a taken name needs ``overwrite``."""
    key = name.lower()
    if key in _BUILDERS and not overwrite:
        raise ValueError(
            f"norm layer name {name!r} is already registered (as {_BUILDERS[key][0]!r}); "
            "pass overwrite=True to replace it"
        )
    _BUILDERS[key] = (name, builder)


def register_norm_family(name: str, by_dim: dict[int, NormBuilder]) -> None:
    """Register ``name`` (the 2d builder) and ``name1d`` / ``name2d`` / ``name3d``."""
    for dim, builder in by_dim.items():
        register_norm(f"{name}{dim}d", builder)
    register_norm(name, by_dim[2])


def norm_layer_names() -> list[str]:
    """Every registered name, as registered."""
    return sorted(name for name, _ in _BUILDERS.values())


def build_norm_layer(name: str, num_features: int, **kwargs) -> nn.Module:
    """A new normalization layer for ``num_features`` channels, by registered name.

    Example: ``build_norm_layer("SyncSN", 256, process_group=group)``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    entry = _BUILDERS.get(name.lower()) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(
            f"unknown normalization layer {name!r}; known names: {', '.join(norm_layer_names())}"
        )
    return entry[1](num_features, **kwargs)


def _sync_batchnorm(dim: int) -> NormBuilder:
    def build(num_features: int, **kwargs) -> nn.Module:
        return mark_dim(SyncBatchNorm(num_features, **kwargs), dim)

    return build


def _group_norm(num_features: int, num_groups: int | None = None, **kwargs) -> nn.Module:
    if num_groups is None:
        raise ValueError(
            f"GN needs num_groups, e.g. build_norm_layer('GN', {num_features}, num_groups=32)"
        )
    return nn.GroupNorm(num_groups, num_features, **kwargs)


def _layer_norm(num_features: int, **kwargs) -> nn.Module:
    return nn.GroupNorm(1, num_features, **kwargs)


def _register_builtin() -> None:
    register_norm_family("BN", {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d})
    register_norm_family("SyncBN", {d: _sync_batchnorm(d) for d in (1, 2, 3)})
    register_norm_family("SN", {1: SwitchNorm1d, 2: SwitchNorm2d, 3: SwitchNorm3d})
    register_norm_family("SyncSN", {1: SyncSwitchNorm1d, 2: SyncSwitchNorm2d, 3: SyncSwitchNorm3d})
    register_norm_family("IN", {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d})
    register_norm("GN", _group_norm)
    register_norm_family("LN", {d: _layer_norm for d in (1, 2, 3)})


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
