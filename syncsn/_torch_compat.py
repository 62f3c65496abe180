"""Places where torch would replace, refuse or mis-fuse syncsn's layers, adjusted on import.

syncsn's layers are ``torch.nn.modules.batchnorm._BatchNorm`` instances (so that code that
freezes batch-normalization layers or exempts them from weight decay treats them alike), and
its SyncBatchNorm is a ``torch.nn.SyncBatchNorm``. Two pieces of torch draw conclusions from
those classes that are wrong for syncsn's layers:

- ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` replaces every ``_BatchNorm`` by torch's
  SyncBatchNorm, which would turn a switchable layer into plain batch normalization and
  syncsn's SyncBatchNorm into one that refuses CPU tensors. It now keeps syncsn's layers;
  the synchronized ones take the given process group, as torch's would.
- ``DistributedDataParallel`` refuses a CPU model that contains a ``torch.nn.SyncBatchNorm``,
  because torch's own cannot run there; syncsn's can, so only torch's are checked.
- ``torch.nn.utils.fusion.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval`` fold a
  ``_BatchNorm``'s running statistics and affine parameters into the preceding layer. For a
  switchable layer that gives a silently wrong model (its IN and LN statistics depend on each
  input), so they now raise a ValueError for one (:func:`check_fusable`); mmcv's
  ``fuse_conv_bn`` gets the same check (:mod:`syncsn.integrations`).

The wrappers call torch's own function for everything else, and are installed once.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch.nn.utils
import torch.nn.utils.fusion
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .batchnorm import SyncBatchNorm
from .sparse_switchnorm import _SparseSwitchMixin
from .switchnorm import _SwitchNorm, _SyncMixin

__all__ = ["check_fusable", "install"]

SYNCSN_LAYERS = (SyncBatchNorm, _SwitchNorm)
SYNCHRONIZED = (SyncBatchNorm, _SyncMixin)

# Set on each wrapper: the torch function it wraps (also marks it as installed).
_ORIGINAL = "_syncsn_wraps"


def _keep_syncsn_layers(original: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    @functools.wraps(original)
    def convert_sync_batchnorm(
        cls: type[nn.SyncBatchNorm], module: nn.Module, process_group: Any = None
    ) -> nn.Module:
        if not isinstance(module, SYNCSN_LAYERS):
            return original(cls, module, process_group)
        if isinstance(module, SYNCHRONIZED):
            module.process_group = process_group
        for name, child in module.named_children():
            module.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return module

    setattr(convert_sync_batchnorm, _ORIGINAL, original)
    return convert_sync_batchnorm


def _check_torch_layers_only(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def _passing_sync_batchnorm_handle(self: DistributedDataParallel, module: nn.Module) -> None:
        theirs = [
            m
            for m in module.modules()
            if isinstance(m, nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm)
        ]
        original(self, nn.ModuleList(theirs))

    setattr(_passing_sync_batchnorm_handle, _ORIGINAL, original)
    return _passing_sync_batchnorm_handle


def check_fusable(layer: nn.Module, fusion: str) -> None:
    """Raise a ValueError when ``fusion`` (the fusing function's name) would fold ``layer``
    into the preceding convolution or linear layer as an affine BatchNorm in eval mode while
    it computes something else: any switchable layer, but a Sparse Switchable one whose means
    and variances are both frozen on BN (that one computes exactly BatchNorm in eval mode).
    Any other layer passes (the fusing function checks its own conditions)."""
    if not isinstance(layer, _SwitchNorm):
        return
    hint = ""
    if isinstance(layer, _SparseSwitchMixin):
        mean, var = layer.frozen_scopes
        if (mean, var) == ("bn", "bn"):
            return
        state = f"means frozen on {mean or 'no scope yet'}, variances on {var or 'no scope yet'}"
        hint = (
            "; a Sparse Switchable layer fuses exactly once training has frozen both its "
            "means and its variances on BN (frozen_scopes == ('bn', 'bn'))"
        )
    else:
        state = f"its switch weights mix the scopes {', '.join(layer.scopes)}"
    scopes = " / ".join(s.upper() for s in layer.scopes if s != "bn")
    raise ValueError(
        f"{fusion}: cannot fuse {type(layer).__name__}({layer.num_features}): it does not "
        f"compute an affine BatchNorm in eval mode, so folding its running statistics into "
        f"the preceding layer would give a wrong model. Its output depends on the {scopes} "
        f"statistics of each input ({state}). Leave it unfused (fuse only the plain "
        f"BatchNorm layers) or replace it by a BatchNorm before fusing{hint}."
    )


def _refuse_switchable(original: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """torch's fuse_conv_bn_eval / fuse_linear_bn_eval, refusing switchable layers."""

    @functools.wraps(original)
    def fuse(first: nn.Module, bn: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        check_fusable(bn, f"torch.nn.utils.fusion.{original.__name__}")
        return original(first, bn, *args, **kwargs)

    setattr(fuse, _ORIGINAL, original)
    return fuse


def _install_fusion_checks() -> None:
    """Wrap torch's fusions where they are defined and where they are imported by name (the
    modules that import them later import the wrappers)."""
    places = [torch.nn.utils.fusion, torch.nn.utils] + [
        sys.modules.get(name)
        for name in ("torch.fx.experimental.optimization", "torch._inductor.fx_passes.pre_grad")
    ]
    for name in ("fuse_conv_bn_eval", "fuse_linear_bn_eval"):
        original = getattr(torch.nn.utils.fusion, name)
        if hasattr(original, _ORIGINAL):
            continue
        wrapper = _refuse_switchable(original)
        for place in places:
            if place is not None and getattr(place, name, None) is original:
                setattr(place, name, wrapper)


def install() -> None:
    """Install the wrappers (again: no effect)."""
    converter = nn.SyncBatchNorm.__dict__["convert_sync_batchnorm"]
    if not hasattr(converter.__func__, _ORIGINAL):
        nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(  # type: ignore[method-assign,assignment]
            _keep_syncsn_layers(converter.__func__)
        )
    check = getattr(DistributedDataParallel, "_passing_sync_batchnorm_handle", None)
    if check is not None and not hasattr(check, _ORIGINAL):
        DistributedDataParallel._passing_sync_batchnorm_handle = _check_torch_layers_only(  # type: ignore[method-assign]
            check
        )
    _install_fusion_checks()
