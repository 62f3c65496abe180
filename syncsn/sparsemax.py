"""Sparsemax and sparsestmax: the switch-weight maps of Sparse Switchable Normalization.

SSN (Shao et al., CVPR 2019) replaces SN's softmax over the (IN, LN, BN) logits by
*sparsestmax*, which gradually forces the importance weights to a one-hot vector so that
every layer ends up computing a single normalizer.

* ``sparsemax(z)`` is the Euclidean projection of ``z`` onto the probability simplex
  (Martins & Astudillo, 2016). It is exactly sparse, and its Jacobian has a closed form.
* ``sparsestmax(z, r)`` is sparsemax followed by a push away from the centre of the simplex
  face the projection lies on, so that the result keeps at least distance ``r`` from it.
  Growing ``r`` from 0 to 1 over training drives every weight vector to a vertex.

Both are pure functions of tensors, differentiable through autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["is_one_hot", "sparsemax", "sparsestmax"]


def _check_logits(z: Tensor, name: str) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of logits, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {z.dtype}")
    if z.dim() == 0:
        raise ValueError(f"{name}: expected a tensor with at least one dimension, got a scalar")


class _SparsemaxFunction(torch.autograd.Function):
    """Sparsemax along ``dim`` with the closed-form backward.

    With S the support of p = sparsemax(z), the Jacobian is diag(1_S) - 1_S 1_S^T / |S|, so
    the vector-Jacobian product is g_i - mean_{j in S} g_j on S and 0 off S.
    """

    @staticmethod
    def forward(ctx, z: Tensor, dim: int) -> Tensor:
        # Shifting by the max changes nothing mathematically but keeps the threshold exact
        # for large logits: the top entry becomes 0 and a support of one gives exactly 1.
        top = z.amax(dim=dim, keepdim=True)
        z = z - top
        z_sorted = z.sort(dim=dim, descending=True).values
        n = z.shape[dim]
        shape = [1] * z.dim()
        shape[dim] = n
        ranks = torch.arange(1, n + 1, device=z.device).view(shape)
        cumsum = z_sorted.cumsum(dim=dim)
        # j is in the support iff 1 + j z_(j) > sum_{i <= j} z_(i); the support size is the
        # largest such j (j = 1 always qualifies, so k >= 1).
        qualifies = 1 + ranks.to(z.dtype) * z_sorted > cumsum
        # (A slice whose maximum is not finite qualifies nowhere: k = 0 there, made 1 so that
        # the gather stays in bounds; its result is NaN below.)
        k = torch.where(qualifies, ranks, 0).amax(dim=dim, keepdim=True).clamp_min(1)
        tau = (cumsum.gather(dim, k - 1) - 1) / k.to(z.dtype)
        p = (z - tau).clamp_min(0)
        # NaN or +inf logits, or only -inf ones, have no projection: NaN, as softmax gives.
        p = torch.where(torch.isfinite(top), p, math.nan)
        ctx.save_for_backward(p)
        ctx.dim = dim
        return p

    @staticmethod
    def backward(ctx, grad_p: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        dim = ctx.dim
        support = p > 0
        size = support.sum(dim=dim, keepdim=True).to(grad_p.dtype)
        grad_on_support = torch.where(support, grad_p, 0)
        mean = grad_on_support.sum(dim=dim, keepdim=True) / size
        grad_z = torch.where(support, grad_p - mean, 0)
        return torch.where(p.isnan(), p, grad_z), None  # NaN back through a NaN result


def sparsemax(z: Tensor, dim: int = -1) -> Tensor:
    """Euclidean projection of ``z`` onto the probability simplex along ``dim``.

    ``sparsemax(z) = argmin_{p >= 0, sum(p) = 1} ||p - z||^2``, computed by the sorting
    algorithm; every other dimension is a batch dimension. The result is ``max(z - tau, 0)``
    for a per-slice threshold ``tau``, so entries far below the maximum are exactly zero.
    Invariant to adding a constant to ``z`` along ``dim``.

    Args:
        z: floating-point logits of any shape ``(..., K, ...)`` with ``K >= 1`` along
            ``dim``. An entry of ``-inf`` gets weight 0 (as in softmax); a slice with a NaN
            or ``+inf`` entry, or only ``-inf`` entries, has no projection and gives NaN
            throughout, as softmax does (no error: checking would read the device).
        dim: the dimension to project along.

    Returns:
        Tensor of the shape and dtype of ``z``: non-negative, summing to 1 along ``dim``
        (NaN for a slice without a projection). Differentiable; the backward is the closed
        form (see ``_SparsemaxFunction``), NaN through a NaN slice.

    Example::

        >>> syncsn.sparsemax(torch.tensor([1.0, 0.8, -1.0]))
        tensor([0.6000, 0.4000, 0.0000])
    """
    _check_logits(z, "sparsemax")
    if not -z.dim() <= dim < z.dim():
        raise IndexError(f"sparsemax: dim must be in [{-z.dim()}, {z.dim() - 1}], got {dim}")
    dim = dim % z.dim()
    if z.shape[dim] == 0:
        raise ValueError(f"sparsemax: dimension {dim} is empty (shape {tuple(z.shape)})")
    return _SparsemaxFunction.apply(z, dim)


def _check_radius(r: float | Tensor, z: Tensor) -> Tensor:
    """Returns ``r`` as a tensor of shape ``z.shape[:-1]`` in ``z``'s dtype, without grad."""
    if isinstance(r, Tensor):
        if r.is_complex():
            raise TypeError(f"sparsestmax: r must be real, got dtype {r.dtype}")
        radius = r.detach().to(device=z.device, dtype=z.dtype)
    elif isinstance(r, (int, float)) and not isinstance(r, bool):
        radius = torch.tensor(float(r), device=z.device, dtype=z.dtype)
    else:
        raise TypeError(f"sparsestmax: r must be a float or a Tensor, got {type(r).__name__}")
    try:
        radius = radius.expand(z.shape[:-1])
    except RuntimeError:
        raise ValueError(
            "sparsestmax: r must be a scalar or broadcastable to the batch shape "
            f"{tuple(z.shape[:-1])} of z, got shape {tuple(radius.shape)}"
        ) from None
    if not bool(torch.isfinite(radius).all() & (radius >= 0).all()):
        raise ValueError(f"sparsestmax: r must be finite and >= 0, got {r}")
    return radius


def sparsestmax(z: Tensor, r: float | Tensor) -> Tensor:
    """Sparsemax pushed at least distance ``r`` away from the centre of its simplex face.

    For logits ``z`` (``K`` entries, 2 or 3 in SSN) and radius ``r >= 0``:

    1. ``w = sparsemax(z)``; let ``S`` be its support and ``u`` the uniform point of ``S``
       (``1/|S|`` on ``S``, 0 elsewhere). If ``|S| = 1`` the result is that one-hot vector.
    2. If ``||w - u|| >= r``, the result is ``w``.
    3. Otherwise ``w`` is pushed along the ray from ``u`` to ``p = u + r (w - u)/||w - u||``.
       If ``p`` stays on the face (no coordinate goes negative) the result is ``p``.
    4. Otherwise ``p`` is projected onto the simplex again, with the coordinates that went
       negative removed, which lands on a smaller face ``S'`` with centre ``u'``, and the
       steps repeat from 2 on that face with radius ``r' = sqrt(r^2 - ||u' - u||^2)``: the
       radius is reduced by the distance already travelled from ``u`` to the face, which
       keeps the target sphere the same (``u'`` is the foot of the perpendicular from ``u``).

    Every step either stops or shrinks the support, so ``K`` rounds always suffice; once
    the result is one-hot it stays one-hot. The rounds are a fixed sequence of tensor
    operations on every vector (no ``.item()``, no data-dependent branch): besides the
    argument checks, which read ``z`` and ``r``, nothing waits for the device, and without
    them (as SSN layers call it) the map traces whole under ``torch.compile``.

    Properties (with ``S0`` the support of ``sparsemax(z)`` and ``u0`` its uniform point):

    * the result lies on the simplex: non-negative, summing to 1 up to round-off;
      a one-hot result is exactly one 1.0 and zeros (``is_one_hot`` tests it structurally);
    * ``sparsestmax(z, 0)`` is exactly ``sparsemax(z)``;
    * unless degenerate (below), the result is at distance ``>= r`` from ``u0`` or one-hot;
    * with 3 entries the result is one-hot for every ``r >= sqrt(2/3)`` (the distance from
      the centre to a vertex), with 2 entries for every ``r >= sqrt(1/2)``; coordinates that
      the push leaves within a few ulps of zero count as gone, so this holds at the
      boundary radius despite round-off.

    Degenerate case: when the projection on the current face *equals* its centre (its
    entries on the support are bitwise equal: equal logits, as at initialisation, logits
    closer than the dtype resolves near ``1/|S|``, or ties that a symmetric push keeps tied)
    the push has no direction. Then the result is that point ``w`` itself, not NaN
    and not an arbitrary vertex: a freshly initialised layer behaves like SN, and the
    gradient (that of the projection, which carries it) lets training break the tie, after
    which the push proceeds normally. Such points are therefore exempt from the distance and
    one-hot properties above.

    Gradients flow through sparsemax and the push; the radius gets none. The map is
    continuous and piecewise smooth in ``z`` except at ties, and the push amplifies the
    gradient by ``r / ||w - u||`` near the centre, as in the authors' formulation.

    Args:
        z: floating-point finite logits of shape ``(K,)``, or ``(..., K)`` for a batch of
            independent vectors.
        r: radius ``>= 0``: a float, or a tensor broadcastable to ``z.shape[:-1]`` (such as
            a layer's radius buffer).

    Returns:
        Tensor of the shape and dtype of ``z``: points of the simplex along the last dim.

    Example::

        >>> syncsn.sparsestmax(torch.tensor([1.0, 0.8, 0.0]), 0.5)
        tensor([0.8536, 0.1464, 0.0000])
    """
    _check_logits(z, "sparsestmax")
    if z.shape[-1] == 0:
        raise ValueError(f"sparsestmax: the last dimension of z is empty (shape {tuple(z.shape)})")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("sparsestmax: z must be finite, got NaN or infinite logits")
    return _sparsestmax_unchecked(z, _check_radius(r, z))


def _sparsestmax_unchecked(z: Tensor, radius: Tensor, stop_early: bool = False) -> Tensor:
    """:func:`sparsestmax` without its argument checks, which read device values.

    For callers that know their arguments are valid (an SSN layer: its logits are
    parameters, its radius is set through :func:`~syncsn.set_radius`): a fixed sequence of
    tensor operations, with no ``.item()`` or data-dependent Python branch, so it neither
    waits for the device nor breaks a ``torch.compile`` graph, and it gives the same bits as
    :func:`sparsestmax`.

    Args:
        z: floating-point finite logits ``(..., K)``, ``K >= 1``.
        radius: finite radii ``>= 0``, a tensor of ``z``'s dtype and device broadcastable
            to ``z.shape[:-1]``.
        stop_early: return as soon as every vector has its result (the same bits and
            gradients, fewer operations), which reads a device value on the host after each
            round: for eager CPU tensors, where that read costs nothing.

    Returns:
        Tensor of the shape and dtype of ``z``, as :func:`sparsestmax`.
    """
    radius = radius.detach().expand(z.shape[:-1])
    # A coordinate the push leaves below this counts as gone; round-off in the push is a
    # few ulps, so without it the boundary radius could give 1e-17 instead of a vertex.
    leave_tol = 4 * torch.finfo(z.dtype).eps
    num_entries = z.shape[-1]

    # The rounds of the definition, each run on every vector: a vector that has stopped
    # keeps its result (torch.where) while the others go on. The support shrinks by at least
    # one entry per round, so K rounds always suffice, and the last one can only find a
    # single entry left: it is written out as the one-hot vector it gives (bit for bit the
    # same, and with the same zero gradient).
    result = torch.zeros_like(z)
    done = torch.zeros(z.shape[:-1], dtype=torch.bool, device=z.device)
    q = z
    centre_prev: Tensor | None = None
    for _ in range(max(num_entries - 1, 1)):
        w = sparsemax(q)
        with torch.no_grad():
            support = w > 0
            size = support.sum(dim=-1, keepdim=True)
            centre = support.to(z.dtype) / size
            if centre_prev is not None:
                # Pythagoras: the new centre is the foot of the perpendicular from the old
                # one, so this is the radius of the same sphere within the smaller face.
                travelled_sq = (centre - centre_prev).square().sum(dim=-1)
                radius = (radius.square() - travelled_sq).clamp_min(0).sqrt()
        # The direction of the push (w and the centre are both 0 off the support).
        # Mathematically w - u already lies in the face's plane (sum zero); in floating point
        # sum(w) is 1 only up to an ulp, which tilts a short offset off the plane and skews
        # the direction by eps / ||w - u||. Removing the offset's own mean (exact: the entries
        # are small) restores it to full precision.
        offset = w - centre
        offset = torch.where(support, offset - offset.sum(dim=-1, keepdim=True) / size, 0)
        dist_sq = offset.square().sum(dim=-1)
        with torch.no_grad():
            # Structural test for "w is the centre": all entries on the support are equal
            # (ties in the logits give bitwise-equal entries); no tolerance involved. The
            # largest entry is on the support, where w > 0 = w off it.
            lowest = torch.where(support, w, math.inf).amin(dim=-1)
            degenerate = (w.amax(dim=-1) == lowest) | (dist_sq == 0)
        # Guard the sqrt and the division so that no branch, taken or not, makes NaN
        # (torch.where would pass NaN gradients of an untaken branch through as 0 * NaN).
        dist = torch.where(degenerate, 1, dist_sq).sqrt()
        one_hot = size.squeeze(-1) == 1
        keep_w = one_hot | degenerate | (dist.detach() >= radius)
        p = centre + (radius / dist).unsqueeze(-1) * offset
        with torch.no_grad():
            leaves = torch.where(support, p, math.inf).amin(dim=-1) < leave_tol
        finished = ~done & (keep_w | ~leaves)
        # One-hot results are renormalised to exactly 1; pushed points to a sum of 1.
        kept = torch.where(one_hot.unsqueeze(-1), w / w.sum(dim=-1, keepdim=True), w)
        value = torch.where(keep_w.unsqueeze(-1), kept, p / p.sum(dim=-1, keepdim=True))
        result = torch.where(finished.unsqueeze(-1), value, result)
        done = done | finished
        if stop_early and bool(done.all()):
            # The remaining rounds and the last one would keep every result as it is.
            return result
        # Re-project on the smaller face. Lowering the leaving coordinates (and those off
        # the support, which are 0) by 2 puts them below max(q) - 1 >= tau, so they are
        # excluded from the new support by construction: the support shrinks every round.
        q = torch.where(p.detach() >= leave_tol, p, p - 2)
        centre_prev = centre
    if num_entries > 1:
        # The last round: one entry of q is left, at least 1 above the others, and
        # sparsemax makes it exactly 1 with a zero Jacobian.
        entries = torch.arange(num_entries, device=z.device)
        last = entries == q.detach().argmax(dim=-1, keepdim=True)
        result = torch.where(done.unsqueeze(-1), result, last.to(z.dtype))
    return result


def is_one_hot(p: Tensor) -> bool:
    """True when the weight vector ``p`` of shape ``(K,)`` has exactly one non-zero entry.

    A structural test, free of tolerances: ``sparsestmax`` returns exact zeros off the
    support and exactly 1.0 for a one-hot result, so this is the test for freezing a layer
    on its selected scope ``int(p.argmax())``.

    Args:
        p: a weight vector of shape ``(K,)``.

    Example::

        >>> syncsn.is_one_hot(syncsn.sparsestmax(torch.tensor([2.0, 1.0, 0.0]), 1.0))
        True
    """
    if not isinstance(p, Tensor):
        raise TypeError(f"is_one_hot: expected a torch.Tensor, got {type(p).__name__}")
    if p.dim() != 1:
        raise ValueError(f"is_one_hot: expected a 1-D weight vector, got shape {tuple(p.shape)}")
    return int(torch.count_nonzero(p)) == 1


def _sparsestmax_vjp(z: Tensor, radius: Tensor, grad: Tensor) -> Tensor:
    """The vector-Jacobian product of :func:`_sparsestmax_unchecked` at ``z``, written out.

    For steps that run where autograd does not (a custom op's implementation): the rounds
    are run again, then ``grad`` is taken back through them, last round first. A vector that
    stops in a round gets the gradient of that round's result (the kept projection, or the
    pushed point renormalised); one that goes on passes the gradient of the next round's
    input back through this round's push; the last vertex has a zero gradient.

    Args:
        z, radius: as for :func:`_sparsestmax_unchecked`.
        grad: (..., K), the gradient of the result.

    Returns:
        (..., K), the gradient of ``z``; the same as autograd's through
        :func:`_sparsestmax_unchecked` up to round-off (NaN for a vector whose result is
        NaN, see :func:`sparsemax`).
    """
    radius = radius.detach().expand(z.shape[:-1])
    leave_tol = 4 * torch.finfo(z.dtype).eps
    rounds = []
    done = torch.zeros(z.shape[:-1], dtype=torch.bool, device=z.device)
    q = z.detach()
    centre_prev: Tensor | None = None
    for _ in range(max(z.shape[-1] - 1, 1)):
        w = _SparsemaxFunction.apply(q, -1)
        support = w > 0
        size = support.sum(dim=-1, keepdim=True)
        centre = support.to(z.dtype) / size
        if centre_prev is not None:
            travelled_sq = (centre - centre_prev).square().sum(dim=-1)
            radius = (radius.square() - travelled_sq).clamp_min(0).sqrt()
        offset = w - centre
        offset = torch.where(support, offset - offset.sum(dim=-1, keepdim=True) / size, 0)
        dist_sq = offset.square().sum(dim=-1)
        lowest = torch.where(support, w, math.inf).amin(dim=-1)
        degenerate = (w.amax(dim=-1) == lowest) | (dist_sq == 0)
        dist = torch.where(degenerate, 1, dist_sq).sqrt()
        keep = (size.squeeze(-1) == 1) | degenerate | (dist >= radius)
        p = centre + (radius / dist).unsqueeze(-1) * offset
        leaves = torch.where(support, p, math.inf).amin(dim=-1) < leave_tol
        finished = ~done & (keep | ~leaves)
        done = done | finished
        rounds.append((support, size, offset, dist, radius, keep, p, finished))
        q = torch.where(p >= leave_tol, p, p - 2)
        centre_prev = centre

    def sparsemax_vjp(support: Tensor, size: Tensor, g: Tensor) -> Tensor:
        return torch.where(support, g - torch.where(support, g, 0).sum(-1, keepdim=True) / size, 0)

    def push_vjp(offset: Tensor, dist: Tensor, radius: Tensor, g_p: Tensor) -> Tensor:
        along = (offset * g_p).sum(dim=-1, keepdim=True) / dist.square().unsqueeze(-1)
        return (radius / dist).unsqueeze(-1) * (g_p - offset * along)

    carried = torch.zeros_like(grad)
    for support, size, offset, dist, radius, keep, p, finished in reversed(rounds):
        total = p.sum(dim=-1, keepdim=True)
        g_p = grad / total - (grad * p).sum(dim=-1, keepdim=True) / total.square()
        pushed = sparsemax_vjp(support, size, push_vjp(offset, dist, radius, g_p))
        value = torch.where(keep.unsqueeze(-1), sparsemax_vjp(support, size, grad), pushed)
        onward = sparsemax_vjp(support, size, push_vjp(offset, dist, radius, carried))
        carried = torch.where(finished.unsqueeze(-1), value, onward)
    return torch.where(torch.isfinite(z.amax(dim=-1, keepdim=True)), carried, math.nan)
