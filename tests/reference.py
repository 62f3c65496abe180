"""Independent float64 transcriptions of Switchable Normalization for the tests.

Written straight from the equations of the specification with plain differentiable torch
ops, so autograd on them gives reference gradients. Nothing here imports the library.
Callers pass float64 tensors; every function is pure (running statistics are returned, not
updated in place).

Two transcriptions:

- ``sn_forward`` / ``sn1d_forward``: the semantics the library implements (README, Semantics).
- ``original_sn2d_eval`` / ``original_sn1d_eval``: the eval-mode forward of the original
  authors' layer, with its own parameter layout ((1, C, 1, 1) / (1, C) affine parameters,
  (1, C, 1) / (1, C) running statistics) and its own LN formula, used to check that state
  dicts saved by that layer load into ours and give the same output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class BatchStats:
    """Batch-scope statistics of one training step, shape (C,)."""

    mean: Tensor
    var: Tensor


def instance_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and unbiased variance.

    x: (N, C, *S) with L = prod(S) >= 2. Returns two (N, C) tensors; the variance divides
    by L - 1.
    """
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    length = flat.shape[-1]
    mean = flat.sum(-1) / length
    var = ((flat - mean.unsqueeze(-1)) ** 2).sum(-1) / (length - 1)
    return mean, var


def _mix(weights: Tensor, stats: list[Tensor]) -> Tensor:
    """sum_k weights[k] * stats[k], each stat broadcast to (N, C)."""
    out = weights[0] * stats[0]
    for k in range(1, len(stats)):
        out = out + weights[k] * stats[k]
    return out


def sn_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean_logits: Tensor,
    var_logits: Tensor,
    *,
    eps: float,
    training: bool,
    using_bn: bool = True,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
) -> tuple[Tensor, BatchStats | None]:
    """Switchable Normalization for (N, C, *S) input (the 2d and 3d layers).

    Scopes ordered (IN, LN, BN), all derived from instance statistics:
      IN: mu_in, var_in (unbiased over the L positions)
      LN: mu_ln[n] = mean_c mu_in; var_ln[n] = mean_c var_in + mean_c (mu_in - mu_ln)^2
      BN: mu_bn[c] = mean_n mu_in; var_bn[c] = mean_n var_in + mean_n (mu_in - mu_bn)^2
          in training, running_mean / running_var (C,) in eval.
    y = weight * (x - mu) / sqrt(var + eps) + bias with mu, var the softmax mixtures.

    Returns y (shape of x) and, in training with the BN scope, the batch statistics that
    feed the running averages.
    """
    n, c = x.shape[:2]
    mu_in, var_in = instance_stats(x)
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = var_in.mean(1, keepdim=True) + ((mu_in - mu_ln) ** 2).mean(1, keepdim=True)
    means = [mu_in, mu_ln]
    variances = [var_in, var_ln]
    batch = None
    if using_bn:
        if training:
            mu_bn = mu_in.mean(0, keepdim=True)
            var_bn = var_in.mean(0, keepdim=True) + ((mu_in - mu_bn) ** 2).mean(0, keepdim=True)
            batch = BatchStats(mu_bn.reshape(c), var_bn.reshape(c))
        else:
            mu_bn = running_mean.reshape(1, c)
            var_bn = running_var.reshape(1, c)
        means.append(mu_bn)
        variances.append(var_bn)
    mu = _mix(torch.softmax(mean_logits, 0), means)
    var = _mix(torch.softmax(var_logits, 0), variances)
    return _affine(x, mu, var, weight, bias, eps), batch


def sn1d_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean_logits: Tensor,
    var_logits: Tensor,
    *,
    eps: float,
    training: bool,
    using_bn: bool = True,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
) -> tuple[Tensor, BatchStats | None]:
    """Switchable Normalization for (N, C) input: scopes (LN, BN).

    LN: mean and unbiased variance over the C features of each sample (divides by C - 1).
    BN: mean and unbiased variance over the N samples of each feature (divides by N - 1)
    in training; running_mean / running_var in eval.
    """
    n, c = x.shape
    mu_ln = x.mean(1, keepdim=True)
    var_ln = ((x - mu_ln) ** 2).sum(1, keepdim=True) / (c - 1)
    means = [mu_ln]
    variances = [var_ln]
    batch = None
    if using_bn:
        if training:
            mu_bn = x.mean(0, keepdim=True)
            var_bn = ((x - mu_bn) ** 2).sum(0, keepdim=True) / (n - 1)
            batch = BatchStats(mu_bn.reshape(c), var_bn.reshape(c))
        else:
            mu_bn = running_mean.reshape(1, c)
            var_bn = running_var.reshape(1, c)
        means.append(mu_bn)
        variances.append(var_bn)
    mu = _mix(torch.softmax(mean_logits, 0), means)
    var = _mix(torch.softmax(var_logits, 0), variances)
    return _affine(x, mu, var, weight, bias, eps), batch


def _affine(
    x: Tensor, mu: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """weight * (x - mu) / sqrt(var + eps) + bias with (N, C) mu/var and (C,) weight/bias."""
    extra = (1,) * (x.dim() - 2)
    mu = mu.reshape(*mu.shape, *extra)
    var = var.reshape(*var.shape, *extra)
    y = (x - mu) / torch.sqrt(var + eps)
    channel_shape = (1, x.shape[1], *extra)
    if weight is not None:
        y = y * weight.reshape(channel_shape)
    if bias is not None:
        y = y + bias.reshape(channel_shape)
    return y


def update_running(
    running: Tensor, batch_stat: Tensor, momentum: float | None, num_batches_tracked: int
) -> Tensor:
    """PyTorch's running-average rule, returning the new value.

    momentum given: (1 - momentum) * running + momentum * batch_stat.
    momentum None: cumulative average, where num_batches_tracked already counts this batch.
    """
    factor = 1.0 / num_batches_tracked if momentum is None else momentum
    return (1.0 - factor) * running + factor * batch_stat


def original_sn2d_eval(x: Tensor, state: dict[str, Tensor], eps: float) -> Tensor:
    """Eval-mode forward of the original authors' 2d layer, from its own state dict.

    state: weight, bias (1, C, 1, 1); mean_weight, var_weight (3,) or (2,) logits; with
    three scopes running_mean, running_var (1, C, 1). The original computes the LN
    variance as mean_c(var_in + mu_in^2) - mu_ln^2 and mixes with the running statistics
    in eval mode.
    """
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    mu_in = flat.mean(-1, keepdim=True)  # (N, C, 1)
    var_in = flat.var(-1, keepdim=True)  # unbiased
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = (var_in + mu_in**2).mean(1, keepdim=True) - mu_ln**2
    mw = torch.softmax(state["mean_weight"], 0)
    vw = torch.softmax(state["var_weight"], 0)
    mu = mw[0] * mu_in + mw[1] * mu_ln
    var = vw[0] * var_in + vw[1] * var_ln
    if mw.numel() == 3:
        mu = mu + mw[2] * state["running_mean"]
        var = var + vw[2] * state["running_var"]
    y = ((flat - mu) / (var + eps).sqrt()).reshape(x.shape)
    return y * state["weight"] + state["bias"]


def original_sn1d_eval(x: Tensor, state: dict[str, Tensor], eps: float) -> Tensor:
    """Eval-mode forward of the original authors' 1d layer, from its own state dict.

    state: weight, bias, running_mean, running_var (1, C); mean_weight, var_weight (2,)
    logits ordered (LN, BN).
    """
    mu_ln = x.mean(1, keepdim=True)
    var_ln = x.var(1, keepdim=True)
    mw = torch.softmax(state["mean_weight"], 0)
    vw = torch.softmax(state["var_weight"], 0)
    mu = mw[0] * mu_ln + mw[1] * state["running_mean"]
    var = vw[0] * var_ln + vw[1] * state["running_var"]
    y = (x - mu) / (var + eps).sqrt()
    return y * state["weight"] + state["bias"]
