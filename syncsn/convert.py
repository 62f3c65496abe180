"""Converters that swap the normalization layers of an existing model in place.

``convert_sync_switchnorm(model)`` is the one-line way to take a detector or segmenter built
with BatchNorm and make every norm layer a synchronized Switchable Normalization layer:

- ``convert_sync_switchnorm``: BatchNorm / SyncBatchNorm / local SN -> SyncSwitchNorm{1,2,3}d
  (``sparse=True``: SyncSparseSwitchNorm{1,2,3}d)
- ``convert_switchnorm``: BatchNorm / SyncBatchNorm -> SwitchNorm{1,2,3}d (local; ``sparse=True``:
  SparseSwitchNorm{1,2,3}d)
- ``convert_sync_batchnorm``: BatchNorm / torch.nn.SyncBatchNorm -> :class:`SyncBatchNorm`
- ``revert_sync``: every synchronized layer back to its local twin (for single-device
  evaluation and export)

Rules shared by all of them:

- Recognised layers: ``torch.nn.BatchNorm{1,2,3}d``, ``torch.nn.SyncBatchNorm``, our
  :class:`SyncBatchNorm`, the Switchable Normalization family, the norm-act layers of
  :mod:`syncsn.norm_act` and timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` (which become
  syncsn norm-act layers with the same ``act`` and ``drop`` modules), and subclasses of these
  that add nothing (no overridden ``forward`` or other behaviour, no extra state, no forward
  or backward hooks). With ``convert_frozen=True`` also torchvision's, timm's and detectron2's
  ``FrozenBatchNorm2d`` and timm's ``FrozenBatchNormAct2d`` (and their subclasses that add
  nothing), from their statistics.
- A norm layer the converter does not convert (one that adds something, say an activation
  fused into the norm, which converting would silently strip; a frozen BatchNorm) is left as
  it is; one warning per call lists them, with the reason, at the caller's line.
- ``exclude`` leaves chosen modules alone, and everything inside them, without a warning:
  qualified names or glob patterns (``"aspp.pool.*"``), module classes, modules of the model
  themselves (by identity: ``exclude=model.head``), or a predicate ``f(name, module) -> bool``,
  or a list of these. A module used at several places is left alone when any of its names is
  excluded.
- The new layer reuses the old one's Parameters (the same objects, so optimizers and
  ``requires_grad`` carry over), running-statistics buffers (the same tensors), child modules
  (a norm-act layer's ``act`` and ``drop``) and state-dict hooks, and takes its eps, momentum,
  training flag, device and dtype. New parameters (the switch logits) require grad when the
  old layer's parameters did.
- State-dict keys stay as they were, apart from the switch logits a switchable layer adds: a
  layer without a bias (``bias=False``) or without running statistics
  (``track_running_stats=False``) gives one without them, so a checkpoint of the original
  model loads strictly into the converted one (``strict=False`` for the added logits).
- A layer used at several places in the model stays one layer after conversion.
- The root is converted too when it is itself a norm layer: always use the return value.
- Convert before wrapping the model in ``DistributedDataParallel``: a wrapped model is
  refused (DDP would not synchronize the parameters a conversion adds).

Dimensionality. BatchNorm{1,2,3}d map to the layer of the same dimensionality. Note that
BatchNorm1d accepts (N, C) and (N, C, L) input but SwitchNorm1d only (N, C). The two
dimension-agnostic layers, ``torch.nn.SyncBatchNorm`` and our :class:`SyncBatchNorm`, take
their dimensionality from the layer they replaced when this module made them (a
:class:`SyncBatchNorm` built by ``convert_sync_batchnorm`` or ``build_norm_layer`` remembers
it), and otherwise from the ``dim`` argument (default 2, images). A wrong guess is not silent:
the new layer raises on its first input, naming the dimensionality it expected.
"""

from __future__ import annotations

import fnmatch
import functools
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from . import comm
from .batchnorm import SyncBatchNorm
from .norm_act import (
    BatchNormAct2d,
    NormActMixin,
    SparseSwitchNormAct2d,
    SwitchNormAct2d,
    SyncBatchNormAct,
    SyncSparseSwitchNormAct2d,
    SyncSwitchNormAct2d,
    with_act,
)
from .sparse_switchnorm import (
    SparseSwitchNorm1d,
    SparseSwitchNorm2d,
    SparseSwitchNorm3d,
    SyncSparseSwitchNorm1d,
    SyncSparseSwitchNorm2d,
    SyncSparseSwitchNorm3d,
)
from .switchnorm import (
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    SyncSwitchNorm1d,
    SyncSwitchNorm2d,
    SyncSwitchNorm3d,
    _SwitchNorm,
    _SyncMixin,
)

__all__ = [
    "BN_INIT_LOGIT_GAP",
    "Exclude",
    "convert_sync_switchnorm",
    "convert_switchnorm",
    "convert_sync_batchnorm",
    "revert_sync",
    "register_sync_twin",
    "mark_dim",
]

Init = Literal["uniform", "bn"]

#: What ``exclude`` takes: a qualified module name or glob pattern, a module class, a module
#: of the model (by identity), a predicate ``f(name, module) -> bool``, or an iterable of
#: these.
Exclude = str | type | Callable[[str, nn.Module], bool] | Iterable[Any] | None

# init="bn" sets the switch logits to (0, ..., 0, gap), BN entry last, for the means and the
# variances alike, so every other scope gets weight 1 / (e^gap + K - 1), about e^-gap. The
# output error of a converted network shrinks by e per unit of gap; 14 is the smallest whole
# gap that keeps a ResNet-50 DeepLab within 1e-3 of its BatchNorm twin in eval mode
# (worst 6.7e-4 over eight seeds and bias settings, where 13 gave up to 1.8e-3; the variance
# term dominates).
# The price is learning speed: softmax scales the gradient reaching the other scopes' logits
# by their weight, about 1e-6 here, so the switches move very slowly at first. Set the logits
# by hand for a different trade-off (a gap of 4 gives the BN scope 96%).
BN_INIT_LOGIT_GAP = 14.0

_BATCHNORM_DIM = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, BatchNormAct2d: 2}
_LOCAL_BATCHNORM: dict[int, type[_BatchNorm]] = {
    1: nn.BatchNorm1d,
    2: nn.BatchNorm2d,
    3: nn.BatchNorm3d,
}
_AGNOSTIC_BATCHNORM = (nn.SyncBatchNorm, SyncBatchNorm, SyncBatchNormAct)
_OUR_SYNC_BATCHNORM = (SyncBatchNorm, SyncBatchNormAct)
_SWITCHNORM = {1: SwitchNorm1d, 2: SwitchNorm2d, 3: SwitchNorm3d}
_SYNC_SWITCHNORM = {1: SyncSwitchNorm1d, 2: SyncSwitchNorm2d, 3: SyncSwitchNorm3d}
_SPARSE = {1: SparseSwitchNorm1d, 2: SparseSwitchNorm2d, 3: SparseSwitchNorm3d}
_SYNC_SPARSE = {1: SyncSparseSwitchNorm1d, 2: SyncSparseSwitchNorm2d, 3: SyncSparseSwitchNorm3d}

# Other libraries' classes, recognised by (top-level package, class name) without importing
# them: their norm-act layers -> ours (same state, same act and drop) ...
_FOREIGN_NORM_ACT: dict[tuple[str, str], type[_BatchNorm]] = {
    ("timm", "BatchNormAct2d"): BatchNormAct2d,
    ("timm", "SyncBatchNormAct"): SyncBatchNormAct,
}
# ... and their frozen BatchNorms (fixed statistics and affine, as buffers) -> the
# BatchNorm they freeze.
_FROZEN: dict[tuple[str, str], type[_BatchNorm]] = {
    ("torchvision", "FrozenBatchNorm2d"): nn.BatchNorm2d,
    ("timm", "FrozenBatchNorm2d"): nn.BatchNorm2d,
    ("detectron2", "FrozenBatchNorm2d"): nn.BatchNorm2d,
    ("timm", "FrozenBatchNormAct2d"): BatchNormAct2d,
}
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")

# Switchable layers: local class -> synchronized twin, and back.
_SYNC_TWIN: dict[type[_SwitchNorm], type[_SwitchNorm]] = {}
_LOCAL_TWIN: dict[type[_SwitchNorm], type[_SwitchNorm]] = {}

# Where a dimension-agnostic SyncBatchNorm remembers the dimensionality of what it replaced.
_DIM_ATTR = "_syncsn_dim"
# Instance attributes the library itself sets on layers (not a subclass's own state).
_CONVERTER_ATTRS = frozenset({_DIM_ATTR, "sync_name"})


def register_sync_twin(local: type[_SwitchNorm], sync: type[_SwitchNorm]) -> None:
    """Declare ``sync`` the synchronized form of the switchable layer ``local``.

    The converters then turn ``local`` into ``sync`` (``convert_sync_switchnorm``) and back
    (``revert_sync``). Both must take the SwitchNorm constructor arguments; ``sync`` also
    ``process_group``. Any other attribute of the instance is carried over as it is.
    """
    if not (issubclass(local, _SwitchNorm) and issubclass(sync, _SwitchNorm)):
        raise TypeError(
            f"register_sync_twin expects two switchable normalization classes, got "
            f"{local.__name__} and {sync.__name__}"
        )
    _SYNC_TWIN[local] = sync
    _LOCAL_TWIN[sync] = local
    _known_classes.cache_clear()


def mark_dim(layer: nn.Module, dim: int) -> nn.Module:
    """Record on a dimension-agnostic SyncBatchNorm which BatchNorm{dim}d it stands for."""
    setattr(layer, _DIM_ATTR, _check_dim(dim))
    return layer


def convert_sync_switchnorm(
    module: nn.Module,
    process_group: dist.ProcessGroup | None = None,
    init: Init = "uniform",
    dim: int = 2,
    *,
    sparse: bool = False,
    exclude: Exclude = None,
    convert_frozen: bool = False,
) -> nn.Module:
    """Make every BatchNorm-like and local switchable layer a synchronized switchable one.

    - ``BatchNorm{1,2,3}d``, ``torch.nn.SyncBatchNorm``, :class:`SyncBatchNorm` ->
      ``SyncSwitchNorm{1,2,3}d`` (``SyncSparseSwitchNorm{1,2,3}d`` with ``sparse``), switch
      logits set by ``init``; norm-act layers (timm's ``BatchNormAct2d``) -> the norm-act form
      (:class:`~syncsn.SyncSwitchNormAct2d`), same ``act`` and ``drop``.
    - Local switchable layers -> their synchronized twin, switch logits kept.
    - Layers that are already synchronized switchable layers get ``process_group``.

    Args:
        module: the model (converted in place; the root too when it is a norm layer). Not
            yet wrapped in ``DistributedDataParallel``: convert, then wrap.
        process_group: the group every new Sync layer synchronizes over (None: the world).
        init: ``"uniform"``, logits all ones as in the reference (1/K per scope), or ``"bn"``,
            logits that make the BN scope dominate so that, in eval mode, the network computes
            what the BatchNorm network computed (within about 1e-3); for fine-tuning a
            BatchNorm-pretrained model. See :data:`BN_INIT_LOGIT_GAP`.
        dim: dimensionality (1, 2 or 3) assumed for SyncBatchNorm layers that do not record
            the layer they replaced.
        sparse: (keyword-only) make BatchNorm layers Sparse Switchable ones (SSN) instead.
            Default: False
        exclude: (keyword-only) modules to leave alone, with everything inside them:
            qualified names or glob patterns (``"aspp.pool.*"``, ``"backbone.*"``), module
            classes, modules of the model (by identity, never called: ``model.head``),
            predicates ``f(name, module) -> bool``, or a list of these. A module used at
            several places is left alone when any of its names is excluded.
        convert_frozen: (keyword-only) also convert ``FrozenBatchNorm2d`` layers
            (torchvision's, timm's, detectron2's) and timm's ``FrozenBatchNormAct2d``: the new
            layer starts from their running statistics, weight and bias, and is trainable
            (weight and bias become Parameters that require grad). Default: False, they are
            left frozen and named in the warning.

    Returns:
        The converted module (use it: the root may have been replaced).

    Example::

        >>> model = torchvision.models.resnet50(weights="IMAGENET1K_V2")
        >>> model = syncsn.convert_sync_switchnorm(model, init="bn")  # fine-tune from BN
        >>> # DeepLabV3 without normalizing its image-pooling branch:
        >>> model = syncsn.convert_sync_switchnorm(deeplab, exclude="classifier.0.convs.4.*")
    """
    _check_init(init, sparse)
    _check_dim(dim)
    family = _SYNC_SPARSE if sparse else _SYNC_SWITCHNORM

    def replace(layer: _BatchNorm, base: type, name: str) -> nn.Module | None:
        if base in _BATCHNORM_DIM or base in _AGNOSTIC_BATCHNORM:
            target = _with_act_of(base, family[_batchnorm_dim(layer, base, dim)])
            return _batchnorm_to_switchnorm(layer, target, init, process_group=process_group)
        if base in _SYNC_TWIN:
            return _switchnorm_twin(
                cast(_SwitchNorm, layer), _SYNC_TWIN[base], process_group=process_group
            )
        if base in _LOCAL_TWIN:
            cast(_SyncMixin, layer).process_group = process_group
        return None

    return _convert(module, replace, "convert_sync_switchnorm", exclude, convert_frozen, _any)


def convert_switchnorm(
    module: nn.Module,
    init: Init = "uniform",
    dim: int = 2,
    *,
    sparse: bool = False,
    exclude: Exclude = None,
    convert_frozen: bool = False,
) -> nn.Module:
    """Make every BatchNorm-like layer a local ``SwitchNorm{1,2,3}d``.

    ``BatchNorm{1,2,3}d``, ``torch.nn.SyncBatchNorm`` and :class:`SyncBatchNorm` are
    converted (norm-act layers to :class:`~syncsn.SwitchNormAct2d`); switchable layers, local
    or synchronized, are left as they are (use :func:`revert_sync` to make synchronized ones
    local).

    Args:
        module: the model (converted in place; the root too when it is a norm layer).
        init: ``"uniform"`` or ``"bn"``, as in :func:`convert_sync_switchnorm`.
        dim: as in :func:`convert_sync_switchnorm`.
        sparse: (keyword-only) ``SparseSwitchNorm{1,2,3}d`` instead. Default: False
        exclude: (keyword-only) modules to leave alone, as in :func:`convert_sync_switchnorm`.
        convert_frozen: (keyword-only) as in :func:`convert_sync_switchnorm`.

    Returns:
        The converted module.

    Example::

        >>> model = syncsn.convert_switchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        >>> type(model[1]).__name__
        'SwitchNorm2d'
        >>> model = syncsn.convert_switchnorm(model, exclude=lambda name, m: "head" in name)
    """
    _check_init(init, sparse)
    _check_dim(dim)
    family = _SPARSE if sparse else _SWITCHNORM

    def replace(layer: _BatchNorm, base: type, name: str) -> nn.Module | None:
        if base in _BATCHNORM_DIM or base in _AGNOSTIC_BATCHNORM:
            target = _with_act_of(base, family[_batchnorm_dim(layer, base, dim)])
            return _batchnorm_to_switchnorm(layer, target, init)
        return None

    return _convert(module, replace, "convert_switchnorm", exclude, convert_frozen, _not_sn)


def convert_sync_batchnorm(
    module: nn.Module,
    process_group: dist.ProcessGroup | None = None,
    *,
    exclude: Exclude = None,
    convert_frozen: bool = False,
) -> nn.Module:
    """Make every BatchNorm layer our :class:`SyncBatchNorm` (which also runs on CPU/gloo).

    ``BatchNorm{1,2,3}d`` and ``torch.nn.SyncBatchNorm`` are replaced (the new layer records
    the dimensionality of a BatchNorm{1,2,3}d, so :func:`revert_sync` restores it), norm-act
    layers by :class:`~syncsn.SyncBatchNormAct`; existing :class:`SyncBatchNorm` layers get
    ``process_group``. Switchable layers are left alone. The same as
    :meth:`SyncBatchNorm.convert_sync_batchnorm`.

    Args:
        module: the model (converted in place; the root too when it is a norm layer).
        process_group: the group the layers synchronize over (None: the world).
        exclude: (keyword-only) modules to leave alone, as in :func:`convert_sync_switchnorm`.
        convert_frozen: (keyword-only) as in :func:`convert_sync_switchnorm`.

    Returns:
        The converted module.

    Example::

        >>> model = syncsn.convert_sync_batchnorm(model, process_group=syncsn.create_sync_groups(8))
    """

    def replace(layer: _BatchNorm, base: type, name: str) -> nn.Module | None:
        if base in _OUR_SYNC_BATCHNORM:
            cast(SyncBatchNorm, layer).process_group = process_group
            return None
        if base in _BATCHNORM_DIM or base is nn.SyncBatchNorm:
            target = _with_act_of(base, SyncBatchNorm)
            new = target(
                layer.num_features,
                eps=layer.eps,
                momentum=layer.momentum,
                affine=layer.affine,
                track_running_stats=layer.track_running_stats,
                process_group=process_group,
                **_factory(layer),
            )
            if base in _BATCHNORM_DIM:
                mark_dim(new, _BATCHNORM_DIM[base])
            elif hasattr(layer, _DIM_ATTR):
                mark_dim(new, getattr(layer, _DIM_ATTR))
            return _take_over(new, layer)
        return None

    return _convert(module, replace, "convert_sync_batchnorm", exclude, convert_frozen, _not_sn)


def revert_sync(module: nn.Module, dim: int = 2, *, exclude: Exclude = None) -> nn.Module:
    """Turn every synchronized layer back into its local twin, same parameters and buffers.

    ``SyncSwitchNorm{1,2,3}d`` (and registered synchronized switchable layers) become their
    local class; :class:`SyncBatchNorm` and ``torch.nn.SyncBatchNorm`` become
    ``BatchNorm{1,2,3}d``: the dimensionality it recorded when it replaced a BatchNorm layer,
    else ``dim`` (default 2); the synchronized norm-act layers their local norm-act twin. The
    local model computes exactly what the synchronized one computes in eval mode, with no
    process group needed (single-device evaluation, export).

    Args:
        module: the model (converted in place; the root too when it is a norm layer).
        dim: dimensionality (1, 2 or 3) for SyncBatchNorm layers that do not record one.
        exclude: (keyword-only) modules to leave alone, as in :func:`convert_sync_switchnorm`.

    Returns:
        The converted module.

    Example::

        >>> local = syncsn.revert_sync(copy.deepcopy(ddp_model.module)).eval()
        >>> torch.onnx.export(local, example, "model.onnx")
    """
    _check_dim(dim)

    def replace(layer: _BatchNorm, base: type, name: str) -> nn.Module | None:
        if base in _LOCAL_TWIN:
            return _switchnorm_twin(cast(_SwitchNorm, layer), _LOCAL_TWIN[base])
        if base in _AGNOSTIC_BATCHNORM:
            target = _with_act_of(base, _LOCAL_BATCHNORM[_batchnorm_dim(layer, base, dim)])
            new = target(
                layer.num_features,
                eps=layer.eps,
                momentum=layer.momentum,
                affine=layer.affine,
                track_running_stats=layer.track_running_stats,
                **_factory(layer),
            )
            return _take_over(new, layer)
        return None

    return _convert(module, replace, "revert_sync", exclude, None, _synchronized)


# --- traversal -----------------------------------------------------------------------------

# (layer, the known class it is an instance of, its qualified name) -> new layer or None
Replace = Callable[[_BatchNorm, type, str], "nn.Module | None"]


def _convert(
    module: nn.Module,
    replace: Replace,
    converter: str,
    exclude: Exclude,
    convert_frozen: bool | None,
    concerns: Callable[[nn.Module], bool],
) -> nn.Module:
    """Depth-first replacement: ``replace(layer, known_base, qualified_name)`` returns the new
    layer or None to keep it. Shared submodules are converted once and stay shared. The Sync
    layers of the result are named after their place in it (their identity for SYNCSN_DEBUG,
    the same on every rank however many other Sync layers a rank has built).

    ``convert_frozen``: whether frozen BatchNorms are converted (None: this converter has
    nothing to make of them). The norm layers left alone that ``concerns`` the converter (the
    kind it would convert, were they plain) are listed in one warning."""
    _check_module(module, converter)
    exclusion = _Exclusion(exclude)
    kept = exclusion.kept(module)
    left_alone: list[str] = []
    done: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(old) -> (old, new); old kept alive

    def visit(layer: nn.Module, name: str) -> nn.Module:
        if id(layer) in done:
            return done[id(layer)][1]
        new = layer
        skip = id(layer) in kept
        if not skip:
            found = _recognise(layer, convert_frozen)
            if isinstance(found, str):
                if concerns(layer):
                    left_alone.append(f"{_describe(layer, name)}: {found}")
            elif found is not None:
                norm, base = found
                new = replace(norm, base, name) or layer
        done[id(layer)] = (layer, new)
        if skip:
            return new
        # _modules, not named_children(): the latter skips a child seen under another name.
        for child_name, child in list(new._modules.items()):
            if child is None:
                continue
            converted = visit(child, f"{name}.{child_name}" if name else child_name)
            if converted is not child:
                new._modules[child_name] = converted
        return new

    result = comm.name_sync_layers(visit(module, ""))
    _warn_left_alone(converter, left_alone, exclusion.unmatched(), exclusion.strangers())
    return result


def _any(layer: nn.Module) -> bool:
    return True


def _not_sn(layer: nn.Module) -> bool:
    return not isinstance(layer, _SwitchNorm)


def _synchronized(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.SyncBatchNorm, _SyncMixin))


class _Exclusion:
    """``exclude`` as a test of (qualified name, module); remembers what matched."""

    def __init__(self, exclude: Exclude) -> None:
        items: list[Any]
        if exclude is None:
            items = []
        elif isinstance(exclude, (str, type, nn.Module)) or not isinstance(exclude, Iterable):
            # A module before the iterables: a container module is one module to exclude.
            items = [exclude]
        else:
            items = list(exclude)
        for item in items:
            if not (isinstance(item, (str, type, nn.Module)) or callable(item)):
                raise TypeError(
                    f"exclude takes module names or glob patterns (str), module classes, "
                    f"modules of the model, predicates f(name, module) -> bool, or a list of "
                    f"these; got {type(item).__name__} {item!r}"
                )
        self.patterns = [item for item in items if isinstance(item, str)]
        self.classes = tuple(item for item in items if isinstance(item, type))
        # Modules are callable too: they are excluded by identity, never called.
        self.modules = [item for item in items if isinstance(item, nn.Module)]
        self.predicates = [i for i in items if not isinstance(i, (str, type, nn.Module))]
        self.used: set[str] = set()
        self.found: set[int] = set()

    def __call__(self, name: str, module: nn.Module) -> bool:
        hits = [p for p in self.patterns if fnmatch.fnmatchcase(name, p)]
        self.used.update(hits)
        mine = [m for m in self.modules if m is module]
        self.found.update(map(id, mine))
        return bool(
            hits
            or mine
            or (self.classes and isinstance(module, self.classes))
            or any(predicate(name, module) for predicate in self.predicates)
        )

    def kept(self, root: nn.Module) -> set[int]:
        """The ids of the modules of ``root`` to keep as they are: those excluded under any
        of their names (a module may sit at several places), and everything inside them."""
        kept: set[int] = set()
        for name, module in root.named_modules(remove_duplicate=False):
            if self(name, module):  # every name, so that every pattern is tried
                kept.update(id(m) for m in module.modules())
        return kept

    def unmatched(self) -> list[str]:
        """The patterns that matched no name."""
        return [p for p in self.patterns if p not in self.used]

    def strangers(self) -> list[str]:
        """The classes of the modules given that are not in the model."""
        return [type(m).__name__ for m in self.modules if id(m) not in self.found]


def _check_module(module: object, converter: str) -> None:
    """TypeError for anything but a module; RuntimeError for a model inside DDP."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{converter} expects a torch.nn.Module (the model to convert), got "
            f"{type(module).__name__}"
            + (f" {module!r}" if module is None or isinstance(module, (str, int, float)) else "")
        )
    for name, sub in module.named_modules():
        if isinstance(sub, DistributedDataParallel):
            raise RuntimeError(_ddp_message(converter, name))


def _ddp_message(converter: str, name: str) -> str:
    where = f"its submodule '{name}' is" if name else "it is"
    return (
        f"{converter}: the model is not converted because {where} wrapped in "
        "DistributedDataParallel, which would not keep the layers it adds or changes in step "
        "across ranks (the switch logits of switchable layers would drift apart). Convert "
        "first, then wrap: model = syncsn." + converter + "(model); model = "
        "DistributedDataParallel(model, ...). For a model already wrapped, convert its "
        "module and wrap that anew: ddp = DistributedDataParallel(syncsn."
        + converter
        + "(ddp.module), ...), then build the optimizer from the new model's parameters."
    )


def _warn_left_alone(
    converter: str, left_alone: list[str], unmatched: list[str], strangers: list[str]
) -> None:
    """One warning for the whole call, at the first caller outside syncsn."""
    lines = []
    if left_alone:
        lines.append(
            f"{converter} left {len(left_alone)} normalization layer(s) unchanged:\n  "
            + "\n  ".join(left_alone)
            + "\nPass their names in exclude=[...] to leave them alone without this warning."
        )
    if unmatched:
        lines.append(
            f"{converter}: exclude pattern(s) {', '.join(map(repr, unmatched))} matched no "
            "module (names are qualified, as model.named_modules() gives them)."
        )
    if strangers:
        lines.append(
            f"{converter}: exclude module(s) {', '.join(strangers)} are not part of the model "
            "(modules are matched by identity: pass the model's own, not a copy)."
        )
    if not lines:
        return
    level = 1
    frame = sys._getframe(0)
    while (
        frame.f_back is not None
        and frame.f_globals.get("__name__", "").split(".")[0] == (__name__.split(".")[0])
    ):
        frame = frame.f_back
        level += 1
    warnings.warn("\n".join(lines), UserWarning, stacklevel=level)


@functools.cache
def _known_classes() -> frozenset[type]:
    return frozenset(
        [*_BATCHNORM_DIM, *_AGNOSTIC_BATCHNORM, *_SYNC_TWIN, *_LOCAL_TWIN],
    )


def _foreign_key(cls: type) -> tuple[str, str]:
    return cls.__module__.split(".")[0], cls.__name__


Recognised = tuple[_BatchNorm, type] | str | None


def _recognise(layer: nn.Module, convert_frozen: bool | None) -> Recognised:
    """(the layer to convert, the class it stands for) when the converters know ``layer``; a
    reason when it is a norm layer they leave alone; None for anything else.

    A frozen BatchNorm (``convert_frozen``) is returned as a trainable BatchNorm built from
    its statistics; a foreign norm-act layer stands for its syncsn twin.
    """
    mro = type(layer).__mro__
    advice = "; converting it could drop behaviour the new layer does not have"
    frozen = next(((c, _FROZEN[_foreign_key(c)]) for c in mro if _foreign_key(c) in _FROZEN), None)
    if frozen is not None:
        frozen_class, frozen_as = frozen
        if convert_frozen is None:
            return None
        if type(layer) is not frozen_class:
            reason = _added_behaviour(layer, frozen_class, frozen_class)
            if reason is not None:
                return reason + advice
        if not convert_frozen:
            return (
                "its statistics and affine parameters are frozen; convert_frozen=True "
                "converts it into a trainable layer that starts from them"
            )
        hooks = _forward_hooks(layer)
        if hooks is not None:
            return hooks
        return _thaw(layer, frozen_as)
    if not isinstance(layer, _BatchNorm):  # the switchable layers are ones too
        return None
    known = _known_classes()
    base: type | None = None
    stands_for: type | None = None
    for cls in mro:
        if cls in known:
            base = stands_for = cls
            break
        if _foreign_key(cls) in _FOREIGN_NORM_ACT:
            base, stands_for = cls, _FOREIGN_NORM_ACT[_foreign_key(cls)]
            break
    if any(nn.parameter.is_lazy(t) for t in _tensors(layer)):
        return "its parameters are not materialized yet; run one forward pass first"
    if base is None or stands_for is None:
        return "its class is not one the converters know" + advice
    reason = _added_behaviour(layer, base, stands_for)
    if reason is not None:
        return reason + advice
    return layer, stands_for


# Class attributes a subclass may define without changing what the layer computes.
_HARMLESS_CLASS_ATTRS = frozenset(
    {
        "__module__",
        "__qualname__",
        "__doc__",
        "__annotations__",
        "__annotate__",
        "__dict__",
        "__weakref__",
        "__firstlineno__",
        "__static_attributes__",
        "__orig_bases__",
        "__parameters__",
        "__slotnames__",
        "_abc_impl",
        "__init__",  # its instance state is checked below
        "extra_repr",
        "_check_input_dim",
        "reset_parameters",
        "reset_running_stats",
    }
)

# Module attributes holding state-dict hooks: carried over to the new layer.
_STATE_DICT_HOOKS = (
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _added_behaviour(layer: nn.Module, base: type, stands_for: type) -> str | None:
    """Why ``layer`` is more than a ``base`` (None when it adds nothing). ``stands_for``:
    the syncsn class whose instance state ``base``'s is (``base`` itself, but for foreign
    classes)."""
    mro = type(layer).__mro__
    overridden = {attr for cls in mro[: mro.index(base)] for attr in vars(cls)}
    overridden -= _HARMLESS_CLASS_ATTRS
    if overridden:
        return f"its class {type(layer).__name__} defines {', '.join(sorted(overridden))}"
    if type(layer) is not stands_for:
        extra = _state_names(layer) - _state_names_of(stands_for)
        if extra:
            return f"it has state a {base.__name__} does not have: {', '.join(sorted(extra))}"
    return _forward_hooks(layer)


def _forward_hooks(layer: nn.Module) -> str | None:
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(layer, attr, None) for attr in hook_dicts):
        return "it has forward or backward hooks, which would not move to the new layer"
    return None


def _state_names(layer: nn.Module) -> set[str]:
    names = set(vars(layer)) | set(layer._parameters) | set(layer._buffers)
    names |= set(layer._modules)
    return names - _CONVERTER_ATTRS


@functools.cache
def _state_names_of(cls: type) -> frozenset[str]:
    """The instance state a plain ``cls`` has, from throwaway instances (on the meta device
    where ``cls`` takes one: other libraries' frozen BatchNorms take no device)."""
    build: Callable[..., nn.Module] = cls
    names = _state_names(build(2, device="meta") if issubclass(cls, _BatchNorm) else build(2))
    if issubclass(cls, _SwitchNorm):
        names |= _state_names(cls(2, using_bn=False, device="meta"))
    return frozenset(names)


def _describe(layer: nn.Module, name: str) -> str:
    where = f"layer '{name}'" if name else "the root module"
    return f"{where} ({type(layer).__name__})"


# --- building the new layers ---------------------------------------------------------------


def _check_init(init: str, sparse: bool) -> None:
    if init not in ("uniform", "bn"):
        raise ValueError(f"init must be 'uniform' or 'bn', got {init!r}")
    if not isinstance(sparse, bool):
        raise TypeError(f"sparse must be True or False, got {sparse!r}")
    if sparse and init == "bn":
        raise ValueError(
            "init='bn' with sparse=True would select BN for good at the first training step "
            "(sparsestmax of those logits is one-hot, and a one-hot SSN layer is frozen): use "
            "init='uniform' with sparse=True, or init='bn' with SN"
        )


def _check_dim(dim: int) -> int:
    if dim not in (1, 2, 3):
        raise ValueError(
            f"dim must be 1, 2 or 3 (BatchNorm1d/2d/3d, SwitchNorm1d/2d/3d), got {dim!r}"
        )
    return dim


def _batchnorm_dim(layer: nn.Module, base: type, default: int) -> int:
    if base in _BATCHNORM_DIM:
        return _BATCHNORM_DIM[base]
    return getattr(layer, _DIM_ATTR, default)


def _with_act_of(base: type, target: type) -> type:
    """``target``, as a norm-act layer when ``base`` is one."""
    return with_act(target) if issubclass(base, NormActMixin) else target


def _tensors(layer: nn.Module) -> list[Tensor]:
    return [t for t in (*layer._parameters.values(), *layer._buffers.values()) if t is not None]


def _factory(layer: nn.Module) -> dict[str, Any]:
    """device and dtype of the layer's floating-point state (None: torch's defaults)."""
    for t in _tensors(layer):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {"device": None, "dtype": None}


def _thaw(layer: nn.Module, target: type[_BatchNorm]) -> tuple[_BatchNorm, type] | str:
    """A frozen BatchNorm as a trainable ``target``: Parameters weight and bias from its
    buffers, the same running-statistics tensors, its eps and mode, act and drop."""
    buffers = {name: getattr(layer, name, None) for name in _FROZEN_BUFFERS}
    if not all(isinstance(t, Tensor) and t.dim() == 1 for t in buffers.values()):
        wanted = ", ".join(_FROZEN_BUFFERS)
        return f"it does not hold the (C,) buffers {wanted} of a frozen BatchNorm"
    weight = cast(Tensor, buffers["weight"])
    kwargs: dict[str, Any] = {"act_layer": None} if issubclass(target, NormActMixin) else {}
    thawed = target(
        weight.shape[0],
        eps=float(getattr(layer, "eps", 1e-5)),
        device=weight.device,
        dtype=weight.dtype,
        **kwargs,
    )
    thawed.weight = nn.Parameter(weight.detach().clone())
    thawed.bias = nn.Parameter(cast(Tensor, buffers["bias"]).detach().clone())
    thawed.running_mean = buffers["running_mean"]
    thawed.running_var = buffers["running_var"]
    for name, child in layer._modules.items():
        if name in thawed._modules and child is not None:
            thawed._modules[name] = child
    _carry_state_dict_hooks(thawed, layer)
    thawed.train(layer.training)
    return thawed, target


def _take_over(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the Parameters, buffers and child modules of ``old`` (the same objects),
    its state-dict hooks and its mode."""
    for name, param in old._parameters.items():
        if name in new._parameters and param is not None:
            _check_shape(new._parameters[name], param, name, old)
            setattr(new, name, param)
    for name, buf in old._buffers.items():
        if name in new._buffers and buf is not None:
            _check_shape(new._buffers[name], buf, name, old)
            setattr(new, name, buf)
    for name, param in old._parameters.items():
        if param is None and new._parameters.get(name) is not None:
            # A layer built with bias=False: the new one has no bias either, so that state
            # dicts keep their keys and the old checkpoints load strictly.
            new.register_parameter(name, None)
    # A norm-act layer's act and drop; where the old layer has none, none.
    for name in list(new._modules):
        child = old._modules.get(name)
        new._modules[name] = child if child is not None else nn.Identity()
    _carry_state_dict_hooks(new, old)
    new.train(old.training)
    return new


def _carry_state_dict_hooks(new: nn.Module, old: nn.Module) -> None:
    """``new`` takes ``old``'s state-dict hook dictionaries (the same objects, so the handles
    that registered them still remove them); hooks bound to ``old`` are bound to ``new``."""
    for attr in _STATE_DICT_HOOKS:
        hooks = getattr(old, attr, None)
        if not hooks:
            continue
        for key, hook in list(hooks.items()):
            if getattr(hook, "with_module", False) and hook.module() is old:
                hooks[key] = type(hook)(hook.hook, new)
        setattr(new, attr, hooks)


def _check_shape(mine: Tensor | None, theirs: Tensor, name: str, old: nn.Module) -> None:
    if mine is not None and mine.shape != theirs.shape:
        raise ValueError(
            f"cannot carry {name} of {type(old).__name__} over: shape {tuple(theirs.shape)}, "
            f"the new layer expects {tuple(mine.shape)}"
        )


def _batchnorm_to_switchnorm(
    layer: _BatchNorm,
    target: type[_SwitchNorm],
    init: Init,
    **sync: Any,
) -> nn.Module:
    """A ``target`` switchable layer that starts from ``layer``'s BN state.

    ``sync``: ``process_group=...`` for a synchronized ``target``, nothing for a local one.
    """
    new = target(
        layer.num_features,
        eps=layer.eps,
        momentum=layer.momentum,
        affine=layer.affine,
        track_running_stats=layer.track_running_stats,
        **_factory(layer),
        **sync,
    )
    _take_over(new, layer)
    own = [p for p in layer._parameters.values() if p is not None]
    trainable = any(p.requires_grad for p in own) if own else True
    with torch.no_grad():
        for logits in (new.mean_weight, new.var_weight):
            if init == "bn":
                logits.zero_()
                logits[new.scopes.index("bn")] = BN_INIT_LOGIT_GAP
            logits.requires_grad_(trainable)
    return new


# Attributes every nn.Module has; the rest of an instance's __dict__ is layer state.
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
_SYNC_ATTRS = frozenset({"process_group", "_sync_id", "sync_name"})


def _switchnorm_twin(layer: _SwitchNorm, target: type[_SwitchNorm], **sync: Any) -> nn.Module:
    """``layer`` as a ``target`` (its local or synchronized twin), sharing all its state."""
    new = target(
        layer.num_features,
        eps=layer.eps,
        momentum=layer.momentum,
        using_moving_average=layer.using_moving_average,
        using_bn=layer.using_bn,
        last_gamma=layer.last_gamma,
        affine=layer.affine,
        track_running_stats=layer.track_running_stats,
        **_factory(layer),
        **sync,
    )
    _take_over(new, layer)
    # Plain attributes (hyper-parameters, and whatever state a registered subclass keeps
    # outside its buffers, such as a sparse layer's cached selection) move over as they are;
    # the synchronization settings belong to the new layer.
    for key, value in vars(layer).items():
        if key not in _MODULE_INTERNALS and key not in _SYNC_ATTRS:
            new.__dict__[key] = value
    return new


for _local, _sync in (
    *((_SWITCHNORM[d], _SYNC_SWITCHNORM[d]) for d in (1, 2, 3)),
    *((_SPARSE[d], _SYNC_SPARSE[d]) for d in (1, 2, 3)),
    (SwitchNormAct2d, SyncSwitchNormAct2d),
    (SparseSwitchNormAct2d, SyncSparseSwitchNormAct2d),
):
    register_sync_twin(_local, _sync)
