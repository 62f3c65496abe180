"""The steps of :mod:`syncsn.kernels.interface` as ``torch.library`` custom ops.

Each step is an op in the ``syncsn`` namespace with a fake (meta) implementation, so that
dynamo, AOTAutograd and ``torch.export`` trace through a layer without running it; the real
implementation picks the backend at run time (:func:`syncsn.kernels.passes_backend`). The
Python functions below wrap each op and pack its outputs into the interface's named
structures. The autograd Functions reach the steps through :func:`steps` and :func:`merge`,
which in plain eager mode call the backend directly instead.

Autograd is not registered on these ops: the layers' ``torch.autograd.Function`` owns the
derivative and calls the backward steps itself, so a double backward through a layer is an
error (see :mod:`syncsn.function`).
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch
from torch import Tensor

from . import passes_backend, shared_backend
from .interface import (
    Backend,
    BatchMoments,
    BNSaved,
    SNGrads,
    SNMixed,
    SNStats,
    SparseSwitch,
    acc_dtype,
)

__all__ = [
    "plain_eager",
    "steps",
    "merge",
    "sn_stats",
    "sn_output",
    "sn_backward_reduce",
    "sn_backward_input",
    "bn_stats",
    "bn_output",
    "bn_backward_reduce",
    "bn_backward_input",
]

_F64 = torch.float64


def plain_eager() -> bool:
    """No compiler, tracer, dispatch mode or functorch transform is watching."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._is_tracing()  # torch.jit.is_tracing() without its scripting check
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._are_functorch_transforms_active()
    )


def steps(eager: bool, x: Tensor, *params: Tensor | None) -> Backend | ModuleType:
    """What one layer call runs its full-size steps through (``steps(...).sn_stats(...)``).

    In plain eager mode (``eager``, from :func:`plain_eager`) it is the backend chosen for
    ``x`` and these parameters, called directly: one choice per call and no dispatcher round
    trip, which is most of a small layer's time. Otherwise it is this module, whose functions
    go through the custom ops that compilers, tracers and dispatch modes see (each op then
    chooses its backend when it runs). Both have the interface's signatures and results.
    """
    if eager:
        return passes_backend(x, *params)
    return sys.modules[__name__]


def _nc(x: Tensor, dtype: torch.dtype = _F64) -> Tensor:
    return x.new_empty(x.shape[:2], dtype=dtype)


def _c(x: Tensor, size: int = 1) -> Tensor:
    return x.new_empty((size * x.shape[1],), dtype=_F64)


def _param_grad(x: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return x.new_empty(0)
    return torch.empty_like(weight)


def _like_x(x: Tensor) -> Tensor:
    return torch.empty_like(x)


# --- the shared merge ---------------------------------------------------------------------


@torch.library.custom_op(
    "syncsn::merge", mutates_args=("running_mean", "running_var", "num_batches_tracked")
)
def _merge(
    gathered: Tensor,
    ddof: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    running_ddof: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    result = shared_backend(gathered.device.type).merge(
        gathered, ddof, running_mean, running_var, num_batches_tracked, momentum, running_ddof
    )
    return tuple(result)  # type: ignore[return-value]


@_merge.register_fake
def _(gathered, ddof, running_mean, running_var, num_batches_tracked, momentum, running_ddof):
    c = (gathered.shape[-1] - 1) // 2
    f64 = {"dtype": _F64, "device": gathered.device}
    return (
        gathered.new_empty((), **f64),
        gathered.new_empty((c,), **f64),
        gathered.new_empty((c,), **f64),
        gathered.new_empty((), dtype=torch.int32),
    )


def merge(
    gathered: Tensor,
    ddof: int,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    momentum: float | None = 0.1,
    running_ddof: int = 0,
    *,
    eager: bool = False,
) -> BatchMoments:
    """:meth:`Backend.merge <syncsn.kernels.interface.Backend.merge>`, on the shared backend
    of the partials' device type; with ``eager`` (see :func:`steps`) called directly."""
    args = (gathered, ddof, running_mean, running_var, num_batches_tracked, momentum, running_ddof)
    if eager:
        return shared_backend("cpu" if gathered.is_cpu else gathered.device.type).merge(*args)
    return BatchMoments(*_merge(*args))


# --- Switchable Normalization -------------------------------------------------------------


@torch.library.custom_op("syncsn::sn_stats", mutates_args=())
def _sn_stats(x: Tensor, ddof: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    stats, partials = passes_backend(x).sn_stats(x, ddof)
    return (*stats, partials)


@_sn_stats.register_fake
def _(x, ddof):
    n = x.shape[0]
    return (
        _nc(x, acc_dtype(x.dtype)), _nc(x), _nc(x),
        x.new_empty((n,), dtype=_F64), x.new_empty((n,), dtype=_F64),
        x.new_empty((1 + 2 * x.shape[1],), dtype=_F64),
    )  # fmt: skip


def sn_stats(x: Tensor, ddof: int) -> tuple[SNStats, Tensor]:
    """:meth:`Backend.sn_stats <syncsn.kernels.interface.Backend.sn_stats>`."""
    *stats, partials = _sn_stats(x, ddof)
    return SNStats(*stats), partials


@torch.library.custom_op("syncsn::sn_output", mutates_args=())
def _sn_output(
    x: Tensor,
    centre: Tensor,
    mean: Tensor,
    var: Tensor,
    ln_mean: Tensor,
    ln_var: Tensor,
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    w: Tensor,
    v: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    logits: bool,
    scopes: int,
    select_w: int,
    select_v: int,
    radius: Tensor | None,
    frozen_w: Tensor | None,
    frozen_v: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    stats = SNStats(centre, mean, var, ln_mean, ln_var)
    sparse = _sparse_switch(radius, frozen_w, frozen_v)
    backend = passes_backend(x, weight, bias)
    y, mixed = backend.sn_output(
        x, stats, bn_mean, bn_var, w, v, weight, bias, eps, logits, scopes, (select_w, select_v),
        sparse,
    )  # fmt: skip
    selection = mixed.selection if mixed.selection is not None else _no_selection(x)
    return (y, *mixed[:3], selection)


@_sn_output.register_fake
def _(x, centre, mean, var, ln_mean, ln_var, bn_mean, bn_var, w, v, weight, bias, eps, logits,
      scopes, select_w, select_v, radius, frozen_w, frozen_v):  # fmt: skip
    selection = _no_selection(x) if radius is None else x.new_empty((2,), dtype=torch.long)
    return _like_x(x), _nc(x), _nc(x), _nc(x), selection


def _sparse_switch(
    radius: Tensor | None, frozen_w: Tensor | None, frozen_v: Tensor | None
) -> SparseSwitch | None:
    """The op's SSN switch: it never writes the frozen buffers (an op's inputs are not
    mutated); the caller copies ``mixed.selection`` into them."""
    if radius is None or frozen_w is None or frozen_v is None:
        return None
    return SparseSwitch(radius, frozen_w, frozen_v, freeze=False)


def _no_selection(x: Tensor) -> Tensor:
    """An op's stand-in for ``mixed.selection`` None (a (2,) selection is never empty)."""
    return x.new_empty((0,), dtype=torch.long)


def _selection_of(selection: Tensor) -> Tensor | None:
    return selection if selection.numel() else None


def sn_output(
    x: Tensor,
    stats: SNStats,
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    w: Tensor,
    v: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    logits: bool,
    scopes: int = 7,
    selected: tuple[int, int] = (-1, -1),
    sparse: SparseSwitch | None = None,
) -> tuple[Tensor, SNMixed]:
    """:meth:`Backend.sn_output <syncsn.kernels.interface.Backend.sn_output>`, except that
    a ``sparse`` switch must have ``freeze`` False: copy ``mixed.selection`` into the frozen
    buffers instead."""
    if sparse is not None and sparse.freeze:
        raise ValueError("syncsn::sn_output does not write the frozen buffers (freeze=True)")
    radius, frozen_w, frozen_v = (None, None, None) if sparse is None else sparse[:3]
    y, mean, var, rstd, selection = _sn_output(
        x, *stats, bn_mean, bn_var, w, v, weight, bias, eps, logits, scopes, *selected, radius,
        frozen_w, frozen_v,
    )  # fmt: skip
    return y, SNMixed(mean, var, rstd, _selection_of(selection))


@torch.library.custom_op("syncsn::sn_backward_reduce", mutates_args=())
def _sn_backward_reduce(
    x: Tensor,
    dy: Tensor,
    centre: Tensor,
    mean: Tensor,
    var: Tensor,
    ln_mean: Tensor,
    ln_var: Tensor,
    mixed_mean: Tensor,
    mixed_var: Tensor,
    rstd: Tensor,
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    w: Tensor,
    v: Tensor,
    weight: Tensor | None,
    ddof: int,
    logits: bool,
    scopes: int,
    select_w: int,
    select_v: int,
    selection: Tensor | None,
    radius: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    stats = SNStats(centre, mean, var, ln_mean, ln_var)
    mixed = SNMixed(mixed_mean, mixed_var, rstd, selection)
    grads = passes_backend(x, weight).sn_backward_reduce(
        x, dy, stats, mixed, bn_mean, bn_var, w, v, weight, ddof, logits, scopes,
        (select_w, select_v), radius,
    )  # fmt: skip
    return tuple(grads)  # type: ignore[return-value]


@_sn_backward_reduce.register_fake
def _(x, dy, centre, mean, var, ln_mean, ln_var, mixed_mean, mixed_var, rstd, bn_mean, bn_var,
      w, v, weight, ddof, logits, scopes, select_w, select_v, selection, radius):  # fmt: skip
    return (
        _c(x, 2), _nc(x), _nc(x), torch.empty_like(w), torch.empty_like(v),
        _param_grad(x, weight), _param_grad(x, weight),
    )  # fmt: skip


def sn_backward_reduce(
    x: Tensor,
    dy: Tensor,
    stats: SNStats,
    mixed: SNMixed,
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    w: Tensor,
    v: Tensor,
    weight: Tensor | None,
    ddof: int,
    logits: bool,
    scopes: int = 7,
    selected: tuple[int, int] = (-1, -1),
    radius: Tensor | None = None,
) -> SNGrads:
    """:meth:`Backend.sn_backward_reduce
    <syncsn.kernels.interface.Backend.sn_backward_reduce>`."""
    return SNGrads(
        *_sn_backward_reduce(
            x,
            dy,
            *stats,
            *mixed[:3],
            bn_mean,
            bn_var,
            w,
            v,
            weight,
            ddof,
            logits,
            scopes,
            *selected,
            mixed.selection,
            radius,
        )  # fmt: skip
    )


@torch.library.custom_op("syncsn::sn_backward_input", mutates_args=())
def _sn_backward_input(
    x: Tensor,
    dy: Tensor,
    centre: Tensor,
    mean: Tensor,
    var: Tensor,
    ln_mean: Tensor,
    ln_var: Tensor,
    mixed_mean: Tensor,
    mixed_var: Tensor,
    rstd: Tensor,
    grad_mean: Tensor,
    grad_var: Tensor,
    bn_mean: Tensor | None,
    totals: Tensor | None,
    count: Tensor | None,
    weight: Tensor | None,
    ddof: int,
) -> Tensor:
    stats = SNStats(centre, mean, var, ln_mean, ln_var)
    mixed = SNMixed(mixed_mean, mixed_var, rstd)
    empty = x.new_empty(0)
    grads = SNGrads(empty, grad_mean, grad_var, empty, empty, empty, empty)
    return passes_backend(x, weight).sn_backward_input(
        x, dy, stats, mixed, grads, bn_mean, totals, count, weight, ddof
    )


@_sn_backward_input.register_fake
def _(x, dy, centre, mean, var, ln_mean, ln_var, mixed_mean, mixed_var, rstd, grad_mean,
      grad_var, bn_mean, totals, count, weight, ddof):  # fmt: skip
    return _like_x(x)


def sn_backward_input(
    x: Tensor,
    dy: Tensor,
    stats: SNStats,
    mixed: SNMixed,
    grads: SNGrads,
    bn_mean: Tensor | None,
    totals: Tensor | None,
    count: Tensor | None,
    weight: Tensor | None,
    ddof: int,
) -> Tensor:
    """:meth:`Backend.sn_backward_input
    <syncsn.kernels.interface.Backend.sn_backward_input>`."""
    return _sn_backward_input(
        x, dy, *stats, *mixed[:3], grads.grad_mean, grads.grad_var, bn_mean, totals, count,
        weight, ddof,
    )  # fmt: skip


# --- Batch Normalization ------------------------------------------------------------------


@torch.library.custom_op("syncsn::bn_stats", mutates_args=())
def _bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    centre, partials = passes_backend(x).bn_stats(x)
    return centre, partials


@_bn_stats.register_fake
def _(x):
    return _nc(x, acc_dtype(x.dtype)), _c(x, 2).new_empty((1 + 2 * x.shape[1],))


def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """:meth:`Backend.bn_stats <syncsn.kernels.interface.Backend.bn_stats>`."""
    return _bn_stats(x)


@torch.library.custom_op("syncsn::bn_output", mutates_args=())
def _bn_output(
    x: Tensor,
    centre: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, saved = passes_backend(x, weight, bias).bn_output(x, centre, mean, var, weight, bias, eps)
    return (y, *saved)


@_bn_output.register_fake
def _(x, centre, mean, var, weight, bias, eps):
    c = x.shape[1]
    return (
        _like_x(x), x.new_empty((c,), dtype=acc_dtype(x.dtype)), x.new_empty((c,), dtype=_F64),
        x.new_empty((c,), dtype=_F64),
    )  # fmt: skip


def bn_output(
    x: Tensor,
    centre: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, BNSaved]:
    """:meth:`Backend.bn_output <syncsn.kernels.interface.Backend.bn_output>`."""
    y, *saved = _bn_output(x, centre, mean, var, weight, bias, eps)
    return y, BNSaved(*saved)


@torch.library.custom_op("syncsn::bn_backward_reduce", mutates_args=())
def _bn_backward_reduce(
    x: Tensor, dy: Tensor, centre: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    saved = BNSaved(centre, mean, rstd)
    return passes_backend(x, weight).bn_backward_reduce(x, dy, saved, weight)


@_bn_backward_reduce.register_fake
def _(x, dy, centre, mean, rstd, weight):
    return _c(x, 2), _param_grad(x, weight), _param_grad(x, weight)


def bn_backward_reduce(
    x: Tensor, dy: Tensor, saved: BNSaved, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """:meth:`Backend.bn_backward_reduce
    <syncsn.kernels.interface.Backend.bn_backward_reduce>`."""
    return _bn_backward_reduce(x, dy, *saved, weight)


@torch.library.custom_op("syncsn::bn_backward_input", mutates_args=())
def _bn_backward_input(
    x: Tensor,
    dy: Tensor,
    centre: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    totals: Tensor,
    count: Tensor,
) -> Tensor:
    saved = BNSaved(centre, mean, rstd)
    return passes_backend(x, weight).bn_backward_input(x, dy, saved, weight, totals, count)


@_bn_backward_input.register_fake
def _(x, dy, centre, mean, rstd, weight, totals, count):
    return _like_x(x)


def bn_backward_input(
    x: Tensor, dy: Tensor, saved: BNSaved, weight: Tensor | None, totals: Tensor, count: Tensor
) -> Tensor:
    """:meth:`Backend.bn_backward_input
    <syncsn.kernels.interface.Backend.bn_backward_input>`."""
    return _bn_backward_input(x, dy, *saved, weight, totals, count)
