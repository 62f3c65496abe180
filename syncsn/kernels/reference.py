"""The reference backend: every step in plain torch operations.

It runs on any device and dtype and is the definition the other backends are tested against
(tests/test_conformance.py). It favours clarity over speed: each step is a short sequence of
the pure functions of :mod:`syncsn.functional`. The SN equations are those of SPEC §4, with
``ddof`` generalising the LN and BN divisors for SwitchNorm1d.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from .interface import (
    Backend,
    BatchMoments,
    BNSaved,
    Flags,
    SNGrads,
    SNMixed,
    SNStats,
    SparseSwitch,
)

__all__ = [
    "ReferenceBackend",
    "sparse_switches",
    "sparse_switch_weights",
    "through_sparse_switch",
]


def _gamma(weight: Tensor | None, like: Tensor) -> Tensor:
    return like.new_ones(()) if weight is None else weight.double()


def _view(t: Tensor, x: Tensor) -> Tensor:
    """(N, C) coefficients as a view broadcastable against x, in x's arithmetic dtype."""
    return F.per_sample_channel_view(t.to(F.acc_dtype(x.dtype)), x.dim())


def _affine(x: Tensor, centre: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """(x - centre) * scale + shift with (N, C) coefficients, in x's dtype and layout.

    Scaling x - centre (small numbers) rather than x keeps the output exact when the mean is
    far larger than the spread; the float64 difference centre - mean goes into ``shift``.
    """
    acc = F.acc_dtype(x.dtype)
    out = (x.to(acc) - _view(centre, x)) * _view(scale, x) + _view(shift, x)
    return out.to(x.dtype)


def _combine(
    x: Tensor, dy: Tensor, centre: Tensor, k_dy: Tensor, k_x: Tensor, k_0: Tensor
) -> Tensor:
    """dx = k_dy * dy + k_x * (x - centre) + k_0 with (N, C) coefficients: every layer's input
    gradient has this form."""
    acc = F.acc_dtype(x.dtype)
    centred = x.to(acc) - _view(centre, x)
    # x's term first: the result takes the layout of the first operand, and dx must have
    # x's (dy may come in another).
    dx = centred * _view(k_x, x) + dy.to(acc) * _view(k_dy, x) + _view(k_0, x)
    return dx.to(x.dtype)


# Whether sparsestmax stops its rounds once every vector has its result, for CPU tensors
# with nothing watching: it reads a device value on the host, free on CPU (the same bits
# either way).
STOP_EARLY_ON_CPU = True


def sparse_switches(w: Tensor, v: Tensor, radius: Tensor, frozen_w: Tensor, frozen_v: Tensor):
    """:func:`syncsn.functional.sparse_switches`, stopping early on CPU where that is free."""
    from .ops import plain_eager  # (ops imports the backends)

    stop_early = STOP_EARLY_ON_CPU and w.is_cpu and plain_eager()
    return F.sparse_switches(w, v, radius, frozen_w, frozen_v, stop_early)


def sparse_switch_weights(
    w: Tensor, v: Tensor, sparse: SparseSwitch
) -> tuple[Tensor, Tensor, Tensor]:
    """An SSN switch in torch operations: the (K,) weights of the logits ``w``, ``v`` and the
    (2,) selection after them, written into the frozen buffers with ``sparse.freeze``."""
    weights, _, selection = sparse_switches(w, v, *sparse[:3])
    if sparse.freeze:
        sparse.frozen_w.copy_(selection[0])
        sparse.frozen_v.copy_(selection[1])
    return weights[0], weights[1], selection


def through_sparse_switch(
    reduce, w: Tensor, v: Tensor, radius: Tensor, selection: Tensor | None
) -> SNGrads:
    """``reduce(w_weights, v_weights)`` (a backward reduction on the weights an SSN switch
    gave in the forward, frozen as ``selection`` says), with its switch gradients taken back
    to the logits ``w``, ``v`` through sparsestmax."""
    assert selection is not None, "an SSN switch's backward needs the forward's selection"
    weights, _, _ = sparse_switches(w, v, radius, selection[0], selection[1])
    grads = reduce(weights[0], weights[1])
    grad_w, grad_v = F.sparse_switch_grads(grads.grad_w, grads.grad_v, w, v, radius, selection)
    return grads._replace(grad_w=grad_w, grad_v=grad_v)


def _empty_like_param(weight: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if weight is None else weight.new_empty(0)


class ReferenceBackend(Backend):
    name = "torch"

    def available(self) -> bool:
        return True

    def covers(self, x: Tensor, *params: Tensor | None) -> bool:
        return True

    def merge(
        self,
        gathered: Tensor,
        ddof: int,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        num_batches_tracked: Tensor | None,
        momentum: float | None,
        running_ddof: int,
    ) -> BatchMoments:
        count, mean, m2 = F.merge_partials(gathered.view(-1, gathered.shape[-1]))
        var = m2 / (count - ddof).clamp(min=1.0)
        finite = torch.isfinite(mean).all() & torch.isfinite(m2).all()
        enough = count >= 2
        flags = torch.where(finite, 0, Flags.NONFINITE) | torch.where(
            (count > 0) & ~enough, Flags.TOO_FEW, 0
        )
        if running_mean is not None and running_var is not None:
            valid = finite & enough
            if momentum is None:
                assert num_batches_tracked is not None
                done = (num_batches_tracked + valid.long()).clamp(min=1)
                factor: Tensor | float = 1.0 / done.double()
            else:
                factor = momentum
            new_mean = F.fold_running(running_mean, mean, factor)
            new_var = F.fold_running(
                running_var, m2 / (count - running_ddof).clamp(min=1.0), factor
            )
            fits = torch.isfinite(new_mean).all() & torch.isfinite(new_var).all()
            flags = flags | torch.where(valid & ~fits, Flags.OVERFLOW, 0)
            valid = valid & fits
            running_mean.copy_(torch.where(valid, new_mean, running_mean))
            running_var.copy_(torch.where(valid, new_var, running_var))
            if num_batches_tracked is not None:
                num_batches_tracked.add_(valid.to(num_batches_tracked.dtype))
        return BatchMoments(count, mean, var, flags.to(torch.int32))

    # --- Switchable Normalization ----------------------------------------------------------

    def sn_stats(self, x: Tensor, ddof: int) -> tuple[SNStats, Tensor]:
        length = F.spatial_size(x)
        centre, mean, m2 = F.instance_moments(x)
        var = m2 / F.unbiased_divisor(length)  # (m2 is 0 over one position)
        ln_mean, ln_var = F.layer_moments(mean, var, ddof)
        return SNStats(centre, mean, var, ln_mean, ln_var), F.sample_partials(mean, var)

    def sn_output(
        self, x, stats, bn_mean, bn_var, w, v, weight, bias, eps, logits, scopes=7,
        selected=(-1, -1), sparse=None,
    ):  # fmt: skip
        selection = None
        if sparse is not None:
            w, v, selection = sparse_switch_weights(w, v, sparse)
        w64, v64 = _mixing64(w, v, logits, scopes, selected)
        has_bn = bn_mean is not None and bn_var is not None
        mu = F.mix(w64, [stats.mean, stats.ln_mean[:, None], bn_mean[None] if has_bn else None])
        var = F.mix(v64, [stats.var, stats.ln_var[:, None], bn_var[None] if has_bn else None])
        rstd = torch.rsqrt(var + eps)
        scale = rstd * _gamma(weight, rstd)
        shift = (stats.centre.double() - mu) * scale
        if bias is not None:
            shift = shift + bias.double()
        return _affine(x, stats.centre, scale, shift), SNMixed(mu, var, rstd, selection)

    def sn_backward_reduce(
        self, x, dy, stats, mixed, bn_mean, bn_var, w, v, weight, ddof, logits, scopes=7,
        selected=(-1, -1), radius=None,
    ):  # fmt: skip
        if radius is not None:
            return through_sparse_switch(
                lambda w, v: self.sn_backward_reduce(
                    x, dy, stats, mixed, bn_mean, bn_var, w, v, weight, ddof, False, scopes
                ),
                w, v, radius, mixed.selection,
            )  # fmt: skip
        c = x.shape[1]
        w64, v64 = _mixing64(w, v, logits, scopes, selected)
        gamma = _gamma(weight, mixed.rstd)
        s1, s2c = F.centred_sums(x, stats.centre, dy)
        s2 = s2c + (stats.centre.double() - mixed.mean) * s1  # sum dy * (x - mu)
        g_mu = -mixed.rstd * gamma * s1
        g_var = -0.5 * mixed.rstd.pow(3) * gamma * s2

        # IN scope, then LN: per sample, over the channels.
        g_a = w64[0] * g_mu
        g_b = v64[0] * g_var
        m_n = w64[1] * g_mu.sum(dim=1, keepdim=True)
        v_n = v64[1] * g_var.sum(dim=1, keepdim=True)
        ln_divisor = max(c - ddof, 1)
        g_a = g_a + m_n / c + v_n * 2 * (stats.mean - stats.ln_mean[:, None]) / ln_divisor
        g_b = g_b + v_n / ln_divisor
        # BN: per channel, over the samples of every rank; the caller sums these totals.
        has_bn = bn_mean is not None and bn_var is not None
        totals = torch.cat([w64[2] * g_mu.sum(dim=0), v64[2] * g_var.sum(dim=0)])
        if not has_bn:
            totals = torch.zeros_like(totals)

        scope_means = [stats.mean, stats.ln_mean[:, None], bn_mean[None] if has_bn else None]
        scope_vars = [stats.var, stats.ln_var[:, None], bn_var[None] if has_bn else None]
        zero = g_mu.new_zeros(())
        grad_w = torch.stack(
            [zero if s is None else (g_mu * (s - mixed.mean)).sum() for s in scope_means]
        )
        grad_v = torch.stack(
            [zero if s is None else (g_var * (s - mixed.var)).sum() for s in scope_vars]
        )
        if logits:
            grad_w, grad_v = F.logit_grads(grad_w, w64), F.logit_grads(grad_v, v64)
        grad_w, grad_v = F.on_own_scopes(grad_w, scopes), F.on_own_scopes(grad_v, scopes)
        # A selected (frozen) vector is a constant of the layer.
        if selected[0] >= 0:
            grad_w = torch.zeros_like(grad_w)
        if selected[1] >= 0:
            grad_v = torch.zeros_like(grad_v)
        if weight is None:
            grad_weight, grad_bias = _empty_like_param(weight, x), _empty_like_param(weight, x)
        else:
            grad_weight = (mixed.rstd * s2).sum(dim=0).to(weight.dtype)
            grad_bias = s1.sum(dim=0).to(weight.dtype)
        return SNGrads(
            totals, g_a, g_b, grad_w.to(w.dtype), grad_v.to(v.dtype), grad_weight, grad_bias
        )

    def sn_backward_input(self, x, dy, stats, mixed, grads, bn_mean, totals, count, weight, ddof):
        c = x.shape[1]
        length = F.spatial_size(x)
        g_a, g_b = grads.grad_mean, grads.grad_var
        if totals is not None and count is not None and bn_mean is not None:
            m_c, v_c = totals[:c], totals[c:]
            n_tot = count.clamp(min=1.0)
            n_var = (count - ddof).clamp(min=1.0)
            g_a = g_a + m_c / n_tot + v_c * 2 * (stats.mean - bn_mean) / n_var
            g_b = g_b + v_c / n_var
        # d var_in / dx = 2 (x - a) / (L - 1) with x - a = (x - centre) + (centre - a); a
        # (N, C) input has no IN variance (it is identically 0).
        k_x = 2 * g_b / (length - 1) if length > 1 else torch.zeros_like(g_b)
        k_0 = g_a / max(length, 1) + k_x * (stats.centre.double() - stats.mean)
        k_dy = _gamma(weight, mixed.rstd) * mixed.rstd
        return _combine(x, dy, stats.centre, k_dy, k_x, k_0)

    # --- Batch Normalization ---------------------------------------------------------------

    def bn_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        centre, mean, m2 = F.instance_moments(x)
        return centre, F.element_partials(mean, m2, F.spatial_size(x))

    def bn_output(self, x, centre, mean, var, weight, bias, eps):
        n, c = x.shape[:2]
        rstd = torch.rsqrt(var + eps)
        scale = rstd * _gamma(weight, rstd)
        shift = (centre.double() - mean) * scale
        if bias is not None:
            shift = shift + bias.double()
        y = _affine(x, centre, scale.expand(n, c), shift)
        # The backward pass centres on the rounded global mean; its rounding is accounted for.
        return y, BNSaved(mean.to(F.acc_dtype(x.dtype), copy=True), mean.clone(), rstd)

    def bn_backward_reduce(self, x, dy, saved, weight):
        n, c = x.shape[:2]
        s1, s2c = F.centred_sums(x, saved.centre.expand(n, c), dy)
        sum_dy = s1.sum(dim=0)
        sum_dy_xmu = s2c.sum(dim=0) + (saved.centre.double() - saved.mean) * sum_dy
        if weight is None:
            grad_weight, grad_bias = _empty_like_param(weight, x), _empty_like_param(weight, x)
        else:
            grad_weight = (sum_dy_xmu * saved.rstd).to(weight.dtype)
            grad_bias = sum_dy.to(weight.dtype)
        return torch.cat([sum_dy, sum_dy_xmu]), grad_weight, grad_bias

    def bn_backward_input(self, x, dy, saved, weight, totals, count):
        n, c = x.shape[:2]
        gamma = _gamma(weight, saved.rstd)
        n_tot = count.clamp(min=1.0)
        sum_dy, sum_dy_xmu = totals[:c], totals[c:]
        k_x = -gamma * saved.rstd.pow(3) * sum_dy_xmu / n_tot
        k_0 = -gamma * saved.rstd * sum_dy / n_tot + k_x * (saved.centre.double() - saved.mean)
        k_dy = gamma * saved.rstd
        return _combine(
            x, dy, saved.centre.expand(n, c), k_dy.expand(n, c), k_x.expand(n, c),
            k_0.expand(n, c),
        )  # fmt: skip


def _mixing64(
    w: Tensor, v: Tensor, logits: bool, scopes: int, selected: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """The (3,) float64 mixing weights over (IN, LN, BN) of (K,) ``w``, ``v``."""
    w, v = F.one_hot_where_selected(w, selected[0]), F.one_hot_where_selected(v, selected[1])
    w, v = F.switches_on_all_scopes(w, v, logits, scopes)
    return F.mixing_weights64(w, logits), F.mixing_weights64(v, logits)
