"""The kernel interface: the steps every normalization layer is made of, named once.

A layer call is a few full-size passes over the input ``x`` (N, C, *S), with small steps on
(N, C) or (C,) values between them and one collective each way (made by the caller, between
the steps). A backend implements the steps below; the autograd Functions in
:mod:`syncsn.function` call them through the custom ops of :mod:`syncsn.kernels.ops` and
nothing else.

Conventions, shared by every backend:

* ``acc`` is the accumulation dtype: float32 for float16 / bfloat16 input, else x's dtype.
* (N, C) per-(sample, channel) statistics, (C,) per-channel ones; the small statistics a
  later step needs are float64 (a float32 mean of values near 1e4 is off by about 1e-3, the
  spread of a std-1 input; float64 for O(N * C) values costs nothing).
* Every full-size pass reads x about a per-(n, c) ``centre`` (a first-pass mean in ``acc``),
  which keeps forward and backward exact for inputs whose mean dwarfs their spread.
* The partials a rank contributes to the batch scope are one float64 (1 + 2C,) buffer
  ``[count, mean (C), m2 (C)]``: SN counts samples (``mean`` = mean of the instance means,
  ``m2`` = their centred sum of squares plus the sum of the instance variances), BN counts
  elements. Both are merged by the same parallel-variance formula (:meth:`merge`).
* SN mixes the scopes (IN, LN, BN) in that order. A layer with all three passes ``w`` and
  ``v`` as (3,) vectors; one with fewer (SwitchNorm1d: LN and BN; ``using_bn=False``: IN and
  LN) passes (K,) vectors over its own scopes and their mask ``scopes`` (bits 1 = IN,
  2 = LN, 4 = BN), and gets (K,) gradients: the backend puts a missing scope's entry in
  (weight 0), so that the layer runs no operation to do it. ``selected`` (the frozen scopes
  of a settled SSN layer: an index into the layer's scopes for ``w`` and for ``v``, -1 when
  not frozen; ``logits`` False) makes that vector the one-hot weights of that scope,
  whatever its entries, with a zero gradient. An SSN layer that has not settled passes its
  logits with a :class:`SparseSwitch`: the backend computes sparsestmax, the freezing and
  their gradient itself.
* ``ddof`` is 0 for SN over (N, C, *S) and 1 for SwitchNorm1d, whose LN and BN scopes
  divide by C - 1 and N - 1 (the IN variance always divides by L - 1). A variance over a
  single value is 0 with a zero gradient (the divisor clamped to 1,
  :func:`syncsn.functional.unbiased_divisor`): the IN scope of a 1x1 map (L = 1) and the
  LN scope of one feature (C = 1, ddof 1).
* Outputs and input gradients have x's dtype and memory format.

The steps that decide what every rank must agree on bitwise (:meth:`merge`, which also
folds the running statistics) are taken from one backend per device type, whatever backend
runs the passes (see :func:`syncsn.kernels.shared_backend`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Backend",
    "BNSaved",
    "BatchMoments",
    "Flags",
    "SNGrads",
    "SNMixed",
    "SNStats",
    "SparseSwitch",
    "acc_dtype",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics of float16 / bfloat16 input accumulate in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Flags:
    """Bits of the int32 flags :meth:`Backend.merge` returns about a training batch."""

    NONFINITE = 1  # a batch statistic is NaN or infinite: running statistics not folded
    OVERFLOW = 2  # the folded running statistics do not fit the buffers' dtype: not folded
    TOO_FEW = 4  # fewer than 2 samples (SN) / values (BN) per channel in the global batch


class SNStats(NamedTuple):
    """Per-(n, c) and per-sample statistics of SN's statistics pass."""

    centre: Tensor  # (N, C) acc: the point the full-size passes subtract
    mean: Tensor  # (N, C) float64: instance means (IN scope)
    var: Tensor  # (N, C) float64: unbiased instance variances (0 when L == 1)
    ln_mean: Tensor  # (N,) float64: LN scope
    ln_var: Tensor  # (N,) float64: LN scope, divided by C - ddof


class SNMixed(NamedTuple):
    """The mixed statistics SN normalizes with, (N, C) float64."""

    mean: Tensor
    var: Tensor
    rstd: Tensor  # (var + eps) ** -0.5
    # With a SparseSwitch: (2,) long, the scopes w and v are frozen on after the call (-1:
    # not frozen), which the backward takes them as.
    selection: Tensor | None = None


class SparseSwitch(NamedTuple):
    """An SSN layer's switch: ``w`` and ``v`` are logits, whose weights are
    ``sparsestmax(logits, radius)`` (:func:`syncsn.sparsemax._sparsestmax_unchecked`), or the
    one-hot weights of the scope a vector is frozen on (with a zero gradient)."""

    radius: Tensor  # 0-d, the parameters' dtype
    frozen_w: Tensor  # 0-d long: an index into the layer's scopes, -1 when not frozen
    frozen_v: Tensor
    # Training: a vector whose weights are one-hot is frozen on its scope, written into
    # frozen_w / frozen_v in place (syncsn.sparse_switchnorm._newly_frozen).
    freeze: bool


class BatchMoments(NamedTuple):
    """The merged batch scope of all ranks (float64) and what the merge found."""

    count: Tensor  # type: ignore[assignment]  # 0-d: samples (SN) or values (BN)
    mean: Tensor  # (C,)
    var: Tensor  # (C,): m2 / (count - ddof), the variance the layer normalizes with
    flags: Tensor  # 0-d int32, bits of :class:`Flags`


class SNGrads(NamedTuple):
    """SN's backward up to its collective."""

    totals: Tensor  # (2C,) float64: [w_bn sum_n g_mu, v_bn sum_n g_var] of this rank
    grad_mean: Tensor  # (N, C) float64: d loss / d instance mean, IN and LN terms
    grad_var: Tensor  # (N, C) float64: d loss / d instance variance, IN and LN terms
    grad_w: Tensor  # (K,) like w
    grad_v: Tensor  # (K,) like v
    grad_weight: Tensor  # (C,) in weight's dtype; empty without weight
    grad_bias: Tensor  # (C,) likewise


class BNSaved(NamedTuple):
    """What BN's backward needs besides x: the global statistics."""

    centre: Tensor  # (C,) acc: the global mean, rounded
    mean: Tensor  # (C,) float64
    rstd: Tensor  # (C,) float64: (biased var + eps) ** -0.5


class Backend:
    """One implementation of the steps. Subclasses override every method.

    ``name`` is what ``SYNCSN_BACKEND`` selects it by. :meth:`covers` says whether the
    backend can run a call on these tensors; the selection falls back to the reference
    backend when it cannot.
    """

    name: str = ""
    # Whether the passes compute an SSN switch (sparsestmax, its gradient) themselves; else
    # the layer computes its weights with torch operations, which autograd differentiates.
    fuses_sparse_switch: bool = False

    def available(self) -> bool:
        """Whether the backend can run at all in this process (built, importable)."""
        raise NotImplementedError

    def unavailable_reason(self) -> str:
        """Why :meth:`available` is False, for error messages."""
        return "not available"

    def covers(self, x: Tensor, *params: Tensor | None) -> bool:
        """Whether the passes over ``x`` with these parameters can run here."""
        raise NotImplementedError

    # --- shared small step -----------------------------------------------------------------

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
        """Merge every rank's partials and fold the result into the running statistics.

        Args:
            gathered: (world, 1 + 2C) float64, one row of partials per rank; or one
                rank's (1 + 2C,) partials when the layer does not synchronize.
            ddof: the returned variance is m2 / (count - ddof).
            running_mean, running_var: (C,) buffers updated in place, or None (not
                tracked); ``running_var`` gets m2 / (count - running_ddof).
            num_batches_tracked: 0-d long buffer, incremented when folded, or None.
            momentum: running = (1 - momentum) * running + momentum * batch; None gives
                the cumulative average over ``num_batches_tracked`` batches.
        Folding is skipped (every buffer untouched) for an empty global batch, a count
        below 2, non-finite statistics or results that overflow the buffers' dtype, and the
        flags say why; nothing here reads a device value on the host.
        """
        raise NotImplementedError

    # --- Switchable Normalization ----------------------------------------------------------

    def sn_stats(self, x: Tensor, ddof: int) -> tuple[SNStats, Tensor]:
        """The statistics pass: (:class:`SNStats`, this rank's partials (1 + 2C,))."""
        raise NotImplementedError

    def sn_output(
        self,
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
        """Mix the scopes and normalize: y = weight * (x - mu) * rstd + bias.

        ``bn_mean``, ``bn_var`` (C,) float64 are the BN scope (batch or running statistics),
        None when the layer has none (then the BN entries of w and v are ignored). ``w``, ``v``
        (K,) over the scopes of mask ``scopes`` are the mixing weights on the simplex, or
        with ``logits`` the logits whose softmax they are: SN's softmax is then computed
        here rather than as separate operations. With ``sparse`` they are the logits of
        SSN's sparsestmax, and ``mixed.selection`` says what is frozen after the call.
        """
        raise NotImplementedError

    def sn_backward_reduce(
        self,
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
        """The backward reduction pass (sum dy, sum dy * (x - centre) per (n, c)) and the
        small math up to the backward collective (which sums ``totals`` over the ranks).
        ``grad_w``, ``grad_v`` are the gradients of ``w``, ``v`` as :meth:`sn_output` took
        them: of the logits with ``logits``; of sparsestmax's logits with the ``radius`` of
        the forward's :class:`SparseSwitch` (frozen as ``mixed.selection`` says)."""
        raise NotImplementedError

    def sn_backward_input(
        self,
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
        """dx, adding the BN terms from the summed ``totals`` and the global ``count``
        (both None without a batch scope)."""
        raise NotImplementedError

    # --- Batch Normalization ---------------------------------------------------------------

    def bn_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The statistics pass: per-(n, c) centre (N, C) acc and the partials (1 + 2C,)."""
        raise NotImplementedError

    def bn_output(
        self,
        x: Tensor,
        centre: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> tuple[Tensor, BNSaved]:
        """y = weight * (x - mean) * (var + eps)^-1/2 + bias with the (C,) float64 global
        ``mean`` and biased ``var``; ``centre`` is the statistics pass's (N, C) centre."""
        raise NotImplementedError

    def bn_backward_reduce(
        self, x: Tensor, dy: Tensor, saved: BNSaved, weight: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(totals (2C,) float64 = [sum dy, sum dy * (x - mean)] of this rank, grad_weight,
        grad_bias (C,), empty without weight)."""
        raise NotImplementedError

    def bn_backward_input(
        self,
        x: Tensor,
        dy: Tensor,
        saved: BNSaved,
        weight: Tensor | None,
        totals: Tensor,
        count: Tensor,
    ) -> Tensor:
        """dx from the totals summed over the ranks and the global count."""
        raise NotImplementedError
