"""The C++ CPU backend: each step is one call of a compiled function.

The functions (``syncsn/csrc``) are built on first use by :mod:`syncsn._native`; when they
cannot be built the reference backend runs instead. They are also registered as the
operators ``torch.ops.syncsn_cpp.<step>``, whose schemas name their arguments and results;
the backend calls them as a Python module, which costs a fraction of the dispatcher's call.
Each takes and returns the interface's tensors under the interface's names, fusing
a full-size pass with the small per-(n, c) and per-channel math around it. They cover
non-empty CPU input of any floating dtype, (N, C) or (N, C, *S), contiguous or (4-D / 5-D)
channels-last, with float32 / float64 parameters. Its merge is the shared CPU merge
(:func:`syncsn.kernels.shared_backend`), which also runs under the other backends.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _env, _native
from .. import functional as F
from .interface import Backend, BatchMoments, BNSaved, SNGrads, SNMixed, SNStats
from .reference import sparse_switch_weights, through_sparse_switch

__all__ = ["CppBackend"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_PARAM_DTYPES = (torch.float32, torch.float64)


def _dense(x: Tensor) -> bool:
    """Contiguous, or channels-last (the two layouts the kernels read)."""
    if x.is_contiguous():
        return True
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and x.is_contiguous(memory_format=fmt)


class _Kernels:
    """The compiled functions, looked up in the loaded module on first use (``available()``
    loads it before any step is chosen) and kept as plain attributes after that."""

    def __getattr__(self, name: str):
        function = getattr(_native.kernels(), name)
        setattr(self, name, function)
        return function


_LIB = _Kernels()


def _switches(
    w: Tensor, v: Tensor, logits: bool, scopes: int, selected: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """The (3,) switch vectors over (IN, LN, BN) the kernels take."""
    w, v = F.one_hot_where_selected(w, selected[0]), F.one_hot_where_selected(v, selected[1])
    return F.switches_on_all_scopes(w, v, logits, scopes)


class CppBackend(Backend):
    name = "cpp"

    def available(self) -> bool:
        return _native.kernels() is not None

    def unavailable_reason(self) -> str:
        if not _native.enabled():
            return f"SYNCSN_NATIVE={_env.get('SYNCSN_NATIVE')}"
        return "the C++ kernels could not be built (see the warning above)"

    def covers(self, x: Tensor, *params: Tensor | None) -> bool:
        if not x.is_cpu or x.dtype not in _DTYPES or x.numel() == 0 or not _dense(x):
            return False
        for p in params:
            if p is not None and not (p.is_cpu and p.dtype in _PARAM_DTYPES):
                return False
        return True

    def merge(
        self, gathered, ddof, running_mean, running_var, num_batches_tracked, momentum,
        running_ddof,
    ):  # fmt: skip
        return BatchMoments._make(
            _LIB.merge(
                gathered, ddof, running_mean, running_var, num_batches_tracked, momentum,
                running_ddof,
            )
        )  # fmt: skip

    def sn_stats(self, x, ddof):
        *stats, partials = _LIB.sn_stats(x, ddof)
        return SNStats(*stats), partials

    def sn_output(
        self, x, stats, bn_mean, bn_var, w, v, weight, bias, eps, logits, scopes=7,
        selected=(-1, -1), sparse=None,
    ):  # fmt: skip
        selection = None
        if sparse is not None:
            w, v, selection = sparse_switch_weights(w, v, sparse)
        w, v = _switches(w, v, logits, scopes, selected)
        y, mean, var, rstd = _LIB.sn_output(
            x, *stats, bn_mean, bn_var, w, v, weight, bias, eps, logits
        )
        return y, SNMixed(mean, var, rstd, selection)

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
        w3, v3 = _switches(w, v, logits, scopes, selected)
        grads = SNGrads._make(
            _LIB.sn_backward_reduce(
                x, dy, *stats, *mixed[:3], bn_mean, bn_var, w3, v3, weight, ddof, logits
            )
        )
        if scopes == F.ALL_SCOPES and selected == (-1, -1):
            return grads
        grad_w, grad_v = (
            F.on_own_scopes(grads.grad_w, scopes),
            F.on_own_scopes(grads.grad_v, scopes),
        )
        return grads._replace(
            grad_w=torch.zeros_like(w) if selected[0] >= 0 else grad_w,
            grad_v=torch.zeros_like(v) if selected[1] >= 0 else grad_v,
        )

    def sn_backward_input(self, x, dy, stats, mixed, grads, bn_mean, totals, count, weight, ddof):
        return _LIB.sn_backward_input(
            x, dy, stats.centre, stats.mean, mixed.rstd, grads.grad_mean, grads.grad_var,
            bn_mean, totals, count, weight, ddof,
        )  # fmt: skip

    def bn_stats(self, x):
        return tuple(_LIB.bn_stats(x))

    def bn_output(self, x, centre, mean, var, weight, bias, eps):
        y, saved_centre, saved_mean, rstd = _LIB.bn_output(x, centre, mean, var, weight, bias, eps)
        return y, BNSaved(saved_centre, saved_mean, rstd)

    def bn_backward_reduce(self, x, dy, saved, weight):
        return tuple(_LIB.bn_backward_reduce(x, dy, *saved, weight))

    def bn_backward_input(self, x, dy, saved, weight, totals, count):
        return _LIB.bn_backward_input(x, dy, *saved, weight, totals, count)
