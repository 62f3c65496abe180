"""The math of Switchable and Batch Normalization as pure functions on tensors.

Shapes: ``x`` is (N, C, *S) with L = prod(S). Per-sample, per-channel ("instance") statistics
are (N, C); per-channel statistics (C,); per-sample statistics (N,). Statistics are kept in
``stats_dtype(x.dtype)``: float32 for float16/bfloat16 input, else the input's dtype.

Nothing here communicates. The synchronized layers exchange the fixed-size "partials" these
functions produce (one buffer per rank) and merge them with the parallel-variance formula,
which is exact for uneven per-rank counts and stable when the mean is far larger than the
spread.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "stats_dtype",
    "instance_stats",
    "layer_stats",
    "sample_partials",
    "merge_sample_partials",
    "element_partials",
    "merge_element_partials",
    "mix",
    "normalize_",
    "batch_norm_reduce_sums",
    "combine_grad_",
    "update_running_stats_",
]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in float32 for half-precision input."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def per_sample_channel_view(t: Tensor, ndim: int) -> Tensor:
    """(N, C) -> (N, C, 1, ...) broadcastable against an ``ndim``-dimensional input."""
    return t.view(t.shape + (1,) * (ndim - 2))


def instance_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-(n, c) statistics over the spatial dimensions.

    Args:
        x: (N, C, *S).
    Returns:
        centred: x - centre, (N, C, *S) in ``stats_dtype(x.dtype)``, x's memory format; a
            temporary that :func:`normalize_` turns into the output in place.
        centre: (N, C) in ``stats_dtype(x.dtype)``, a first-pass mean: the point every
            full-size pass subtracts (forward and backward), so they stay exact for inputs
            whose mean is far larger than their spread.
        mean, m2: (N, C) float64, the mean and sum_l (x - mean)^2. The unbiased instance
            variance is ``m2 / (L - 1)``.

    The exact mean is the centre plus the mean of x - centre: a float32 mean of values near
    1e4 is off by about 1e-3, the size of the spread of a std-1 input. Float64 is used only
    for the (N, C) tensors.
    """
    dims = tuple(range(2, x.dim()))
    acc = stats_dtype(x.dtype)
    if not dims:  # (N, C): each value is its own instance
        centre = x.to(acc)
        return (
            torch.zeros_like(centre),
            centre,
            x.double(),
            torch.zeros_like(x, dtype=torch.float64),
        )
    length = math.prod(x.shape[2:])
    centre = x.mean(dim=dims, dtype=acc)
    centred = x - per_sample_channel_view(centre, x.dim())
    offset = centred.sum(dim=dims).double() / length
    sum_sq = torch.linalg.vector_norm(centred, dim=dims).double().square()
    m2 = (sum_sq - length * offset.square()).clamp_(min=0)
    return centred, centre, centre.double() + offset, m2


def layer_stats(mean_in: Tensor, var_in: Tensor) -> tuple[Tensor, Tensor]:
    """LN scope from instance statistics, in the cancellation-free form.

    Args:
        mean_in, var_in: (N, C).
    Returns:
        mu_ln (N,) = mean_c mean_in; var_ln (N,) = mean_c var_in + mean_c (mean_in - mu_ln)^2.
    """
    mu_ln = mean_in.mean(dim=1)
    var_ln = var_in.mean(dim=1) + (mean_in - mu_ln[:, None]).square().mean(dim=1)
    return mu_ln, var_ln


def sample_partials(mean_in: Tensor, var_in: Tensor) -> Tensor:
    """One rank's contribution to the SN batch scope, packed for a single collective.

    Each sample counts once, whatever its spatial size. Returns a float64 (1 + 3C,) buffer:
    [n, abar (C), M2 (C), B (C)] with abar the mean of the instance means, M2 the centred sum
    of squares of the instance means and B the sum of the instance variances. A rank with no
    samples contributes zeros.
    """
    n, c = mean_in.shape
    a = mean_in.double()
    if n == 0:
        return torch.zeros(1 + 3 * c, dtype=torch.float64, device=mean_in.device)
    abar = a.mean(dim=0)
    m2 = (a - abar).square().sum(dim=0)
    b = var_in.double().sum(dim=0)
    count = torch.full((1,), float(n), dtype=torch.float64, device=mean_in.device)
    return torch.cat([count, abar, m2, b])


def merge_sample_partials(parts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the (world, 1 + 3C) buffers of :func:`sample_partials` (Chan et al.).

    Returns ``count`` (scalar, float64), ``mu_bn`` (C,) and ``var_bn`` (C,) in float64, with
    var_bn = (sum_r B_r + sum_r [M2_r + n_r (abar_r - mu_bn)^2]) / N_tot. With no samples at
    all, mu_bn and var_bn are 0 (the caller must not use them).
    """
    c = (parts.shape[1] - 1) // 3
    n_r = parts[:, 0]
    abar, m2, b = parts[:, 1 : 1 + c], parts[:, 1 + c : 1 + 2 * c], parts[:, 1 + 2 * c :]
    count = n_r.sum()
    safe = count.clamp(min=1.0)
    mu = (n_r[:, None] * abar).sum(dim=0) / safe
    spread = (m2 + n_r[:, None] * (abar - mu).square()).sum(dim=0)
    var = (b.sum(dim=0) + spread) / safe
    return count, mu, var


def element_partials(mean_in: Tensor, m2_in: Tensor, length: int) -> Tensor:
    """One rank's per-channel contribution to Batch Normalization (pixel-weighted).

    Built from the instance statistics so the input is read once. Returns a float64
    (1 + 2C,) buffer: [count, mean (C), M2 (C)], count = N * L.
    """
    n, c = mean_in.shape
    if n == 0 or length == 0:
        return torch.zeros(1 + 2 * c, dtype=torch.float64, device=mean_in.device)
    a = mean_in.double()
    mean = a.mean(dim=0)
    m2 = m2_in.double().sum(dim=0) + length * (a - mean).square().sum(dim=0)
    count = torch.full((1,), float(n * length), dtype=torch.float64, device=mean_in.device)
    return torch.cat([count, mean, m2])


def merge_element_partials(parts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the (world, 1 + 2C) buffers of :func:`element_partials`.

    Returns count (scalar), mean (C,) and m2 (C,) = sum of squares about the global mean,
    all float64. The biased variance is m2 / count, the unbiased one m2 / (count - 1).
    """
    c = (parts.shape[1] - 1) // 2
    n_r = parts[:, 0]
    mean_r, m2_r = parts[:, 1 : 1 + c], parts[:, 1 + c :]
    count = n_r.sum()
    mean = (n_r[:, None] * mean_r).sum(dim=0) / count.clamp(min=1.0)
    m2 = (m2_r + n_r[:, None] * (mean_r - mean).square()).sum(dim=0)
    return count, mean, m2


def mix(weights: Tensor, scopes: list[Tensor]) -> Tensor:
    """sum_k weights[k] * scopes[k], the scopes broadcast to (N, C)."""
    out = weights[0] * scopes[0]
    for w, s in zip(weights[1:], scopes[1:], strict=True):
        out = out + w * s
    return out


def normalize_(
    centred: Tensor,
    centre: Tensor,
    mean: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """y = (x - mean) * scale + bias, computed in place from ``centred`` = x - centre.

    Args:
        centred: (N, C, *S) from :func:`instance_stats`, overwritten.
        centre: (N, C) the point ``centred`` was taken about.
        mean, scale: (N, C) float64 (a per-channel statistic expanded to (N, C) is fine).
        bias: (C,) or None.
    Returns:
        y in ``dtype``, with x's memory format.

    Two passes. Scaling x - centre (small numbers) rather than x keeps the output exact when
    the mean is far larger than the spread (x * scale + shift loses about log10(mean / std)
    digits); the float64 difference centre - mean goes into the per-(n, c) shift.
    """
    shift = (centre.double() - mean) * scale
    if bias is not None:
        shift = shift + bias.double()
    view = lambda t: per_sample_channel_view(t.to(centred.dtype), centred.dim())  # noqa: E731
    centred.mul_(view(scale)).add_(view(shift))
    return centred.to(dtype)


def batch_norm_reduce_sums(x: Tensor, centre: Tensor, dy: Tensor) -> tuple[Tensor, Tensor] | None:
    """Per-(n, c) sum dy and sum dy * (x - centre) (float64 (N, C)) in one fused pass.

    Torch's batch-norm backward reduction computes exactly these sums per channel; applied
    to x viewed as one sample of N * C channels (contiguous input), or to one sample at a time
    (channels_last), it gives them per (n, c) without a temporary of x's size. Returns None
    for layouts it does not cover (mixed layouts, non-dense tensors).
    """
    n, c = x.shape[:2]
    if x.numel() == 0:
        return None
    acc = stats_dtype(x.dtype)
    centre = centre.to(acc)
    if x.is_contiguous() and dy.is_contiguous():
        ones = torch.ones(n * c, dtype=acc, device=x.device)
        _, s2c, s1 = torch.ops.aten.native_batch_norm_backward(
            dy.view(1, n * c, -1),
            x.view(1, n * c, -1),
            ones,
            None,
            None,
            centre.reshape(-1),
            ones,
            True,
            0.0,
            [False, True, True],
        )
        return s1.view(n, c).double(), s2c.view(n, c).double()
    layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if (
        x.dim() in (4, 5)
        and x.is_contiguous(memory_format=layout)
        and dy.is_contiguous(memory_format=layout)
    ):
        ones = torch.ones(c, dtype=acc, device=x.device)
        s1 = x.new_empty((n, c), dtype=torch.float64)
        s2c = x.new_empty((n, c), dtype=torch.float64)
        for i in range(n):
            _, s2c[i], s1[i] = torch.ops.aten.native_batch_norm_backward(
                dy[i : i + 1],
                x[i : i + 1],
                ones,
                None,
                None,
                centre[i],
                ones,
                True,
                0.0,
                [False, True, True],
            )
        return s1, s2c
    return None


def combine_grad_(
    centred: Tensor, dy: Tensor, k_dy: Tensor, k_x: Tensor, k_0: Tensor, dtype: torch.dtype
) -> Tensor:
    """dx = k_dy * dy + k_x * centred + k_0, overwriting ``centred`` (= x - centre).

    Every layer's input gradient has this form, with per-(n, c) coefficients (N, C). Working
    on the centred input, not x, keeps it exact for inputs with a large mean.
    """
    view = lambda t: per_sample_channel_view(t.to(centred.dtype), centred.dim())  # noqa: E731
    centred.mul_(view(k_x)).add_(view(k_0)).addcmul_(dy, view(k_dy))
    return centred.to(dtype)


def update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    batch_mean: Tensor,
    batch_var: Tensor,
    valid: Tensor,
) -> None:
    """running = (1 - momentum) * running + momentum * batch, in place, where ``valid``.

    ``momentum=None`` gives the cumulative average over ``num_batches_tracked`` batches.
    ``valid`` is a 0-d bool tensor (identical on all ranks): an empty global batch or a
    non-finite statistic leaves every buffer, the batch counter too, untouched. Written with
    ``torch.where`` so that no host synchronisation is needed on a GPU.
    """
    if num_batches_tracked is not None:
        num_batches_tracked.add_(valid.to(num_batches_tracked.dtype))
    if momentum is None:
        assert num_batches_tracked is not None
        factor = 1.0 / num_batches_tracked.clamp(min=1).to(running_mean.dtype)
    else:
        factor = torch.tensor(momentum, dtype=running_mean.dtype, device=running_mean.device)
    for running, batch in ((running_mean, batch_mean), (running_var, batch_var)):
        batch = torch.nan_to_num(batch.to(running.dtype))
        running.copy_(torch.where(valid, running + factor * (batch - running), running))


def check_spatial_size(length: int, layer: str) -> None:
    """The unbiased instance variance needs at least two elements per (n, c)."""
    if length < 2:
        raise ValueError(
            f"{layer}: the IN scope needs at least 2 spatial elements per channel to compute "
            f"the unbiased instance variance, got a feature map of {length} element(s) (a 1x1 "
            "map divides by L - 1 = 0; the reference implementation silently returns NaN). "
            "Normalize 1x1 maps with SwitchNorm1d on the flattened (N, C) features, or with a "
            "BatchNorm layer; or feed a larger input."
        )


def spatial_size(x: Tensor) -> int:
    return math.prod(x.shape[2:])
