"""Synchronized Batch Normalization: a drop-in for torch.nn.SyncBatchNorm that also runs on CPU."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import comm
from .function import BatchNormFunction, NonFiniteWarning, RunningStats, SyncSpec
from .switchnorm import check_input, grad_anchor

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNorm):
    """Batch Normalization over (N, C, *S) input, 2-D to 5-D, with statistics of all ranks.

    Same constructor and state dict as :class:`torch.nn.SyncBatchNorm`. For any split of a
    global batch over the ranks of ``process_group``, equals :class:`torch.nn.BatchNorm2d`
    (1d/3d) on the union of all ranks' elements: outputs, input gradients, summed parameter
    gradients and running statistics (unbiased running_var from the global count). Works with
    gloo on CPU and NCCL on CUDA; one all_gather in forward, one all_reduce of 2C values in
    backward, none in eval (with running statistics) or without a process group.
    """

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
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group
        self._sync_id = comm.next_layer_id()
        self._nonfinite = NonFiniteWarning(type(self).__name__)

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(input, self, (2, 3, 4, 5), "(N, C) or (N, C, *S) with up to 3 spatial dims")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            return TF.batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )
        stats = None
        if self.training and self.track_running_stats:
            stats = RunningStats(
                self.running_mean,
                self.running_var,
                self.num_batches_tracked,
                self.momentum,
                self._nonfinite,
            )
        # Eval mode never communicates, even on batch statistics (as torch.nn.SyncBatchNorm).
        sync = SyncSpec(
            self.process_group,
            f"SyncBatchNorm({self.num_features})",
            getattr(self, "sync_name", self._sync_id),
            distributed=self.training,
        )
        return BatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            self.eps,
            stats,
            sync,
            grad_anchor(input, self.training, sync),
        )
