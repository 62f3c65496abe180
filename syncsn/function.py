"""Autograd Functions of the normalization layers, local and synchronized.

One Function per kind of layer; each reads x once for its statistics and once for its output,
saves x and O(N * C) small tensors for backward (no normalized copy), and in backward makes
one reduction pass, one all-reduce of 2 * C values (BN scope, synchronized, training only)
and one elementwise pass. The local layers are these same Functions with a group of one
rank, so local and synchronized code cannot drift apart.

The gradients returned for the switch weights ``w`` and ``v`` are exact up to a constant
added to every entry, which is invisible through softmax / sparsestmax (any map onto the
simplex): they are computed as sum g * (scope - mixed) so that they stay exact when all
scopes are large and nearly equal.

Each Function has two implementations of the same steps: fused C++ kernels for CPU
(:mod:`syncsn._native`, a few calls per pass) and pure torch (CUDA, and CPU when the kernels
cannot be built or ``SYNCSN_NATIVE=0``). The collectives are made here, in Python, between
the steps, in the same format for both, so ranks may even mix the two.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _native, comm
from . import functional as F

__all__ = [
    "NonFiniteWarning",
    "SyncSpec",
    "RunningStats",
    "SwitchNormFunction",
    "SwitchNorm1dFunction",
    "BatchNormFunction",
]


@dataclass(frozen=True)
class SyncSpec:
    """Whom a layer synchronizes with and what to call it in errors."""

    group: dist.ProcessGroup | None
    layer: str
    identity: int | str = -1  # name or creation number, for SYNCSN_DEBUG
    distributed: bool = True  # False for the local layers, which never communicate

    @property
    def active(self) -> bool:
        return self.distributed and comm.group_size(self.group) > 1

    def gather(self, local: Tensor) -> Tensor:
        """The forward collective: every rank's fixed-size partials (K,) as (world, K)."""
        if not self.active:
            return local.unsqueeze(0)
        if comm.debug_enabled():
            comm.check_same_layer(self.layer, self.identity, self.group, local.device)
        return comm.all_gather_stacked(local, self.group)

    def all_reduce_(self, totals: Tensor) -> Tensor:
        """The backward collective: sum ``totals`` (2C,) over the ranks, in place."""
        if self.active:
            comm.all_reduce_sum_(totals, self.group)
        return totals


class NonFiniteWarning:
    """Warns once per layer when a batch had non-finite statistics.

    On a GPU the flag is read a step late, through a pinned buffer and an event, so that the
    check never stalls the device.
    """

    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.warned = False
        self._pending: tuple[Tensor, torch.cuda.Event] | None = None

    def observe(self, finite: Tensor) -> None:
        if self.warned:
            return
        if finite.device.type != "cuda":
            if not bool(finite):
                self._warn()
            return
        if self._pending is not None:
            host, event = self._pending
            if not event.query():
                return
            self._pending = None
            if not bool(host):
                self._warn()
                return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event)

    def observe_host(self, finite: bool) -> None:
        """:meth:`observe` for a flag already on the host."""
        if not finite and not self.warned:
            self._warn()

    def _warn(self) -> None:
        self.warned = True
        warnings.warn(
            f"{self.layer}: non-finite batch statistics (an overflowed mixed-precision step?); "
            "the running statistics were left unchanged. Warned once per layer.",
            RuntimeWarning,
            stacklevel=5,
        )


@dataclass
class RunningStats:
    """The running buffers a training forward updates in place (None: not tracked)."""

    mean: Tensor | None
    var: Tensor | None
    num_batches_tracked: Tensor | None
    momentum: float | None
    nonfinite: NonFiniteWarning

    @property
    def tracked(self) -> bool:
        return self.mean is not None


_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_NATIVE_PARAM_DTYPES = (torch.float32, torch.float64)


def _channels_last(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def _native_kernels(x: Tensor, *params: Tensor | None):
    """The compiled CPU kernels when they cover this call, else None (pure torch).

    Covered: a non-empty CPU input of a floating dtype, contiguous or (4-D/5-D) channels-last,
    with float32/float64 parameters. Empty local batches take the pure-torch path, which
    makes the same collectives. (Called on every forward: cheap checks only.)
    """
    if not x.is_cpu or x.dtype not in _NATIVE_DTYPES or x.numel() == 0:
        return None
    if not x.is_contiguous() and not (
        x.dim() in (4, 5) and x.is_contiguous(memory_format=_channels_last(x.dim()))
    ):
        return None
    for p in params:
        if p is not None and not (p.is_cpu and p.dtype in _NATIVE_PARAM_DTYPES):
            return None
    return _native.kernels()


def _native_running_update(stats: RunningStats, mean: Tensor) -> bool:
    """Whether the compiled kernels can fold float64 CPU statistics into these buffers."""
    return (
        mean.is_cpu
        and mean.dtype == torch.float64
        and stats.mean.dtype in _NATIVE_PARAM_DTYPES
        and stats.mean.dtype == stats.var.dtype
        and stats.mean.is_contiguous()
        and stats.var.is_contiguous()
        and (stats.num_batches_tracked is None or stats.num_batches_tracked.dtype == torch.long)
    )


def _shared_kernels(x: Tensor):
    """The kernels for the steps whose results must be bitwise the same on every rank:
    merging the gathered partials and updating the running statistics. Chosen by
    availability alone, never by this rank's input, so that a rank whose input takes the
    pure-torch path (an empty local batch, say) still computes what the others compute."""
    return _native.kernels() if x.is_cpu else None


def _merge_samples(parts: Tensor, kernels) -> tuple[Tensor, Tensor, Tensor]:
    if kernels is not None and parts.is_cpu:
        return kernels.merge_samples(parts)
    return F.merge_sample_partials(parts)


def _merge_elements(parts: Tensor, kernels) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """count, mean, m2 and the unbiased variance m2 / (count - 1) of the global batch."""
    if kernels is not None and parts.is_cpu:
        return kernels.merge_elements(parts)
    count, mean, m2 = F.merge_element_partials(parts)
    return count, mean, m2, m2 / (count - 1).clamp(min=1)


def _in_layout_of(dy: Tensor, x: Tensor) -> Tensor:
    """dy in x's dtype and memory layout, as the native passes read both alike (the copy is
    rare: autograd usually hands back the layout of the output, which is x's)."""
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    if x.is_contiguous():
        return dy.contiguous()
    return dy.contiguous(memory_format=_channels_last(x.dim()))


def _check_batch_count(count: Tensor, local_count: int, sync: SyncSpec, what: str) -> None:
    # Reading ``count`` synchronizes a GPU, so look only when this rank alone cannot prove
    # that the global count is at least 2.
    if local_count < 2 and int(count.item()) == 1:
        raise ValueError(
            f"{sync.layer}: expected more than 1 {what} per channel when training, got a global "
            f"batch of 1 {what}; the batch statistics are undefined. Use a larger batch, "
            "synchronize over more ranks, or call .eval() to use the running statistics."
        )


def _update_running(
    stats: RunningStats, count: Tensor, mean: Tensor, var: Tensor, kernels=None
) -> None:
    """Fold the batch statistics in, unless the batch is empty or not finite (same on all ranks).

    ``kernels``: the compiled kernels to make the update with (see :func:`_shared_kernels`);
    the buffers' dtype and layout still decide whether they can.
    """
    if not stats.tracked or torch._C._current_graph_task_id() != -1:
        # Inside a backward pass: this is torch.utils.checkpoint recomputing the forward,
        # whose statistics were already counted the first time.
        return
    if kernels is not None and _native_running_update(stats, mean):
        finite = kernels.update_running_(
            stats.mean, stats.var, stats.num_batches_tracked, stats.momentum, count, mean, var
        )
        stats.nonfinite.observe_host(finite)
        return
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    valid = (count > 0) & finite
    F.update_running_stats_(
        stats.mean, stats.var, stats.num_batches_tracked, stats.momentum, mean, var, valid
    )
    stats.nonfinite.observe(finite)


def _reduce_over_spatial(x: Tensor, centre: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """The backward reduction pass: per-(n, c) S1 = sum dy and S2c = sum dy * (x - centre).

    Args:
        x, dy: (N, C, *S); centre: (N, C) in ``stats_dtype(x.dtype)``.
    Returns:
        S1, S2c: (N, C) float64.

    Uses F.batch_norm_reduce_sums (torch's fused batch-norm backward reduction) where the
    layout allows: it reads x and dy once and allocates nothing of their size, which on CPU
    matters more than the arithmetic (a fresh temporary of an activation's size costs about
    as much as a pass over it).
    """
    if x.dim() == 2:  # (N, C): nothing to reduce (and sum(dim=()) would sum everything)
        return dy.double(), ((x - centre) * dy).double()
    sums = F.batch_norm_reduce_sums(x, centre, dy)
    if sums is not None:
        return sums
    centred = _centred(x, centre)
    dims = tuple(range(2, x.dim()))
    s1 = dy.sum(dim=dims, dtype=centred.dtype)
    s2c = (centred * dy).sum(dim=dims)
    return s1.double(), s2c.double()


def _simplex64(w: Tensor) -> Tensor:
    """Mixing weights in float64, renormalised: float32 softmax weights sum to 1 only within
    ~1e-7, which shifts a mean of 1e4 by 1e-3 (more than a std-1 input tolerates)."""
    w = w.double()
    return w / w.sum()


def _batch_scope(
    training: bool,
    stats: RunningStats | None,
    sync: SyncSpec,
    local_count: int,
    gather_and_merge: Callable[[], tuple[Tensor, Tensor, Tensor]],
    kernels=None,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The BN scope: (count, mean (C,), var (C,)) of the global batch in training, folded
    into the running statistics; the running statistics themselves in eval."""
    if not training:
        return None, stats.mean.double(), stats.var.double()
    count, mean, var = gather_and_merge()
    _check_batch_count(count, local_count, sync, "sample")
    if stats is not None:
        _update_running(stats, count, mean, var, kernels)
    return count, mean, var


def _mix_and_scale(
    w: Tensor, v: Tensor, means: list[Tensor], vars_: list[Tensor], eps: float, weight
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mixed mean and variance (N, C), r = (var + eps)^-1/2 and the scale r * weight."""
    mu = F.mix(_simplex64(w), means)
    var = F.mix(_simplex64(v), vars_)
    r = torch.rsqrt(var + eps)
    scale = r if weight is None else r * weight.double()
    return mu, var, r, scale


def _centred(x: Tensor, centre: Tensor) -> Tensor:
    return x - F.per_sample_channel_view(centre, x.dim())


class SwitchNormFunction(torch.autograd.Function):
    """Switchable Normalization for (N, C, *S) input, scopes (IN, LN[, BN]).

    Inputs: x (N, C, *S); w, v the mixing weights (K,) for means and variances (K = 3, or 2
    without the BN scope); weight, bias (C,) or None; then non-tensor settings. The (N, C)
    statistics are float64 (see :func:`syncsn.functional.instance_stats`).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        w: Tensor,
        v: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        training: bool,
        stats: RunningStats | None,
        sync: SyncSpec,
        grad_anchor: Tensor | None,
    ) -> Tensor:
        ctx.kernels = _native_kernels(x, w, v, weight, bias)
        ctx.batch_synced = w.numel() == 3 and training
        ctx.sync = sync
        ctx.count = None
        step = _sn_forward_torch if ctx.kernels is None else _sn_forward_native
        return step(ctx, x, w, v, weight, bias, eps, training, stats, sync)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        step = _sn_backward_torch if ctx.kernels is None else _sn_backward_native
        return (*step(ctx, dy), None, None, None, None, None)


def _sn_forward_torch(ctx, x, w, v, weight, bias, eps, training, stats, sync) -> Tensor:
    n = x.shape[0]
    length = F.spatial_size(x)
    use_bn = w.numel() == 3
    centred, centre, mean_in, m2_in = F.instance_stats(x)
    var_in = m2_in / (length - 1)
    mu_ln, var_ln = F.layer_stats(mean_in, var_in)
    means, vars_ = [mean_in, mu_ln[:, None]], [var_in, var_ln[:, None]]

    bn = []
    if use_bn:
        shared = _shared_kernels(x)
        ctx.count, *bn = _batch_scope(
            training,
            stats,
            sync,
            n,
            lambda: _merge_samples(sync.gather(F.sample_partials(mean_in, var_in)), shared),
            shared,
        )
        means.append(bn[0][None, :])
        vars_.append(bn[1][None, :])
    mu, var, r, scale = _mix_and_scale(w, v, means, vars_, eps, weight)
    y = F.normalize_(centred, centre, mu, scale, bias, x.dtype)

    ctx.save_for_backward(x, w, v, weight, centre, mean_in, var_in, mu, var, r, mu_ln, var_ln, *bn)
    return y


def _sn_forward_native(ctx, x, w, v, weight, bias, eps, training, stats, sync) -> Tensor:
    """The steps of :func:`_sn_forward_torch` as three fused calls around the collective."""
    kernels = ctx.kernels
    centre, mean_in, var_in, mu_ln, var_ln, partials = kernels.sn_stats(x, ctx.batch_synced)
    bn = []
    if w.numel() == 3:
        ctx.count, *bn = _batch_scope(
            training,
            stats,
            sync,
            x.shape[0],
            lambda: _merge_samples(sync.gather(partials), kernels),
            kernels,
        )
    bn_mean, bn_var = bn or (None, None)
    y, mu, var, r = kernels.sn_output(
        x, centre, mean_in, var_in, mu_ln, var_ln, bn_mean, bn_var, w, v, weight, bias, eps
    )
    ctx.save_for_backward(x, w, v, weight, centre, mean_in, var_in, mu, var, r, mu_ln, var_ln, *bn)
    return y


def _sn_backward_torch(ctx, dy: Tensor) -> tuple:
    x, w, v, weight, centre, a, var_in, mu, var, r, mu_ln, var_ln, *bn = ctx.saved_tensors
    c = x.shape[1]
    length = F.spatial_size(x)
    gamma = r.new_ones(()) if weight is None else weight.double()
    w64, v64 = _simplex64(w), _simplex64(v)

    s1, s2c = _reduce_over_spatial(x, centre, dy)
    s2_about_mu = s2c + (centre.double() - mu) * s1  # sum dy * (x - mu), no cancellation
    g_mu = -r * gamma * s1
    g_var = -0.5 * r.pow(3) * gamma * s2_about_mu

    # IN scope.
    g_a = w64[0] * g_mu
    g_b = v64[0] * g_var
    # LN scope: per sample, over channels.
    m_n = w64[1] * g_mu.sum(dim=1, keepdim=True)
    v_n = v64[1] * g_var.sum(dim=1, keepdim=True)
    g_a = g_a + m_n / c + v_n * 2 * (a - mu_ln[:, None]) / c
    g_b = g_b + v_n / c
    # BN scope: per channel, over the samples of every rank: the backward collective.
    if ctx.batch_synced:
        mu_bn = bn[0]
        totals = torch.cat([w64[2] * g_mu.sum(dim=0), v64[2] * g_var.sum(dim=0)])
        ctx.sync.all_reduce_(totals)
        m_c, v_c = totals[:c], totals[c:]
        count = ctx.count.clamp(min=1)
        g_a = g_a + m_c / count + v_c * 2 * (a - mu_bn) / count
        g_b = g_b + v_c / count

    dx = None
    if ctx.needs_input_grad[0]:
        # d var_in / dx = 2 (x - a) / (L - 1) with x - a = (x - centre) + (centre - a).
        k_x = 2 * g_b / (length - 1)
        k_0 = g_a / length + k_x * (centre.double() - a)
        dx = F.combine_grad_(_centred(x, centre), dy, gamma * r, k_x, k_0, x.dtype)

    scope_means = [a, mu_ln[:, None]] + ([bn[0][None, :]] if bn else [])
    scope_vars = [var_in, var_ln[:, None]] + ([bn[1][None, :]] if bn else [])
    dw = torch.stack([(g_mu * (s - mu)).sum() for s in scope_means]).to(w.dtype)
    dv = torch.stack([(g_var * (s - var)).sum() for s in scope_vars]).to(v.dtype)
    dweight = dbias = None
    if weight is not None:
        dweight = (r * s2_about_mu).sum(dim=0).to(weight.dtype)
        dbias = s1.sum(dim=0).to(weight.dtype)
    return dx, dw, dv, dweight, dbias


def _sn_backward_native(ctx, dy: Tensor) -> tuple:
    """The steps of :func:`_sn_backward_torch` as two fused calls around the collective."""
    x, w, v, weight, centre, a, var_in, mu, var, r, mu_ln, var_ln, *bn = ctx.saved_tensors
    dy = _in_layout_of(dy, x)
    bn_mean, bn_var = bn or (None, None)
    totals, g_a, g_b, dw, dv, dweight, dbias = ctx.kernels.sn_backward_reduce(
        x, dy, centre, a, var_in, mu, var, r, mu_ln, var_ln, bn_mean, bn_var, w, v, weight,
        ctx.batch_synced,
    )  # fmt: skip
    if ctx.batch_synced:
        ctx.sync.all_reduce_(totals)
    dx = None
    if ctx.needs_input_grad[0]:
        dx = ctx.kernels.sn_backward_input(
            x, dy, centre, a, g_a, g_b, r, weight, totals, ctx.count, bn_mean
        )
    return dx, dw, dv, dweight, dbias


class SwitchNorm1dFunction(torch.autograd.Function):
    """Switchable Normalization for (N, C) input: scopes (LN[, BN]), both unbiased variances.

    LN: over the C features of a sample (divides by C - 1); BN: over the N samples of all
    ranks (divides by N_tot - 1). The input is small, so everything is computed in float64.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        w: Tensor,
        v: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        training: bool,
        stats: RunningStats | None,
        sync: SyncSpec,
        grad_anchor: Tensor | None,
    ) -> Tensor:
        n = x.shape[0]
        c = x.shape[1]
        use_bn = w.numel() == 2
        xs = x.double()
        mu_ln = xs.mean(dim=1)
        var_ln = (xs - mu_ln[:, None]).square().sum(dim=1) / (c - 1)
        means, vars_ = [mu_ln[:, None]], [var_ln[:, None]]

        count, batch_synced, bn = None, use_bn and training, []
        if use_bn:

            def unbiased_batch_stats():
                parts = sync.gather(F.element_partials(xs, torch.zeros_like(xs), 1))
                count, mean, m2 = F.merge_element_partials(parts)
                return count, mean, m2 / (count - 1).clamp(min=1)

            count, *bn = _batch_scope(training, stats, sync, n, unbiased_batch_stats)
            means.append(bn[0][None, :])
            vars_.append(bn[1][None, :])
        mu, var, r, scale = _mix_and_scale(w, v, means, vars_, eps, weight)
        y = (xs - mu) * scale
        if bias is not None:
            y = y + bias.double()
        y = y.to(x.dtype)

        ctx.save_for_backward(x, w, v, weight, mu, var, r, mu_ln, var_ln, *bn)
        ctx.batch_synced = batch_synced
        ctx.count = count
        ctx.sync = sync
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, w, v, weight, mu, var, r, mu_ln, var_ln, *bn = ctx.saved_tensors
        c = x.shape[1]
        gamma = r.new_ones(()) if weight is None else weight.double()
        w64, v64 = _simplex64(w), _simplex64(v)
        xs, dys = x.double(), dy.double()
        centred = xs - mu
        g_mu = -r * gamma * dys
        g_var = -0.5 * r.pow(3) * gamma * dys * centred

        # LN scope: per sample, over features.
        m_n = w64[0] * g_mu.sum(dim=1, keepdim=True)
        v_n = v64[0] * g_var.sum(dim=1, keepdim=True)
        dx = gamma * r * dys + m_n / c + v_n * 2 * (xs - mu_ln[:, None]) / (c - 1)
        # BN scope: per feature, over the samples of every rank: the backward collective.
        if ctx.batch_synced:
            mu_bn = bn[0]
            totals = torch.cat([w64[1] * g_mu.sum(dim=0), v64[1] * g_var.sum(dim=0)])
            ctx.sync.all_reduce_(totals)
            count = ctx.count
            dx = dx + totals[:c] / count.clamp(min=1)
            dx = dx + totals[c:] * 2 * (xs - mu_bn) / (count - 1).clamp(min=1)

        scope_means = [mu_ln[:, None]] + ([bn[0][None, :]] if bn else [])
        scope_vars = [var_ln[:, None]] + ([bn[1][None, :]] if bn else [])
        dw = torch.stack([(g_mu * (s - mu)).sum() for s in scope_means]).to(w.dtype)
        dv = torch.stack([(g_var * (s - var)).sum() for s in scope_vars]).to(v.dtype)
        dweight = dbias = None
        if weight is not None:
            dweight = (dys * centred * r).sum(dim=0).to(weight.dtype)
            dbias = dys.sum(dim=0).to(weight.dtype)
        dx = dx.to(x.dtype) if ctx.needs_input_grad[0] else None
        return dx, dw, dv, dweight, dbias, None, None, None, None, None


class BatchNormFunction(torch.autograd.Function):
    """Batch Normalization over (N, C, *S) with batch statistics of all ranks (pixel-weighted).

    The normalization uses the biased variance; the running variance gets the unbiased one
    from the global count, as torch.nn.BatchNorm does.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        stats: RunningStats | None,
        sync: SyncSpec,
        grad_anchor: Tensor | None,
    ) -> Tensor:
        ctx.kernels = _native_kernels(x, weight, bias)
        ctx.sync = sync
        step = _bn_forward_torch if ctx.kernels is None else _bn_forward_native
        return step(ctx, x, weight, bias, eps, stats, sync)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        step = _bn_backward_torch if ctx.kernels is None else _bn_backward_native
        return (*step(ctx, dy), None, None, None, None)


def _bn_forward_torch(ctx, x, weight, bias, eps, stats, sync) -> Tensor:
    n, c = x.shape[:2]
    length = F.spatial_size(x)
    centred, centre_in, mean_in, m2_in = F.instance_stats(x)
    parts = sync.gather(F.element_partials(mean_in, m2_in, length))
    shared = _shared_kernels(x)
    count, mean, m2, unbiased_var = _merge_elements(parts, shared)
    _check_batch_count(count, n * length, sync, "value")
    if stats is not None:
        _update_running(stats, count, mean, unbiased_var, shared)
    invstd = torch.rsqrt(m2 / count.clamp(min=1) + eps)
    scale = invstd if weight is None else invstd * weight.double()
    y = F.normalize_(centred, centre_in, mean.expand(n, c), scale.expand(n, c), bias, x.dtype)

    # The backward pass centres on the float32 global mean; its rounding is accounted for.
    centre = mean.to(F.stats_dtype(x.dtype))
    ctx.save_for_backward(x, weight, centre, mean, invstd)
    ctx.count = count
    return y


def _bn_forward_native(ctx, x, weight, bias, eps, stats, sync) -> Tensor:
    """The steps of :func:`_bn_forward_torch` as three fused calls around the collective."""
    kernels = ctx.kernels
    centre_in, partials = kernels.bn_stats(x)
    count, mean, m2, unbiased_var = _merge_elements(sync.gather(partials), kernels)
    _check_batch_count(count, x.shape[0] * F.spatial_size(x), sync, "value")
    if stats is not None:
        _update_running(stats, count, mean, unbiased_var, kernels)
    y, invstd, centre = kernels.bn_output(x, centre_in, count, mean, m2, weight, bias, eps)
    ctx.save_for_backward(x, weight, centre, mean, invstd)
    ctx.count = count
    return y


def _bn_backward_torch(ctx, dy: Tensor) -> tuple:
    x, weight, centre, mean, invstd = ctx.saved_tensors
    n, c = x.shape[:2]
    gamma = invstd.new_ones(()) if weight is None else weight.double()

    s1, s2c = _reduce_over_spatial(x, centre.expand(n, c), dy)
    sum_dy = s1.sum(dim=0)
    sum_dy_xmu = s2c.sum(dim=0) + (centre.double() - mean) * sum_dy
    local = torch.cat([sum_dy, sum_dy_xmu])
    dweight = dbias = None
    if weight is not None:
        dweight = (sum_dy_xmu * invstd).to(weight.dtype)
        dbias = sum_dy.to(weight.dtype)
    totals = ctx.sync.all_reduce_(local.clone())
    count = ctx.count.clamp(min=1)
    sum_dy, sum_dy_xmu = totals[:c], totals[c:]

    dx = None
    if ctx.needs_input_grad[0]:
        k_x = -gamma * invstd.pow(3) * sum_dy_xmu / count
        k_0 = -gamma * invstd * sum_dy / count + k_x * (centre.double() - mean)
        dx = F.combine_grad_(
            _centred(x, centre.expand(n, c)),
            dy,
            (gamma * invstd).expand(n, c),
            k_x.expand(n, c),
            k_0.expand(n, c),
            x.dtype,
        )
    return dx, dweight, dbias


def _bn_backward_native(ctx, dy: Tensor) -> tuple:
    """The steps of :func:`_bn_backward_torch` as two fused calls around the collective."""
    x, weight, centre, mean, invstd = ctx.saved_tensors
    dy = _in_layout_of(dy, x)
    # ``local`` is a fresh tensor and dweight, dbias do not alias it: reduce it in place.
    local, dweight, dbias = ctx.kernels.bn_backward_reduce(x, dy, centre, mean, invstd, weight)
    totals = ctx.sync.all_reduce_(local)
    dx = None
    if ctx.needs_input_grad[0]:
        dx = ctx.kernels.bn_backward_input(x, dy, centre, mean, invstd, weight, totals, ctx.count)
    return dx, dweight, dbias
