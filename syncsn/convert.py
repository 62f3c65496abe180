"""Converters that swap the normalization layers of an existing model in place.

``convert_sync_switchnorm(model)`` is the one-line way to take a detector or segmenter built
with BatchNorm and make every norm layer a synchronized Switchable Normalization layer:

- ``convert_sync_switchnorm``: BatchNorm / SyncBatchNorm / local SN -> SyncSwitchNorm{1,2,3}d
- ``convert_switchnorm``: BatchNorm / SyncBatchNorm -> SwitchNorm{1,2,3}d (local)
- ``convert_sync_batchnorm``: BatchNorm / torch.nn.SyncBatchNorm -> :class:`SyncBatchNorm`
- ``revert_sync``: every synchronized layer back to its local twin (for single-device
  evaluation and export)

Rules shared by all of them:

- Recognised layers: ``torch.nn.BatchNorm{1,2,3}d``, ``torch.nn.SyncBatchNorm``, our
  :class:`SyncBatchNorm` and the Switchable Normalization family, and subclasses of these that
  add nothing (no overridden ``forward`` or other behaviour, no extra state, no hooks). A
  layer that does add something (an activation fused into the norm, say) is left as it is,
  with a warning naming it: converting it would silently strip that behaviour.
- The new layer reuses the old one's Parameters (the same objects, so optimizers and
  ``requires_grad`` carry over) and running-statistics buffers (the same tensors), and takes
  its eps, momentum, training flag, device and dtype. New parameters (the switch logits)
  require grad when the old layer's parameters did.
- State-dict keys stay as they were, apart from the switch logits a switchable layer adds: a
  layer without a bias (``bias=False``) or without running statistics
  (``track_running_stats=False``) gives one without them, so a checkpoint of the original
  model loads strictly into the converted one (``strict=False`` for the added logits).
- A layer used at several places in the model stays one layer after conversion.
- The root is converted too when it is itself a norm layer: always use the return value.

Dimensionality. BatchNorm{1,2,3}d map to the layer of the same dimensionality. Note that
BatchNorm1d accepts (N, C) and (N, C, L) input but SwitchNorm1d only (N, C). The two
dimension-agnostic layers, ``torch.nn.SyncBatchNorm`` and our :class:`SyncBatchNorm`, take
their dimensionality from the layer they replaced when this module made them (a
:class:`SyncBatchNorm` built by ``convert_sync_batchnorm`` or ``build_norm_layer`` remembers
it), and otherwise from the ``dim`` argument (default 2, images). A wrong guess is not silent:
the new layer raises on its first input, naming the dimensionality it expected.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import comm
from .batchnorm import SyncBatchNorm
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
    "convert_sync_switchnorm",
    "convert_switchnorm",
    "convert_sync_batchnorm",
    "revert_sync",
    "register_sync_twin",
    "mark_dim",
]

Init = Literal["uniform", "bn"]

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

_BATCHNORM_DIM = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_LOCAL_BATCHNORM = {d: cls for cls, d in _BATCHNORM_DIM.items()}
_AGNOSTIC_BATCHNORM = (nn.SyncBatchNorm, SyncBatchNorm)
_SWITCHNORM = {1: SwitchNorm1d, 2: SwitchNorm2d, 3: SwitchNorm3d}
_SYNC_SWITCHNORM = {1: SyncSwitchNorm1d, 2: SyncSwitchNorm2d, 3: SyncSwitchNorm3d}

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
) -> nn.Module:
    """Make every BatchNorm-like and local switchable layer a synchronized switchable one.

    - ``BatchNorm{1,2,3}d``, ``torch.nn.SyncBatchNorm``, :class:`SyncBatchNorm` ->
      ``SyncSwitchNorm{1,2,3}d``, switch logits set by ``init``.
    - Local switchable layers -> their synchronized twin, switch logits kept.
    - Layers that are already synchronized switchable layers get ``process_group``.

    Args:
        module: the model (converted in place; the root too when it is a norm layer).
        process_group: the group every new Sync layer synchronizes over (None: the world).
        init: ``"uniform"``, logits all ones as in the reference (1/K per scope), or ``"bn"``,
            logits that make the BN scope dominate so that, in eval mode, the network computes
            what the BatchNorm network computed (within about 1e-3); for fine-tuning a
            BatchNorm-pretrained model. See :data:`BN_INIT_LOGIT_GAP`.
        dim: dimensionality (1, 2 or 3) assumed for SyncBatchNorm layers that do not record
            the layer they replaced.

    Returns:
        The converted module (use it: the root may have been replaced).

    Example::

        >>> model = torchvision.models.resnet50(weights="IMAGENET1K_V2")
        >>> model = syncsn.convert_sync_switchnorm(model, init="bn")  # fine-tune from BN
    """
    _check_init(init)
    _check_dim(dim)

    def replace(layer: _BatchNorm, base: type, name: str) -> nn.Module | None:
        if base in _BATCHNORM_DIM or base in _AGNOSTIC_BATCHNORM:
            target = _SYNC_SWITCHNORM[_batchnorm_dim(layer, base, dim)]
            return _batchnorm_to_switchnorm(layer, target, init, name, process_group=process_group)
        if base in _SYNC_TWIN:
            return _switchnorm_twin(
                cast(_SwitchNorm, layer), _SYNC_TWIN[base], process_group=process_group
            )
        if base in _LOCAL_TWIN:
            cast(_SyncMixin, layer).process_group = process_group
        return None

    return _convert(module, replace)


def convert_switchnorm(module: nn.Module, init: Init = "uniform", dim: int = 2) -> nn.Module:
    """Make every BatchNorm-like layer a local ``SwitchNorm{1,2,3}d``.

    ``BatchNorm{1,2,3}d``, ``torch.nn.SyncBatchNorm`` and :class:`SyncBatchNorm` are
    converted; switchable layers, local or synchronized, are left as they are (use
    :func:`revert_sync` to make synchronized ones local).

    Args:
        module: the model (converted in place; the root too when it is a norm layer).
        init: ``"uniform"`` or ``"bn"``, as in :func:`convert_sync_switchnorm`.
        dim: as in :func:`convert_sync_switchnorm`.

    Returns:
        The converted module.

    Example::

        >>> model = syncsn.convert_switchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        >>> type(model[1]).__name__
        'SwitchNorm2d'
    """
    _check_init(init)
    _check_dim(dim)

    def replace(layer: _BatchNorm, base: type, name: str) -> nn.Module | None:
        if base in _BATCHNORM_DIM or base in _AGNOSTIC_BATCHNORM:
            target = _SWITCHNORM[_batchnorm_dim(layer, base, dim)]
            return _batchnorm_to_switchnorm(layer, target, init, name)
        return None

    return _convert(module, replace)


def convert_sync_batchnorm(
    module: nn.Module, process_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Make every BatchNorm layer our :class:`SyncBatchNorm` (which also runs on CPU/gloo).

    ``BatchNorm{1,2,3}d`` and ``torch.nn.SyncBatchNorm`` are replaced (the new layer records
    the dimensionality of a BatchNorm{1,2,3}d, so :func:`revert_sync` restores it); existing
    :class:`SyncBatchNorm` layers get ``process_group``. Switchable layers are left alone.
    The same as :meth:`SyncBatchNorm.convert_sync_batchnorm`.

    Args:
        module: the model (converted in place; the root too when it is a norm layer).
        process_group: the group the layers synchronize over (None: the world).

    Returns:
        The converted module.

    Example::

        >>> model = syncsn.convert_sync_batchnorm(model, process_group=syncsn.create_sync_groups(8))
    """

    def replace(layer: _BatchNorm, base: type, name: str) -> nn.Module | None:
        if base is SyncBatchNorm:
            cast(SyncBatchNorm, layer).process_group = process_group
            return None
        if base in _BATCHNORM_DIM or base is nn.SyncBatchNorm:
            new = SyncBatchNorm(
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

    return _convert(module, replace)


def revert_sync(module: nn.Module, dim: int = 2) -> nn.Module:
    """Turn every synchronized layer back into its local twin, same parameters and buffers.

    ``SyncSwitchNorm{1,2,3}d`` (and registered synchronized switchable layers) become their
    local class; :class:`SyncBatchNorm` and ``torch.nn.SyncBatchNorm`` become
    ``BatchNorm{1,2,3}d``: the dimensionality it recorded when it replaced a BatchNorm layer,
    else ``dim`` (default 2). The local model computes exactly what the synchronized one
    computes in eval mode, with no process group needed (single-device evaluation, export).

    Args:
        module: the model (converted in place; the root too when it is a norm layer).
        dim: dimensionality (1, 2 or 3) for SyncBatchNorm layers that do not record one.

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
            target = _LOCAL_BATCHNORM[_batchnorm_dim(layer, base, dim)]
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

    return _convert(module, replace)


# --- traversal -----------------------------------------------------------------------------

# (layer, the known class it is an instance of, its qualified name) -> new layer or None
Replace = Callable[[_BatchNorm, type, str], "nn.Module | None"]


def _convert(module: nn.Module, replace: Replace) -> nn.Module:
    """Depth-first replacement: ``replace(layer, known_base, qualified_name)`` returns the new
    layer or None to keep it. Shared submodules are converted once and stay shared. The Sync
    layers of the result are named after their place in it (their identity for SYNCSN_DEBUG,
    the same on every rank however many other Sync layers a rank has built)."""
    done: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(old) -> (old, new); old kept alive

    def visit(layer: nn.Module, name: str) -> nn.Module:
        if id(layer) in done:
            return done[id(layer)][1]
        new = layer
        base = _recognise(layer, name)
        if base is not None and isinstance(layer, _BatchNorm):
            new = replace(layer, base, name) or layer
        done[id(layer)] = (layer, new)
        # _modules, not named_children(): the latter skips a child seen under another name.
        for child_name, child in list(new._modules.items()):
            if child is None:
                continue
            converted = visit(child, f"{name}.{child_name}" if name else child_name)
            if converted is not child:
                new._modules[child_name] = converted
        return new

    return comm.name_sync_layers(visit(module, ""))


@functools.cache
def _known_classes() -> frozenset[type]:
    return frozenset(
        [*_BATCHNORM_DIM, *_AGNOSTIC_BATCHNORM, *_SYNC_TWIN, *_LOCAL_TWIN],
    )


def _recognise(layer: nn.Module, name: str) -> type | None:
    """The recognised class ``layer`` is an instance of, or None.

    None for anything that is not a norm layer, and (with a warning) for a norm layer whose
    class or instance adds something the converters would not carry over.
    """
    if not isinstance(layer, _BatchNorm):  # the switchable layers are ones too
        return None
    known = _known_classes()
    base = next((cls for cls in type(layer).__mro__ if cls in known), None)
    advice = (
        "Converting it could drop behaviour the new layer does not have; replace it by hand "
        "if that is intended."
    )
    reason: str | None
    if any(nn.parameter.is_lazy(t) for t in _tensors(layer)):
        reason, advice = "its parameters are not materialized yet", "Run one forward pass first."
    elif base is None:
        reason = "its class is not one the converters know"
    else:
        reason = _added_behaviour(layer, base)
    if reason is not None:
        warnings.warn(
            f"{_describe(layer, name)} was left unchanged: {reason}. {advice}",
            UserWarning,
            stacklevel=2,
        )
        return None
    return base


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


def _added_behaviour(layer: nn.Module, base: type) -> str | None:
    """Why ``layer`` is more than a ``base`` (None when it adds nothing)."""
    mro = type(layer).__mro__
    overridden = {attr for cls in mro[: mro.index(base)] for attr in vars(cls)}
    overridden -= _HARMLESS_CLASS_ATTRS
    if overridden:
        return f"its class {type(layer).__name__} defines {', '.join(sorted(overridden))}"
    if type(layer) is not base:
        extra = _state_names(layer) - _state_names_of(base)
        if extra:
            return f"it has state a {base.__name__} does not have: {', '.join(sorted(extra))}"
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
    """The instance state a plain ``cls`` has, from throwaway instances on the meta device."""
    names = _state_names(cls(2, device="meta"))
    if issubclass(cls, _SwitchNorm):
        names |= _state_names(cls(2, using_bn=False, device="meta"))
    return frozenset(names)


def _describe(layer: nn.Module, name: str) -> str:
    where = f"layer '{name}'" if name else "the root module"
    return f"{where} ({type(layer).__name__})"


# --- building the new layers ---------------------------------------------------------------


def _check_init(init: str) -> None:
    if init not in ("uniform", "bn"):
        raise ValueError(f"init must be 'uniform' or 'bn', got {init!r}")


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


def _tensors(layer: nn.Module) -> list[Tensor]:
    return [t for t in (*layer._parameters.values(), *layer._buffers.values()) if t is not None]


def _factory(layer: nn.Module) -> dict[str, Any]:
    """device and dtype of the layer's floating-point state (None: torch's defaults)."""
    for t in _tensors(layer):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {"device": None, "dtype": None}


def _take_over(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the Parameters and buffers of ``old`` (the same objects) and its mode."""
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
    new.train(old.training)
    return new


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
    name: str,
    **sync: Any,
) -> nn.Module | None:
    """A ``target`` switchable layer that starts from ``layer``'s BN state (None: impossible).

    ``sync``: ``process_group=...`` for a synchronized ``target``, nothing for a local one.
    """
    if target in (SwitchNorm1d, SyncSwitchNorm1d) and layer.num_features < 2:
        warnings.warn(
            f"{_describe(layer, name)} was left unchanged: {target.__name__} needs at least 2 "
            f"features (its LN scope is a variance over them), the layer has "
            f"{layer.num_features}.",
            UserWarning,
            stacklevel=2,
        )
        return None
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


for _d in (1, 2, 3):
    register_sync_twin(_SWITCHNORM[_d], _SYNC_SWITCHNORM[_d])
