"""Autograd Functions of the normalization layers, local and synchronized.

One Function per kind of layer, written once against the kernel interface
(:mod:`syncsn.kernels.interface`, reached through :func:`syncsn.kernels.ops.steps`): each
reads x once for its statistics and once for its output, saves x and O(N * C) small
tensors for backward (no normalized copy), and in backward makes
one reduction pass, one all-reduce of 2 * C values (batch scope, synchronized, training
only) and one elementwise pass. The local layers are these same Functions without a process
group, so local and synchronized code cannot drift apart. The collectives are made here,
between the steps, through the traceable ops of :mod:`syncsn.comm`.

The gradients returned for switch weights ``w`` and ``v`` on the simplex are exact up to a
constant added to every entry, which is invisible through sparsestmax (any map onto the
simplex); SN passes its logits instead, and gets their exact gradients.

Every argument that is not a tensor travels in a frozen :class:`LayerCall`, which
torch.compile treats as a constant.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import comm
from .deferred import DeferredRead
from .kernels import ops
from .kernels.interface import Flags, SNMixed, SNStats, SparseSwitch

__all__ = ["LayerCall", "layer_call", "SwitchNormFunction", "BatchNormFunction", "checked"]


@dataclass(frozen=True)
class LayerCall:
    """The constant settings of one layer call.

    Attributes:
        layer: the layer as errors name it, e.g. ``"SyncSwitchNorm2d(64) 'backbone.bn1'"``.
        key: a process-unique number of the layer, for its once-only warnings.
        training: batch statistics folded into the running ones (else the running
            statistics are used where the layer has them).
        eps, momentum: as in torch's BatchNorm.
        ddof: 0, or 1 for SwitchNorm1d's unbiased LN and BN variances.
        group, world: the process group's name and size when the call synchronizes, else
            None and 1.
        fold_running: whether the running statistics take this batch (False while
            torch.utils.checkpoint recomputes a forward that already counted).
        eager: plain eager mode (:func:`syncsn.kernels.ops.plain_eager`): the forward
            calls its steps directly instead of through the custom ops.
        logits: SN's ``w`` and ``v`` are logits, whose softmax the kernels compute.
        scopes: the mask of the layer's scopes (bits 1 = IN, 2 = LN, 4 = BN) that ``w`` and
            ``v`` have an entry for.
        selected: for ``w`` and ``v``, the scope (an index into the layer's scopes) a
            settled SSN layer is frozen on, whose one-hot weights the kernels use (with a
            zero gradient) whatever the vector holds; -1 when not frozen.
    """

    layer: str
    key: int
    training: bool
    eps: float
    momentum: float | None
    ddof: int = 0
    group: str | None = None
    world: int = 1
    fold_running: bool = True
    eager: bool = False
    logits: bool = False
    scopes: int = 7
    selected: tuple[int, int] = (-1, -1)


# A layer's calls repeat a few settings: in plain eager mode each is made once (building a
# frozen dataclass costs about as much as a small layer's merge). Compiled code builds its
# own, which the compiler treats as a constant.
_same_call = functools.lru_cache(maxsize=8192)(LayerCall)


def layer_call(
    layer: str,
    key: int,
    training: bool,
    eps: float,
    momentum: float | None,
    ddof: int,
    group: str | None,
    world: int,
    fold_running: bool,
    eager: bool,
    logits: bool = False,
    scopes: int = 7,
    selected: tuple[int, int] = (-1, -1),
) -> LayerCall:
    """The :class:`LayerCall` of these settings; in plain eager mode one shared object."""
    settings = (
        layer,
        key,
        training,
        eps,
        momentum,
        ddof,
        group,
        world,
        fold_running,
        eager,
        logits,
        scopes,
        selected,
    )
    return _same_call(*settings) if eager else LayerCall(*settings)


_layer_keys = itertools.count()


def next_layer_key() -> int:
    """A new process-unique number for :attr:`LayerCall.key`."""
    return next(_layer_keys)


def _batch_moments(
    partials: Tensor,
    call: LayerCall,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    running_ddof: int,
):
    """The forward collective and the merge: the batch scope of every rank of the group."""
    if call.training:
        partials = _after_due_flags(partials, call)
    gathered = comm.gather_partials(partials, call.group, call.world, eager=call.eager)
    fold = call.training and call.fold_running
    batch = ops.merge(
        gathered,
        call.ddof,
        running_mean if fold else None,
        running_var if fold else None,
        num_batches_tracked if fold else None,
        call.momentum,
        running_ddof,
        eager=call.eager,
    )
    if call.training:
        var = checked(batch.var, batch.flags, call)
        if var is not batch.var:
            batch = batch._replace(var=var)
    return batch


def _backward_steps(ctx, x: Tensor, weight: Tensor | None, eager: bool):
    """The forward's backend when it was called directly and the backward is plain eager too,
    else :func:`~syncsn.kernels.ops.steps` anew."""
    if eager and ctx.backend is not None:
        return ctx.backend
    return ops.steps(eager, x, weight)


class SwitchNormFunction(torch.autograd.Function):
    """Switchable Normalization over (N, C, *S), scopes (IN, LN, BN).

    Inputs: x (N, C, *S); w, v the mixing weights (K,) on the simplex for means and
    variances over the scopes of ``call.scopes`` (or with ``call.logits`` the logits whose
    softmax they are); weight, bias (C,) or None; the
    running buffers (None when not tracked); for an SSN layer that has not settled its
    ``radius`` and ``frozen_w``, ``frozen_v`` buffers (then w, v are its logits; else None);
    ``use_bn`` whether the layer has a BN scope; the :class:`LayerCall`; ``anchor`` a tensor
    that requires grad on every rank alike (see :func:`syncsn.switchnorm.grad_anchor`) or
    None.

    Returns y; with ``radius`` (y, selection): the (2,) frozen scopes after the call, which
    in training the backend has written into the frozen buffers in plain eager mode, and
    the caller writes otherwise (a custom op does not mutate its inputs).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        w: Tensor,
        v: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        num_batches_tracked: Tensor | None,
        radius: Tensor | None,
        frozen_w: Tensor | None,
        frozen_v: Tensor | None,
        use_bn: bool,
        call: LayerCall,
        anchor: Tensor | None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        steps = ops.steps(call.eager, x, weight, bias)
        sparse = None
        if radius is not None and frozen_w is not None and frozen_v is not None:
            sparse = SparseSwitch(radius, frozen_w, frozen_v, call.training and call.eager)
        batch_scope = use_bn and (call.training or running_mean is None)
        if batch_scope and not call.training:
            _check_eval_count(x.shape[0], call)  # each sample counts once
        stats, partials = steps.sn_stats(x, call.ddof)
        bn_mean = bn_var = count = None
        if batch_scope:
            batch = _batch_moments(
                partials, call, running_mean, running_var, num_batches_tracked, call.ddof
            )
            count, bn_mean, bn_var = batch.count, batch.mean, batch.var
        elif use_bn:
            assert running_mean is not None and running_var is not None
            bn_mean, bn_var = running_mean.double(), running_var.double()
        y, mixed = steps.sn_output(
            x, stats, bn_mean, bn_var, w, v, weight, bias, call.eps, call.logits, call.scopes,
            call.selected, sparse,
        )  # fmt: skip

        ctx.save_for_backward(x, w, v, weight, *stats, *mixed, bn_mean, bn_var, count, radius)
        ctx.call = call
        ctx.batch_scope = batch_scope
        ctx.backend = steps if call.eager else None
        if mixed.selection is None:
            return y
        ctx.mark_non_differentiable(mixed.selection)
        ctx.set_materialize_grads(False)  # no zeros for the selection's gradient
        return y, mixed.selection

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, *_):
        x, w, v, weight, *rest = ctx.saved_tensors
        stats, mixed = SNStats(*rest[:5]), SNMixed(*rest[5:9])
        bn_mean, bn_var, count, radius = rest[9:]
        call: LayerCall = ctx.call
        eager = ops.plain_eager()
        steps = _backward_steps(ctx, x, weight, eager)
        grads = steps.sn_backward_reduce(
            x, dy, stats, mixed, bn_mean, bn_var, w, v, weight, call.ddof, call.logits,
            call.scopes, call.selected, radius,
        )  # fmt: skip
        totals = None
        if ctx.batch_scope:
            # The backward collective: the BN scope's gradient sums over every rank.
            totals = comm.sum_totals(grads.totals, call.group, layer=call.layer, eager=eager)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = steps.sn_backward_input(
                x, dy, stats, mixed, grads, bn_mean if ctx.batch_scope else None, totals,
                count, weight, call.ddof,
            )  # fmt: skip
        dweight = grads.grad_weight if weight is not None else None
        dbias = grads.grad_bias if weight is not None else None
        return (dx, grads.grad_w, grads.grad_v, dweight, dbias, *([None] * 9))


class BatchNormFunction(torch.autograd.Function):
    """Batch Normalization over (N, C, *S) with the batch statistics of every rank.

    Each value counts once (pixel-weighted); the normalization uses the biased variance,
    the running variance gets the unbiased one from the global count, as torch.nn.BatchNorm
    does.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        num_batches_tracked: Tensor | None,
        call: LayerCall,
        anchor: Tensor | None,
    ) -> Tensor:
        steps = ops.steps(call.eager, x, weight, bias)
        if not call.training:
            _check_eval_count(x.numel() // x.shape[1], call)  # values per channel
        centre, partials = steps.bn_stats(x)
        batch = _batch_moments(
            partials, call, running_mean, running_var, num_batches_tracked, running_ddof=1
        )
        y, saved = steps.bn_output(x, centre, batch.mean, batch.var, weight, bias, call.eps)
        ctx.save_for_backward(x, weight, *saved, batch.count)
        ctx.call = call
        ctx.backend = steps if call.eager else None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, centre, mean, rstd, count = ctx.saved_tensors
        saved = ops.BNSaved(centre, mean, rstd)
        call: LayerCall = ctx.call
        eager = ops.plain_eager()
        steps = _backward_steps(ctx, x, weight, eager)
        local, dweight, dbias = steps.bn_backward_reduce(x, dy, saved, weight)
        totals = comm.sum_totals(local, call.group, layer=call.layer, eager=eager)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = steps.bn_backward_input(x, dy, saved, weight, totals, count)
        if weight is None:
            return (dx, None, None, *([None] * 5))
        return (dx, dweight, dbias, *([None] * 5))


# --- what the merge found ---------------------------------------------------------------


class _Reports:
    """One layer's reading of its merge flags and what it has warned about."""

    def __init__(self) -> None:
        self.reader = DeferredRead()
        self.warned = 0


_reports: dict[int, _Reports] = {}


def checked(var: Tensor, flags: Tensor, call: LayerCall) -> Tensor:
    """``var``, once the merge's :class:`~syncsn.kernels.interface.Flags` of a training call
    have been acted on (the output pass depends on it, so no compiler drops the check).

    A global batch of one sample (value) per channel raises ValueError, as torch's BatchNorm
    does; non-finite statistics and running statistics that would overflow their dtype are
    not folded (the merge already skipped them) and warn once per layer. The flags are read
    through :class:`~syncsn.deferred.DeferredRead`: at once on CPU, one step late on CUDA
    (then the error names the previous step), the same step on every rank either way.

    A call that raises folds nothing into the running statistics, on either device: on CPU
    the merge skipped the batch of one; on CUDA the layer's next training call acts on the
    flags before it gathers or merges (:func:`_after_due_flags`), so that call's batch is
    not folded either.
    """
    if call.eager:
        # Nothing can drop or reorder the check: act on the flags and hand var back as is.
        _read_flags(flags, call.layer, call.key)
        return var
    return torch.ops.syncsn.checked(var, flags, call.layer, call.key)


def _after_due_flags(partials: Tensor, call: LayerCall) -> Tensor:
    """``partials``, once the flags of this layer's previous training call that were read
    late (on CUDA) have been acted on: before this call gathers or folds anything, so that a
    call that raises changes nothing, as on CPU, where the flags are read at once and nothing
    is due here. Every rank of the group holds the same flags, so every rank raises here.
    (The collective takes the result, so no compiler drops the check or moves it later.)"""
    if call.eager:
        _read_flags(None, call.layer, call.key)
        return partials
    no_flags = partials.new_empty((0,), dtype=torch.int32)
    return torch.ops.syncsn.checked(partials, no_flags, call.layer, call.key)


def _check_eval_count(count: int, call: LayerCall) -> None:
    """ValueError for an eval-mode call that normalizes with the statistics of a batch of
    ``count`` = 1 (samples for SN, values per channel for BatchNorm), as torch's BatchNorm
    raises. Eval mode never communicates, so the count is this rank's, known from the
    input's shape: the check reads nothing on the device and raises at once everywhere."""
    if count == 1:
        raise _too_few_error(call.layer, when=None)


def _read_flags(flags: Tensor | None, layer: str, key: int) -> None:
    """Act on the flags due for a layer: those of its previous call if they were read late
    (CUDA), then, given ``flags`` (a merge's), on them once they are read (at once on CPU;
    on CUDA at the layer's next training call, which collects them before its merge)."""
    state = _reports.get(key)
    if state is None:
        if flags is None:
            return
        state = _reports[key] = _Reports()
    due = state.reader.collect()
    if due:
        _act(due, layer, state, late=True)
    if flags is not None:
        due = state.reader.publish(flags)
        if due:
            _act(due, layer, state, late=False)


@torch.library.custom_op("syncsn::checked", mutates_args=())
def _checked(var: Tensor, flags: Tensor, layer: str, key: int) -> Tensor:
    # Empty flags: before a merge, only what an earlier call left due.
    _read_flags(flags if flags.numel() else None, layer, key)
    return var.clone()  # an op's output may not alias its input


@_checked.register_fake
def _(var, flags, layer, key):
    return torch.empty_like(var)


def _too_few_error(layer: str, when: str | None) -> ValueError:
    """The error for a batch of one: of a training step (``when`` says which), or, with
    ``when`` None, of an eval-mode call without running statistics."""
    # SN counts samples (each counts once whatever its size), BatchNorm counts values.
    unit = "value per channel" if layer.startswith("SyncBatchNorm") else "sample"
    if when is not None:
        message = (
            f"{layer}: expected more than 1 value per channel when training, got a global "
            f"batch of 1 {unit} {when}; the batch statistics are undefined. Use a larger "
            "batch, synchronize over more ranks (a Sync layer), or call .eval() to use the "
            "running statistics."
        )
    else:
        message = (
            f"{layer}: expected more than 1 value per channel for the batch statistics, got a "
            f"batch of 1 {unit} in eval mode; without running statistics "
            "(track_running_stats=False) the layer normalizes with the batch's statistics in "
            "eval mode too, as torch's BatchNorm does, and they are undefined. Use a larger "
            "batch, or a layer that tracks running statistics."
        )
    if unit == "sample":
        message += (
            " For Switchable Normalization with one image per process, the SN authors use "
            "using_bn=False (no batch scope)."
        )
    return ValueError(message)


def _act(flags: int, layer: str, state: _Reports, late: bool) -> None:
    when = "in the previous training step" if late else "in this training step"
    if flags & Flags.TOO_FEW:
        raise _too_few_error(layer, when)
    fresh = flags & ~state.warned & (Flags.NONFINITE | Flags.OVERFLOW)
    state.warned |= fresh
    if fresh & Flags.NONFINITE:
        warnings.warn(
            f"{layer}: non-finite batch statistics {when} (an input with NaN or infinite "
            "values, or an overflowed mixed-precision step); the running statistics were left "
            "unchanged. Warned once per layer.",
            RuntimeWarning,
            stacklevel=2,
        )
    if fresh & Flags.OVERFLOW:
        warnings.warn(
            f"{layer}: the running statistics would overflow their dtype {when} (batch "
            "statistics larger than the buffers can hold); they were left unchanged. Keep the "
            "running buffers in float32 (layer.float()) to fold such statistics. Warned once "
            "per layer.",
            RuntimeWarning,
            stacklevel=2,
        )
