"""The C++ CPU backend: each step is one or two fused calls into ``syncsn/csrc``.

The kernels are built on first use by :mod:`syncsn._native`; when they cannot be built the
reference backend runs instead. They cover non-empty CPU input of any floating dtype,
contiguous or (4-D / 5-D) channels-last, with float32 / float64 parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from .interface import Backend, BNSaved, SNGrads, SNMixed, SNStats

__all__ = ["CppBackend"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_PARAM_DTYPES = (torch.float32, torch.float64)


def _channels_last(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def _in_layout_of(dy: Tensor, x: Tensor) -> Tensor:
    """dy in x's dtype and memory layout, as the passes read both alike (the copy is rare:
    autograd usually hands back the layout of the output, which is x's)."""
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    if x.is_contiguous():
        return dy.contiguous()
    return dy.contiguous(memory_format=_channels_last(x.dim()))


def _sample_partials(old: Tensor) -> Tensor:
    """[n, abar, M2, B] (1 + 3C,) as the interface's [n, abar, M2 + B] (1 + 2C,)."""
    c = (old.numel() - 1) // 3
    return torch.cat([old[: 1 + c], old[1 + c : 1 + 2 * c] + old[1 + 2 * c :]])


def _scopes(w: Tensor, has_bn: bool) -> Tensor:
    return w if has_bn else w[:2]


def _pad3(g: Tensor) -> Tensor:
    return g if g.numel() == 3 else torch.cat([g, g.new_zeros(3 - g.numel())])


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


class CppBackend(Backend):
    name = "cpp"

    def _kernels(self):
        return _native.kernels()

    def available(self) -> bool:
        return self._kernels() is not None

    def unavailable_reason(self) -> str:
        if not _native.enabled():
            return "SYNCSN_NATIVE=0"
        return "the C++ kernels could not be built (see the warning above)"

    def covers(self, x: Tensor, *params: Tensor | None) -> bool:
        if not x.is_cpu or x.dtype not in _DTYPES or x.numel() == 0 or x.dim() < 3:
            return False
        if not x.is_contiguous() and not (
            x.dim() in (4, 5) and x.is_contiguous(memory_format=_channels_last(x.dim()))
        ):
            return False
        return all(p is None or (p.is_cpu and p.dtype in _PARAM_DTYPES) for p in params)

    def merge(self, *args, **kwargs):
        raise NotImplementedError("the merge is the shared backend's step")

    def sn_stats(self, x, ddof):
        centre, mean, var, ln_mean, ln_var, partials = self._kernels().sn_stats(x, True)
        return SNStats(centre, mean, var, ln_mean, ln_var), _sample_partials(partials)

    def sn_output(self, x, stats, bn_mean, bn_var, w, v, weight, bias, eps):
        has_bn = bn_mean is not None
        y, mu, var, rstd = self._kernels().sn_output(
            x, *stats, bn_mean, bn_var, _scopes(w, has_bn), _scopes(v, has_bn), weight, bias, eps
        )
        return y, SNMixed(mu, var, rstd)

    def sn_backward_reduce(self, x, dy, stats, mixed, bn_mean, bn_var, w, v, weight, ddof):
        has_bn = bn_mean is not None
        dy = _in_layout_of(dy, x)
        totals, g_a, g_b, dw, dv, dweight, dbias = self._kernels().sn_backward_reduce(
            x, dy, stats.centre, stats.mean, stats.var, mixed.mean, mixed.var, mixed.rstd,
            stats.ln_mean, stats.ln_var, bn_mean, bn_var, _scopes(w, has_bn),
            _scopes(v, has_bn), weight, has_bn,
        )  # fmt: skip
        totals = totals if totals is not None else x.new_zeros(2 * x.shape[1], dtype=torch.float64)
        return SNGrads(
            totals, g_a, g_b, _pad3(dw), _pad3(dv), _or_empty(dweight, x), _or_empty(dbias, x)
        )

    def sn_backward_input(self, x, dy, stats, mixed, grads, bn_mean, totals, count, weight, ddof):
        return self._kernels().sn_backward_input(
            x, _in_layout_of(dy, x), stats.centre, stats.mean, grads.grad_mean, grads.grad_var,
            mixed.rstd, weight, totals, count, bn_mean,
        )  # fmt: skip

    def bn_stats(self, x):
        return self._kernels().bn_stats(x)

    def bn_output(self, x, centre, mean, var, weight, bias, eps):
        one = var.new_ones(())
        y, rstd, centre_c = self._kernels().bn_output(x, centre, one, mean, var, weight, bias, eps)
        return y, BNSaved(centre_c, mean.clone(), rstd)

    def bn_backward_reduce(self, x, dy, saved, weight):
        totals, dweight, dbias = self._kernels().bn_backward_reduce(
            x, _in_layout_of(dy, x), saved.centre, saved.mean, saved.rstd, weight
        )
        return totals, _or_empty(dweight, x), _or_empty(dbias, x)

    def bn_backward_input(self, x, dy, saved, weight, totals, count):
        return self._kernels().bn_backward_input(
            x, _in_layout_of(dy, x), saved.centre, saved.mean, saved.rstd, weight, totals, count
        )
