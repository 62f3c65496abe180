"""Synchronized Batch Normalization: a drop-in for torch.nn.SyncBatchNorm that also runs on CPU."""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch import Tensor, nn

from . import _args, comm
from .function import BatchNormFunction, layer_call, next_layer_key
from .kernels import ops
from .switchnorm import check_input, fold_running_now, grad_anchor

__all__ = ["SyncBatchNorm"]

# torch 2.13 added a keyword-only ``bias`` to the BatchNorm constructors; the constructor
# here follows the installed torch's exactly.
TORCH_HAS_BIAS = "bias" in inspect.signature(nn.SyncBatchNorm.__init__).parameters


class SyncBatchNorm(nn.SyncBatchNorm):
    r"""Batch Normalization over a 2-D to 5-D input with the statistics of all ranks.

    A subclass of :class:`torch.nn.SyncBatchNorm` with the same constructor, parameters,
    buffers and state dict, that also runs on CPU with gloo (torch's refuses CPU tensors):

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    with the mean and (biased) variance over the N and spatial dimensions of the input of
    every rank of ``process_group``. For any split of a global batch over the ranks, outputs,
    input gradients, parameter gradients (summed over ranks) and running statistics equal
    :class:`torch.nn.BatchNorm2d` (1d / 3d) on the union of the ranks' elements; the running
    variance is unbiased with the global count. One ``all_gather`` in forward and one
    ``all_reduce`` of 2C values in backward, in training mode only; none in eval mode (with
    or without running statistics, as torch's), in a group of one rank, or without a process
    group.

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, +)`.
        eps: a value added to the variance for numerical stability. Default: 1e-5
        momentum: the weight of the current batch in the running statistics,
            ``running = (1 - momentum) * running + momentum * batch``; None for the
            cumulative average. Default: 0.1
        affine: learnable per-channel ``weight`` and ``bias``. Default: True
        track_running_stats: keep running statistics and use them in eval mode; False: no
            running buffers, batch statistics in eval mode too. Default: True
        process_group: the ranks whose elements the statistics cover; None: the whole world
            once ``torch.distributed`` is initialized. Default: None
        device: device of the parameters and buffers. Default: None
        dtype: dtype of the parameters and buffers. Default: None
        bias: (with torch >= 2.13, keyword-only) a learnable ``bias``; False: ``bias`` is
            None, as in torch. Default: True

    Shape:
        - Input: :math:`(N, C, +)`, 2-D to 5-D
        - Output: :math:`(N, C, +)` (same shape as input)

    Both converters give this layer: :meth:`convert_sync_batchnorm` (this class's) and
    :func:`syncsn.convert_sync_batchnorm`; torch's
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` leaves it as it is.

    Examples::

        >>> bn = syncsn.SyncBatchNorm(100)  # the whole world, once initialized
        >>> output = bn(torch.randn(8, 100, 35, 45))
        >>> model = syncsn.SyncBatchNorm.convert_sync_batchnorm(model)  # every BatchNorm*d
    """

    if TORCH_HAS_BIAS:

        def __init__(
            self,
            num_features: int,
            eps: float = 1e-5,
            momentum: float | None = 0.1,
            affine: bool = True,
            track_running_stats: bool = True,
            process_group: dist.ProcessGroup | None = None,
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
            *,
            bias: bool = True,
        ) -> None:
            _check_arguments(
                type(self).__name__,
                num_features,
                eps,
                momentum,
                affine,
                track_running_stats,
                process_group,
                bias,
            )
            super().__init__(
                num_features,
                eps,
                momentum,
                affine,
                track_running_stats,
                process_group,
                device,
                dtype,
                bias=bias,
            )
            self._syncsn_init()

    else:

        def __init__(  # type: ignore[misc]
            self,
            num_features: int,
            eps: float = 1e-5,
            momentum: float | None = 0.1,
            affine: bool = True,
            track_running_stats: bool = True,
            process_group: dist.ProcessGroup | None = None,
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
        ) -> None:
            _check_arguments(
                type(self).__name__,
                num_features,
                eps,
                momentum,
                affine,
                track_running_stats,
                process_group,
                True,
            )
            super().__init__(
                num_features,
                eps,
                momentum,
                affine,
                track_running_stats,
                process_group,
                device,
                dtype,
            )
            self._syncsn_init()

    def _syncsn_init(self) -> None:
        self._sync_id = comm.next_layer_id()
        self._layer_key = next_layer_key()

    @classmethod
    def convert_sync_batchnorm(
        cls, module: nn.Module, process_group: dist.ProcessGroup | None = None
    ) -> nn.Module:
        """Make every BatchNorm layer of ``module`` a :class:`syncsn.SyncBatchNorm`.

        Same call as :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`; this is
        :func:`syncsn.convert_sync_batchnorm`: ``BatchNorm{1,2,3}d`` and
        ``torch.nn.SyncBatchNorm`` layers are replaced (sharing their parameters and
        buffers), existing :class:`SyncBatchNorm` layers get ``process_group``, switchable
        layers are left alone.

        Args:
            module: the model, converted in place.
            process_group: the group the layers synchronize over; None: the whole world.

        Returns:
            The converted module: ``module`` itself, or a new layer when ``module`` is a
            BatchNorm layer.

        Example::

            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
            >>> model = syncsn.SyncBatchNorm.convert_sync_batchnorm(model)
            >>> type(model[1]).__name__
            'SyncBatchNorm'
        """
        from .convert import convert_sync_batchnorm

        return convert_sync_batchnorm(module, process_group)

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(input, self, (2, 3, 4, 5), "(N, C) or (N, C, *S) with up to 3 spatial dims")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if comm.debug_enabled() and not torch.compiler.is_compiling():
            # Every call, train or eval, before anything that communicates.
            comm.check_same_layer(
                f"SyncBatchNorm({self.num_features})",
                comm.sync_identity(self),
                self.process_group,
                input.device,
                training=self.training,
            )
        if not self.training and self.track_running_stats:
            return TF.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False,
                0.0, self.eps,
            )  # fmt: skip
        # Eval mode never communicates, even on batch statistics (as torch.nn.SyncBatchNorm).
        group, world = comm.sync_target(self.process_group) if self.training else (None, 1)
        identity = comm.sync_identity(self)
        name = f"'{identity}'" if isinstance(identity, str) else f"#{identity}"
        call = layer_call(
            f"SyncBatchNorm({self.num_features}) {name}",
            self._layer_key,
            self.training,
            self.eps,
            self.momentum,
            0,
            group,
            world,
            fold_running_now(),
            ops.plain_eager(),
        )
        tracked = self.training and self.track_running_stats
        return BatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.num_batches_tracked if tracked else None, call, grad_anchor(input, call),
        )  # fmt: skip


def _check_arguments(
    name: str,
    num_features: object,
    eps: object,
    momentum: object,
    affine: object,
    track_running_stats: object,
    process_group: object,
    bias: object,
) -> None:
    _args.check_num_features(name, num_features)
    _args.check_eps(name, eps)
    _args.check_momentum(name, momentum)
    _args.check_bool(name, "affine", affine)
    _args.check_bool(name, "track_running_stats", track_running_stats)
    _args.check_process_group(name, process_group)
    _args.check_bool(name, "bias", bias)
