"""The math of Switchable and Batch Normalization as pure functions on tensors.

Shapes: ``x`` is (N, C, *S) with L = prod(S). Per-sample, per-channel ("instance") statistics
are (N, C); per-channel statistics (C,); per-sample statistics (N,). These functions are the
reference backend's building blocks (:mod:`syncsn.kernels.reference`) and the definition the
other backends are tested against; nothing here communicates.

The synchronized layers exchange one fixed-size float64 buffer per rank,
``[count, mean (C), m2 (C)]``, and merge the buffers with the parallel-variance formula
(:func:`merge_partials`), which is exact for uneven per-rank counts and stable when the mean
is far larger than the spread.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sparsemax import _sparsestmax_unchecked, _sparsestmax_vjp

__all__ = [
    "acc_dtype",
    "spatial_size",
    "instance_moments",
    "layer_moments",
    "sample_partials",
    "element_partials",
    "merge_partials",
    "mix",
    "ALL_SCOPES",
    "scope_mask",
    "own_scopes",
    "on_all_scopes",
    "switches_on_all_scopes",
    "on_own_scopes",
    "one_hot_where_selected",
    "sparse_switches",
    "sparse_switch_grads",
    "centred_sums",
    "fold_running",
    "check_spatial_size",
    "unbiased_divisor",
    "switch_norm_eval",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics of float16 / bfloat16 input accumulate in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def spatial_size(x: Tensor) -> int:
    """L = prod(S) for x of shape (N, C, *S)."""
    return math.prod(x.shape[2:])


def per_sample_channel_view(t: Tensor, ndim: int) -> Tensor:
    """(N, C) -> (N, C, 1, ...) broadcastable against an ``ndim``-dimensional input."""
    return t.view(t.shape + (1,) * (ndim - 2))


def instance_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-(n, c) statistics over the spatial dimensions.

    Args:
        x: (N, C, *S); (N, C) counts each value as its own instance.
    Returns:
        centre (N, C) in ``acc_dtype(x.dtype)``: a first-pass mean, the point every
        full-size pass subtracts; mean and m2 (N, C) float64: the mean and
        sum_l (x - mean)^2.

    The exact mean is the centre plus the mean of x - centre, and the squares are summed
    about the centre, in float64: a float32 mean of values near 1e4 is off by about 1e-3,
    and float32 squares of values above 1.8e19 overflow.
    """
    acc = acc_dtype(x.dtype)
    if x.dim() == 2:
        return (
            x.to(acc, copy=True),
            x.to(torch.float64, copy=True),
            x.new_zeros(x.shape, dtype=torch.float64),
        )
    dims = tuple(range(2, x.dim()))
    length = spatial_size(x)
    centre = (x.sum(dim=dims, dtype=torch.float64) / max(length, 1)).to(acc)
    centred = x - per_sample_channel_view(centre, x.dim())
    offset = centred.sum(dim=dims, dtype=torch.float64) / max(length, 1)
    sum_sq = torch.linalg.vector_norm(centred, dim=dims, dtype=torch.float64).square()
    m2 = (sum_sq - length * offset.square()).clamp_(min=0)
    return centre, centre.double() + offset, m2


def layer_moments(mean_in: Tensor, var_in: Tensor, ddof: int = 0) -> tuple[Tensor, Tensor]:
    """LN scope from instance statistics, in the cancellation-free form.

    Args:
        mean_in, var_in: (N, C).
        ddof: 0, or 1 for the unbiased variance over the C features (SwitchNorm1d).
    Returns:
        mu_ln (N,) = mean_c mean_in; var_ln (N,) =
        (sum_c var_in + sum_c (mean_in - mu_ln)^2) / max(C - ddof, 1): over one feature
        with ``ddof=1`` the variance is 0, as the IN scope's over one position is.
    """
    c = mean_in.shape[1]
    mu_ln = mean_in.mean(dim=1)
    spread = (mean_in - mu_ln[:, None]).square().sum(dim=1)
    return mu_ln, (var_in.sum(dim=1) + spread) / max(c - ddof, 1)


def _partials(count: float, mean: Tensor, m2: Tensor) -> Tensor:
    head = torch.full((1,), count, dtype=torch.float64, device=mean.device)
    return torch.cat([head, mean, m2])


def sample_partials(mean_in: Tensor, var_in: Tensor) -> Tensor:
    """One rank's contribution to SN's batch scope, in which each sample counts once.

    Returns the (1 + 2C,) float64 buffer [n, abar, M2 + B]: abar the mean of the instance
    means, M2 their centred sum of squares and B the sum of the instance variances, so that
    :func:`merge_partials` gives var_bn = mean_n var_in + mean_n (mean_in - mu_bn)^2 as
    m2 / count. A rank with no samples contributes zeros.
    """
    n, c = mean_in.shape
    if n == 0:
        return mean_in.new_zeros(1 + 2 * c, dtype=torch.float64)
    a = mean_in.double()
    abar = a.mean(dim=0)
    spread = (a - abar).square().sum(dim=0) + var_in.double().sum(dim=0)
    return _partials(float(n), abar, spread)


def element_partials(mean_in: Tensor, m2_in: Tensor, length: int) -> Tensor:
    """One rank's contribution to Batch Normalization, in which each value counts once.

    Built from the instance statistics so the input is read once. Returns the (1 + 2C,)
    float64 buffer [N * L, mean, m2] with m2 the sum of squares about the rank's mean.
    """
    n, c = mean_in.shape
    if n == 0 or length == 0:
        return mean_in.new_zeros(1 + 2 * c, dtype=torch.float64)
    a = mean_in.double()
    mean = a.mean(dim=0)
    m2 = m2_in.double().sum(dim=0) + length * (a - mean).square().sum(dim=0)
    return _partials(float(n * length), mean, m2)


def merge_partials(parts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the (world, 1 + 2C) partials of every rank (Chan et al.).

    Returns count (0-d), mean (C,) and m2 (C,) = sum_r [m2_r + n_r (mean_r - mean)^2], all
    float64. With no samples at all mean and m2 are 0.
    """
    c = (parts.shape[1] - 1) // 2
    n_r = parts[:, 0]
    mean_r, m2_r = parts[:, 1 : 1 + c], parts[:, 1 + c :]
    count = n_r.sum()
    mean = (n_r[:, None] * mean_r).sum(dim=0) / count.clamp(min=1.0)
    m2 = (m2_r + n_r[:, None] * (mean_r - mean).square()).sum(dim=0)
    return count, mean, m2


def mixing_weights64(w: Tensor, logits: bool) -> Tensor:
    """The (3,) mixing weights in float64: ``softmax(w)`` when ``w`` holds logits (-inf for
    a scope the layer lacks), else ``w`` renormalised, since float32 weights on the simplex
    sum to 1 only within ~1e-7, which shifts a mean of 1e4 by 1e-3 (more than a std-1 input
    tolerates)."""
    w = w.double()
    if logits:
        return torch.softmax(w, dim=0)
    return w / w.sum()


#: The bits of (IN, LN, BN) in a layer's scope mask; the kernels mix the scopes in this order.
SCOPE_BITS = {"in": 1, "ln": 2, "bn": 4}
#: The mask of a layer with all three scopes.
ALL_SCOPES = 7


def scope_mask(scopes: tuple[str, ...]) -> int:
    """The mask of ``scopes``, an ordered subset of ``("in", "ln", "bn")``."""
    return sum(SCOPE_BITS[s] for s in scopes)


def own_scopes(scopes: int) -> list[int]:
    """The indices into (IN, LN, BN) of the scopes of mask ``scopes``, in order."""
    return [k for k, bit in enumerate(SCOPE_BITS.values()) if scopes & bit]


def on_all_scopes(w: Tensor, scopes: int, absent: float) -> Tensor:
    """(K,) weights or logits over the scopes of mask ``scopes`` as the (3,) vector over
    (IN, LN, BN), ``absent`` (0 for weights, -inf for logits) where the layer lacks a scope."""
    if scopes == ALL_SCOPES:
        return w
    fill = w.new_full((), absent)
    own = own_scopes(scopes)
    return torch.stack([w[own.index(k)] if k in own else fill for k in range(3)])


def switches_on_all_scopes(
    w: Tensor, v: Tensor, logits: bool, scopes: int
) -> tuple[Tensor, Tensor]:
    """:func:`on_all_scopes` of both switch vectors, of logits or of weights."""
    if scopes == ALL_SCOPES:
        return w, v
    absent = -math.inf if logits else 0.0
    return on_all_scopes(w, scopes, absent), on_all_scopes(v, scopes, absent)


def one_hot_where_selected(weights: Tensor, selected: int) -> Tensor:
    """The (K,) mixing ``weights`` as they are, or, when ``selected >= 0`` (a frozen SSN
    vector), the one-hot weights of scope ``selected`` in their dtype."""
    if selected < 0:
        return weights
    return (torch.arange(weights.shape[0], device=weights.device) == selected).to(weights.dtype)


def sparse_weights_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype SSN's switch weights are computed in: at least float32, since float16
    resolves the push too coarsely to tell a vertex from a point near it."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sparse_switches(
    w: Tensor,
    v: Tensor,
    radius: Tensor,
    frozen_w: Tensor,
    frozen_v: Tensor,
    stop_early: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """SSN's switch weights from its logits, and what is frozen after them.

    Args:
        w, v: the (K,) logits of the means and the variances.
        radius: the 0-d sparsestmax radius.
        frozen_w, frozen_v: 0-d long, the scope (index into the K entries) each vector is
            frozen on, -1 when not.
        stop_early: passed to :func:`~syncsn.sparsemax._sparsestmax_unchecked`.

    Returns:
        ``weights`` (2, K) in :func:`sparse_weights_dtype`: the one-hot weights of a frozen
        vector, else ``sparsestmax(logits, radius)`` (differentiable in the logits);
        ``sparse`` (2, K) the sparsestmax weights themselves; ``selection`` (2,) long: the
        frozen scopes, with every vector not frozen yet whose sparsestmax weights are one-hot
        (exactly one non-zero entry, the structural test of :func:`~syncsn.is_one_hot`)
        frozen on the scope they select.

    Example::

        >>> frozen = torch.tensor(-1)
        >>> weights, _, selection = sparse_switches(
        ...     torch.tensor([2.0, 1.0, 0.0]), torch.zeros(3), torch.tensor(1.0), frozen, frozen)
        >>> selection
        tensor([ 0, -1])
    """
    logits = torch.stack([w, v])
    frozen = torch.stack([frozen_w, frozen_v])
    dtype = sparse_weights_dtype(logits.dtype)
    sparse = _sparsestmax_unchecked(logits.to(dtype), radius.to(dtype), stop_early)
    scope = torch.arange(logits.shape[-1], device=logits.device)
    one_hot = (scope == frozen.unsqueeze(-1)).to(dtype)
    weights = torch.where(frozen.unsqueeze(-1) >= 0, one_hot, sparse)
    # (NaN weights, from NaN logits, are never one-hot: nothing freezes on them.)
    found = (torch.count_nonzero(sparse.detach(), dim=-1) == 1) & ~sparse.detach().isnan().any(-1)
    selection = torch.where((frozen < 0) & found, sparse.detach().argmax(dim=-1), frozen)
    return weights, sparse, selection


def sparse_switch_grads(
    grad_w: Tensor, grad_v: Tensor, w: Tensor, v: Tensor, radius: Tensor, selection: Tensor
) -> tuple[Tensor, Tensor]:
    """d loss / d logits from d loss / d weights of :func:`sparse_switches` (each (K,)), in
    the logits' dtype: zero for a vector frozen as ``selection`` (2,) says, else the
    vector-Jacobian product of sparsestmax (written out, no autograd)."""
    logits = torch.stack([w, v])
    dtype = sparse_weights_dtype(logits.dtype)
    grads = torch.stack([grad_w, grad_v]).to(dtype)
    through = _sparsestmax_vjp(logits.to(dtype), radius.to(dtype), grads)
    result = torch.where(selection.unsqueeze(-1) >= 0, 0, through).to(logits.dtype)
    return result[0].clone(), result[1].clone()  # two tensors, not views of one


def on_own_scopes(grad: Tensor, scopes: int) -> Tensor:
    """The entries of a (3,) gradient over (IN, LN, BN) that belong to the scopes of mask
    ``scopes``, (K,): the inverse of :func:`on_all_scopes`."""
    if scopes == ALL_SCOPES:
        return grad
    return grad[own_scopes(scopes)]


def logit_grads(grad: Tensor, weights: Tensor) -> Tensor:
    """d loss / d logits from d loss / d ``weights`` = softmax(logits): the vector-Jacobian
    product ``p * (g - <g, p>)`` of softmax. A constant added to ``grad`` changes nothing."""
    return weights * (grad - (grad * weights).sum())


def mix(weights: Tensor, scopes: list[Tensor | None]) -> Tensor:
    """sum_k weights[k] * scopes[k] over the scopes that are given, broadcast to (N, C)."""
    out: Tensor | None = None
    for k, scope in enumerate(scopes):
        if scope is not None:
            term = weights[k] * scope
            out = term if out is None else out + term
    assert out is not None
    return out


def centred_sums(x: Tensor, centre: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """The backward reduction: per-(n, c) S1 = sum dy and S2c = sum dy * (x - centre).

    Args:
        x, dy: (N, C, *S); centre: (N, C).
    Returns:
        S1, S2c: (N, C) float64.

    Uses torch's fused batch-norm backward reduction where the layout allows: applied to x
    viewed as one sample of N * C channels (contiguous input), or to one sample at a time
    (channels_last), it gives these sums per (n, c) without a temporary of x's size.
    """
    acc = acc_dtype(x.dtype)
    centre = centre.to(acc)
    if x.dim() == 2:
        return dy.to(torch.float64, copy=True), ((x.to(acc) - centre) * dy).double()
    n, c = x.shape[:2]
    if x.numel() == 0:
        zeros = x.new_zeros((n, c), dtype=torch.float64)
        return zeros, zeros.clone()
    if x.is_contiguous() and dy.is_contiguous():
        ones = torch.ones(n * c, dtype=acc, device=x.device)
        _, s2c, s1 = torch.ops.aten.native_batch_norm_backward(
            dy.view(1, n * c, -1), x.view(1, n * c, -1), ones, None, None,
            centre.reshape(-1), ones, True, 0.0, [False, True, True],
        )  # fmt: skip
        return s1.view(n, c).double(), s2c.view(n, c).double()
    dims = tuple(range(2, x.dim()))
    centred = x.to(acc) - per_sample_channel_view(centre, x.dim())
    s1 = dy.sum(dim=dims, dtype=torch.float64)
    s2c = (centred * dy).sum(dim=dims, dtype=torch.float64)
    return s1, s2c


def fold_running(running: Tensor, batch: Tensor, factor: Tensor | float) -> Tensor:
    """(1 - factor) * running + factor * batch in float64, in ``running``'s dtype."""
    r = running.double()
    return (r + factor * (batch - r)).to(running.dtype)


def unbiased_divisor(count: int) -> int:
    """The divisor of an unbiased variance over ``count`` values: count - 1, but 1 for a
    single value, whose variance is then 0 (the sum of squares about itself), with a
    well-defined gradient. Switchable Normalization's IN scope over a 1x1 map and its LN
    scope over one feature (SwitchNorm1d) use it; eps keeps the mixture finite."""
    return max(count - 1, 1)


def check_spatial_size(length: int, layer: str) -> None:
    """The IN scope needs at least one spatial element per (n, c) (one gives mean = x and
    variance 0, see :func:`unbiased_divisor`)."""
    if length < 1:
        raise ValueError(
            f"{layer}: the IN scope needs at least 1 spatial element per channel, got a "
            f"feature map of {length} elements (a spatial dimension of size 0)"
        )


def switch_norm_eval(
    x: Tensor,
    w: Tensor,
    v: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    ddof: int = 0,
) -> Tensor:
    """Switchable Normalization in eval mode, in plain torch operations and x's precision.

    The graph torch.export and the ONNX exporter record: a few reductions and one affine
    pass, computed in ``acc_dtype(x.dtype)`` (no float64: eval merges nothing across ranks).

    Args:
        x: (N, C, *S), or (N, C) with ``ddof=1`` (SwitchNorm1d).
        w, v: (3,) mixing weights over (IN, LN, BN) for means and variances.
        running_mean, running_var: (C,) the BN scope, or None without one.
        weight, bias: (C,) or None.
    """
    acc = acc_dtype(x.dtype)

    def cast(t: Tensor) -> Tensor:  # no cast node in the graph when none is needed
        return t if t.dtype == acc else t.to(acc)

    xs = cast(x)
    c = x.shape[1]
    if x.dim() == 2:
        mean_in, var_in = xs, None
    else:
        # One position (a 1x1 map): variance 0, as the kernels compute it.
        correction = 1 if spatial_size(x) > 1 else 0
        var_in, mean_in = torch.var_mean(xs, dim=tuple(range(2, x.dim())), correction=correction)
    mu_ln = mean_in.mean(dim=1, keepdim=True)
    spread = (mean_in - mu_ln).square()
    var_ln = (spread if var_in is None else var_in + spread).sum(dim=1, keepdim=True)
    var_ln = var_ln / max(c - ddof, 1)
    w, v = cast(w), cast(v)
    mu = w[1] * mu_ln + (w[0] * mean_in if var_in is not None else 0)
    var = v[1] * var_ln + (v[0] * var_in if var_in is not None else 0)
    if running_mean is not None and running_var is not None:
        mu = mu + w[2] * cast(running_mean)
        var = var + v[2] * cast(running_var)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * cast(weight)
    # x - mu first: scaling x itself loses log10(mean / std) digits for a large mean.
    view = (*x.shape[:2], *([1] * (x.dim() - 2)))
    y = (xs - mu.view(view)) * scale.view(view)
    if bias is not None:
        y = y + cast(bias).view(1, c, *([1] * (x.dim() - 2)))
    return y if y.dtype == x.dtype else y.to(x.dtype)
