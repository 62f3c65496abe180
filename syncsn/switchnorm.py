"""Switchable Normalization layers, local and synchronized (Luo et al., ICLR 2019).

The modules hold parameters and buffers and check their input; the math is in
:mod:`syncsn.functional` and :mod:`syncsn.function`, the communication in :mod:`syncsn.comm`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import comm
from . import functional as F
from .function import (
    NonFiniteWarning,
    RunningStats,
    SwitchNorm1dFunction,
    SwitchNormFunction,
    SyncSpec,
)

__all__ = [
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "SyncSwitchNorm1d",
    "SyncSwitchNorm2d",
    "SyncSwitchNorm3d",
]


def check_input(x: Tensor, layer: nn.Module, ndims: tuple[int, ...], layout: str) -> None:
    """ValueError / TypeError naming what ``layer`` expects and what it was given."""
    name = type(layer).__name__
    if x.dim() not in ndims:
        dims = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(
            f"{name} expects a {dims} input {layout}, got a {x.dim()}-D input of shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[1] != layer.num_features:
        raise ValueError(
            f"{name}(num_features={layer.num_features}) expects {layer.num_features} channels "
            f"in dimension 1, got an input of shape {tuple(x.shape)} with {x.shape[1]}"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{name} expects a floating-point input (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )


def grad_anchor(x: Tensor, training: bool, sync: SyncSpec) -> Tensor | None:
    """A tensor that makes a Sync layer's output require grad on every rank alike.

    The backward collective runs when a layer's backward runs, which autograd decides from
    requires_grad. Tying it to grad mode and training (the same on all ranks) instead of to
    this rank's input keeps ranks whose inputs differ in requires_grad from hanging.
    """
    if training and sync.active and torch.is_grad_enabled():
        return torch.empty(0, device=x.device, requires_grad=True)
    return None


class _SwitchNorm(nn.Module):
    """Parameters, buffers and argument checks shared by the SN family.

    Parameters: ``weight``, ``bias`` (C,) (None when ``affine=False``) and the switch logits
    ``mean_weight``, ``var_weight`` (K,), one per scope, initialised to ones (1/K each).
    Buffers (when ``using_bn``): ``running_mean`` (C,) zeros, ``running_var`` (C,) ones,
    ``num_batches_tracked``.
    """

    _ndims: tuple[int, ...]
    _layout: str
    scopes: tuple[str, ...]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        using_moving_average: bool = True,
        using_bn: bool = True,
        last_gamma: bool = False,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.using_moving_average = using_moving_average
        self.using_bn = using_bn
        self.last_gamma = last_gamma
        self.affine = affine
        if not using_bn:
            self.scopes = tuple(s for s in self.scopes if s != "bn")
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        k = len(self.scopes)
        self.mean_weight = nn.Parameter(torch.ones(k, **factory))
        self.var_weight = nn.Parameter(torch.ones(k, **factory))
        if using_bn:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._nonfinite = NonFiniteWarning(type(self).__name__)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.using_bn:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.constant_(self.weight, 0.0 if self.last_gamma else 1.0)
            nn.init.zeros_(self.bias)
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, "
            "using_moving_average={using_moving_average}, using_bn={using_bn}, "
            "last_gamma={last_gamma}, affine={affine}".format(**self.__dict__)
        )

    def mixing_weights(self) -> tuple[Tensor, Tensor]:
        """The importance of each scope (K,) for the means and for the variances."""
        return torch.softmax(self.mean_weight, dim=0), torch.softmax(self.var_weight, dim=0)

    def _running_stats(self) -> RunningStats | None:
        if not self.using_bn:
            return None
        momentum = self.momentum if self.using_moving_average else None
        return RunningStats(
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            momentum,
            self._nonfinite,
        )

    def _sync_spec(self) -> SyncSpec:
        return SyncSpec(None, f"{type(self).__name__}({self.num_features})", distributed=False)

    def _check_input(self, x: Tensor) -> None:
        check_input(x, self, self._ndims, self._layout)

    def _forward_weights(self) -> tuple[Tensor, Tensor]:
        """The weights handed to the Function: :meth:`mixing_weights`, or (K - 1,) vectors
        without the last (BN) scope when a subclass knows that scope is unused."""
        return self.mixing_weights()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        w, v = self._forward_weights()
        sync = self._sync_spec()
        return self._function.apply(
            x,
            w,
            v,
            self.weight,
            self.bias,
            self.eps,
            self.training,
            self._running_stats(),
            sync,
            grad_anchor(x, self.training, sync),
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        # The reference implementation stores weight/bias as (1, C, 1, 1) or (1, C) and the
        # running statistics as (1, C, 1) or (1, C), and has no batch counter.
        for name in ("weight", "bias", "running_mean", "running_var"):
            key = prefix + name
            value = state_dict.get(key)
            if value is not None and value.dim() > 1 and value.numel() == self.num_features:
                state_dict[key] = value.reshape(self.num_features)
        counter = prefix + "num_batches_tracked"
        if self.using_bn and counter not in state_dict and prefix + "running_mean" in state_dict:
            state_dict[counter] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)


class _SwitchNormNd(_SwitchNorm):
    """SN over (N, C, *S): scopes IN, LN and (optionally) BN, from instance statistics."""

    scopes = ("in", "ln", "bn")
    _function = SwitchNormFunction

    def _check_input(self, x: Tensor) -> None:
        super()._check_input(x)
        F.check_spatial_size(F.spatial_size(x), type(self).__name__)


class SwitchNorm1d(_SwitchNorm):
    """Switchable Normalization over (N, C) features: scopes LN (over C) and BN (over N).

    As in the reference implementation, both scopes use the unbiased variance.
    """

    scopes = ("ln", "bn")
    _ndims = (2,)
    _layout = "(N, C)"
    _function = SwitchNorm1dFunction

    def __init__(self, num_features: int, *args, **kwargs) -> None:
        if num_features < 2:
            raise ValueError(
                f"{type(self).__name__} needs num_features >= 2: its LN scope is the unbiased "
                f"variance over the features, undefined for {num_features} feature(s)"
            )
        super().__init__(num_features, *args, **kwargs)


class SwitchNorm2d(_SwitchNormNd):
    """Switchable Normalization over (N, C, H, W)."""

    _ndims = (4,)
    _layout = "(N, C, H, W)"


class SwitchNorm3d(_SwitchNormNd):
    """Switchable Normalization over (N, C, D, H, W)."""

    _ndims = (5,)
    _layout = "(N, C, D, H, W)"


class _SyncMixin:
    """Synchronizes the BN scope over ``process_group`` (default: the whole world).

    For any split of a global batch over the ranks, outputs, gradients and running statistics
    equal the local layer on the concatenated batch. One all_gather in forward, one
    all_reduce in backward (training only); nothing in eval or without a process group.
    """

    def __init__(self, *args, process_group: dist.ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group
        self._sync_id = comm.next_layer_id()

    def _sync_spec(self) -> SyncSpec:
        return SyncSpec(
            self.process_group,
            f"{type(self).__name__}({self.num_features})",
            getattr(self, "sync_name", self._sync_id),
        )


class SyncSwitchNorm1d(_SyncMixin, SwitchNorm1d):
    """:class:`SwitchNorm1d` with the BN scope synchronized across ranks."""


class SyncSwitchNorm2d(_SyncMixin, SwitchNorm2d):
    """:class:`SwitchNorm2d` with the BN scope synchronized across ranks."""


class SyncSwitchNorm3d(_SyncMixin, SwitchNorm3d):
    """:class:`SwitchNorm3d` with the BN scope synchronized across ranks."""
