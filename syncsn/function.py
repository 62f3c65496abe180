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
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm
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


def _check_batch_count(count: Tensor, local_count: int, sync: SyncSpec, what: str) -> None:
    # Reading ``count`` synchronizes a GPU, so look only when this rank alone cannot prove
    # that the global count is at least 2.
    if local_count < 2 and int(count.item()) == 1:
        raise ValueError(
            f"{sync.layer}: expected more than 1 {what} per channel when training, got a global "
            f"batch of 1 {what}; the batch statistics are undefined. Use a larger batch, "
            "synchronize over more ranks, or call .eval() to use the running statistics."
        )


def _update_running(stats: RunningStats, count: Tensor, mean: Tensor, var: Tensor) -> None:
    """Fold the batch statistics in, unless the batch is empty or not finite (same on all ranks)."""
    if not stats.tracked or torch._C._current_graph_task_id() != -1:
        # Inside a backward pass: this is torch.utils.checkpoint recomputing the forward,
        # whose statistics were already counted the first time.
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
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The BN scope: (count, mean (C,), var (C,)) of the global batch in training, folded
    into the running statistics; the running statistics themselves in eval."""
    if not training:
        return None, stats.mean.double(), stats.var.double()
    count, mean, var = gather_and_merge()
    _check_batch_count(count, local_count, sync, "sample")
    if stats is not None:
        _update_running(stats, count, mean, var)
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
        n = x.shape[0]
        length = F.spatial_size(x)
        use_bn = w.numel() == 3
        centred, centre, mean_in, m2_in = F.instance_stats(x)
        var_in = m2_in / (length - 1)
        mu_ln, var_ln = F.layer_stats(mean_in, var_in)
        means, vars_ = [mean_in, mu_ln[:, None]], [var_in, var_ln[:, None]]

        count, batch_synced, bn = None, use_bn and training, []
        if use_bn:
            count, *bn = _batch_scope(
                training,
                stats,
                sync,
                n,
                lambda: F.merge_sample_partials(sync.gather(F.sample_partials(mean_in, var_in))),
            )
            means.append(bn[0][None, :])
            vars_.append(bn[1][None, :])
        mu, var, r, scale = _mix_and_scale(w, v, means, vars_, eps, weight)
        y = F.normalize_(centred, centre, mu, scale, bias, x.dtype)

        ctx.save_for_backward(
            x, w, v, weight, centre, mean_in, var_in, mu, var, r, mu_ln, var_ln, *bn
        )
        ctx.batch_synced = batch_synced
        ctx.count = count
        ctx.sync = sync
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
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
        return dx, dw, dv, dweight, dbias, None, None, None, None, None


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
        n, c = x.shape[:2]
        length = F.spatial_size(x)
        centred, centre_in, mean_in, m2_in = F.instance_stats(x)
        parts = sync.gather(F.element_partials(mean_in, m2_in, length))
        count, mean, m2 = F.merge_element_partials(parts)
        _check_batch_count(count, n * length, sync, "value")
        if stats is not None:
            _update_running(stats, count, mean, m2 / (count - 1).clamp(min=1))
        invstd = torch.rsqrt(m2 / count.clamp(min=1) + eps)
        scale = invstd if weight is None else invstd * weight.double()
        y = F.normalize_(centred, centre_in, mean.expand(n, c), scale.expand(n, c), bias, x.dtype)

        # The backward pass centres on the float32 global mean; its rounding is accounted for.
        centre = mean.to(F.stats_dtype(x.dtype))
        ctx.save_for_backward(x, weight, centre, mean, invstd)
        ctx.count = count
        ctx.sync = sync
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
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
        return dx, dweight, dbias, None, None, None, None
