"""Two places where torch would replace or refuse syncsn's layers, adjusted on import.

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

Both wrappers call torch's own function for everything else, and are installed once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .batchnorm import SyncBatchNorm
from .switchnorm import _SwitchNorm, _SyncMixin

__all__ = ["install"]

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


def install() -> None:
    """Install both wrappers (again: no effect)."""
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
