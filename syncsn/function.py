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
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm
from . import functional as F

__all__ = [
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
    distributed: bool = True  # False for the local layers, which never communicate

    @property
    def active(self) -> bool:
        return self.distributed and comm.group_size(self.group) > 1

    def gather(self, local: Tensor) -> Tensor:
        """The forward collective: every rank's fixed-size partials (K,) as (world, K)."""
        if not self.active:
            return local.unsqueeze(0)
        if comm.debug_enabled():
            comm.check_same_layer(f"{self.layer} K={local.numel()}", self.group, local.device)
        return comm.all_gather_stacked(local, self.group)

    def all_reduce_(self, totals: Tensor) -> Tensor:
        """The backward collective: sum ``totals`` (2C,) over the ranks, in place."""
        if self.active:
            comm.all_reduce_sum_(totals, self.group)
        return totals


@dataclass
class RunningStats:
    """The running buffers a training forward updates in place (None: not tracked)."""

    mean: Tensor | None
    var: Tensor | None
    num_batches_tracked: Tensor | None
    momentum: float | None
    warned: list  # one-element flag list shared with the module, so the warning is issued once

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


def _update_running(
    stats: RunningStats, count: Tensor, mean: Tensor, var: Tensor, layer: str
) -> None:
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
    if not stats.warned[0] and mean.device.type == "cpu" and not bool(finite):
        stats.warned[0] = True
        warnings.warn(
            f"{layer}: non-finite batch statistics (an overflowed mixed-precision step?); "
            "the running statistics were left unchanged. Warned once per layer.",
            RuntimeWarning,
            stacklevel=4,
        )


def _reduce_over_spatial(centred: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) S1 = sum dy and S2c = sum dy * (x - centre), in the centred dtype."""
    dims = tuple(range(2, dy.dim()))
    if not dims:  # (N, C) input: nothing to reduce (and sum(dim=()) would sum everything)
        return dy.to(centred.dtype), centred * dy
    s1 = dy.sum(dim=dims, dtype=centred.dtype)
    s2c = (centred * dy).sum(dim=dims)
    return s1, s2c


class SwitchNormFunction(torch.autograd.Function):
    """Switchable Normalization for (N, C, *S) input, scopes (IN, LN[, BN]).

    Inputs: x (N, C, *S); w, v the mixing weights (K,) for means and variances (K = 3, or 2
    without the BN scope); weight, bias (C,) or None; then non-tensor settings.
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
        n, c = x.shape[:2]
        length = F.spatial_size(x)
        use_bn = w.numel() == 3
        mean_in, m2_in = F.instance_stats(x)
        var_in = m2_in / (length - 1)
        mu_ln, var_ln = F.layer_stats(mean_in, var_in)
        means, vars_ = [mean_in, mu_ln[:, None]], [var_in, var_ln[:, None]]

        count = None
        batch_synced = use_bn and training
        if batch_synced:
            parts = sync.gather(F.sample_partials(mean_in, var_in))
            count, mu_bn, var_bn = F.merge_sample_partials(parts)
            _check_batch_count(count, n, sync, "sample")
            if stats is not None:
                _update_running(stats, count, mu_bn, var_bn, sync.layer)
            mu_bn, var_bn = mu_bn.to(mean_in.dtype), var_bn.to(mean_in.dtype)
        elif use_bn:
            mu_bn, var_bn = stats.mean.to(mean_in.dtype), stats.var.to(mean_in.dtype)
        if use_bn:
            means.append(mu_bn[None, :])
            vars_.append(var_bn[None, :])

        mu = F.mix(w, means)
        var = F.mix(v, vars_)
        r = torch.rsqrt(var + eps)
        scale = r if weight is None else r * weight
        y = F.normalize(x, mu, scale, bias)

        ctx.save_for_backward(
            x,
            w,
            v,
            weight,
            mean_in,
            var_in,
            mu,
            var,
            r,
            mu_ln,
            var_ln,
            *([mu_bn, var_bn] if use_bn else []),
        )
        ctx.batch_synced = batch_synced
        ctx.count = count
        ctx.sync = sync
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w, v, weight, a, var_in, mu, var, r, mu_ln, var_ln, *bn = ctx.saved_tensors
        n, c = x.shape[:2]
        length = F.spatial_size(x)
        gamma = r.new_ones(()) if weight is None else weight.to(r.dtype)

        centred = x - F.per_sample_channel_view(a, x.dim())
        s1, s2c = _reduce_over_spatial(centred, dy)
        s2_about_mu = s2c + (a - mu) * s1  # sum dy * (x - mu), without cancellation
        g_mu = -r * gamma * s1
        g_var = -0.5 * r.pow(3) * gamma * s2_about_mu

        # IN scope.
        g_a = w[0] * g_mu
        g_b = v[0] * g_var
        # LN scope: per sample, over channels.
        m_n = w[1] * g_mu.sum(dim=1, keepdim=True)
        v_n = v[1] * g_var.sum(dim=1, keepdim=True)
        g_a = g_a + m_n / c + v_n * 2 * (a - mu_ln[:, None]) / c
        g_b = g_b + v_n / c
        # BN scope: per channel, over the samples of every rank: the backward collective.
        if ctx.batch_synced:
            mu_bn = bn[0]
            totals = torch.cat([w[2] * g_mu.sum(dim=0), v[2] * g_var.sum(dim=0)])
            ctx.sync.all_reduce_(totals)
            m_c, v_c = totals[:c], totals[c:]
            count = ctx.count.clamp(min=1).to(r.dtype)
            g_a = g_a + m_c / count + v_c * 2 * (a - mu_bn) / count
            g_b = g_b + v_c / count

        dx = None
        if ctx.needs_input_grad[0]:
            k_x = 2 * g_b / (length - 1)
            dx = F.combine_grad_(centred, dy, gamma * r, k_x, g_a / length, x.dtype)

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
    ranks (divides by N_tot - 1).
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
        n, c = x.shape
        use_bn = w.numel() == 2
        xs = x.to(F.stats_dtype(x.dtype))
        mu_ln = xs.mean(dim=1)
        var_ln = (xs - mu_ln[:, None]).square().sum(dim=1) / (c - 1)
        means, vars_ = [mu_ln[:, None]], [var_ln[:, None]]

        count = None
        batch_synced = use_bn and training
        if batch_synced:
            zeros = torch.zeros_like(xs)
            parts = sync.gather(F.element_partials(xs, zeros, 1))
            count, mu_bn, m2 = F.merge_element_partials(parts)
            _check_batch_count(count, n, sync, "sample")
            var_bn = m2 / (count - 1).clamp(min=1)
            if stats is not None:
                _update_running(stats, count, mu_bn, var_bn, sync.layer)
            mu_bn, var_bn = mu_bn.to(xs.dtype), var_bn.to(xs.dtype)
        elif use_bn:
            mu_bn, var_bn = stats.mean.to(xs.dtype), stats.var.to(xs.dtype)
        if use_bn:
            means.append(mu_bn[None, :])
            vars_.append(var_bn[None, :])

        mu = F.mix(w, means)
        var = F.mix(v, vars_)
        r = torch.rsqrt(var + eps)
        scale = r if weight is None else r * weight
        y = F.normalize(x, mu, scale, bias)

        ctx.save_for_backward(
            x, w, v, weight, mu, var, r, mu_ln, var_ln, *([mu_bn, var_bn] if use_bn else [])
        )
        ctx.batch_synced = batch_synced
        ctx.count = count
        ctx.sync = sync
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w, v, weight, mu, var, r, mu_ln, var_ln, *bn = ctx.saved_tensors
        n, c = x.shape
        gamma = r.new_ones(()) if weight is None else weight.to(r.dtype)
        dys = dy.to(r.dtype)
        centred = x.to(r.dtype) - mu
        g_mu = -r * gamma * dys
        g_var = -0.5 * r.pow(3) * gamma * dys * centred

        k_dy = gamma * r
        # LN scope: per sample, over features.
        m_n = w[0] * g_mu.sum(dim=1, keepdim=True)
        v_n = v[0] * g_var.sum(dim=1, keepdim=True)
        dx = k_dy * dys + m_n / c + v_n * 2 * (x - mu_ln[:, None]) / (c - 1)
        if ctx.batch_synced:
            mu_bn = bn[0]
            totals = torch.cat([w[1] * g_mu.sum(dim=0), v[1] * g_var.sum(dim=0)])
            ctx.sync.all_reduce_(totals)
            count = ctx.count.to(r.dtype)
            dx = (
                dx
                + totals[:c] / count.clamp(min=1)
                + totals[c:] * 2 * (x - mu_bn) / (count - 1).clamp(min=1)
            )

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
        mean_in, m2_in = F.instance_stats(x)
        parts = sync.gather(F.element_partials(mean_in, m2_in, length))
        count, mean64, m2 = F.merge_element_partials(parts)
        _check_batch_count(count, n * length, sync, "value")
        if stats is not None:
            _update_running(stats, count, mean64, m2 / (count - 1).clamp(min=1), sync.layer)
        mean = mean64.to(mean_in.dtype)
        invstd = torch.rsqrt((m2 / count.clamp(min=1)).to(mean_in.dtype) + eps)
        scale = invstd if weight is None else invstd * weight
        y = F.normalize(x, mean.expand(n, c), scale.expand(n, c), bias)

        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count = count
        ctx.sync = sync
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        n, c = x.shape[:2]
        gamma = invstd.new_ones(()) if weight is None else weight.to(invstd.dtype)

        centred = x - mean.view((1, c) + (1,) * (x.dim() - 2))
        s1, s2c = _reduce_over_spatial(centred, dy)
        local = torch.cat([s1.sum(dim=0), s2c.sum(dim=0)])
        dweight = dbias = None
        if weight is not None:
            dweight = (local[c:] * invstd).to(weight.dtype)
            dbias = local[:c].to(weight.dtype)
        totals = ctx.sync.all_reduce_(local.clone())
        count = ctx.count.clamp(min=1).to(invstd.dtype)
        sum_dy, sum_dy_xmu = totals[:c], totals[c:]

        dx = None
        if ctx.needs_input_grad[0]:
            k_dy = (gamma * invstd).expand(n, c)
            k_x = (-gamma * invstd.pow(3) * sum_dy_xmu / count).expand(n, c)
            k_0 = (-gamma * invstd * sum_dy / count).expand(n, c)
            dx = F.combine_grad_(centred, dy, k_dy, k_x, k_0, x.dtype)
        return dx, dweight, dbias, None, None, None, None
