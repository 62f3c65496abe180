"""Segmentation metrics: a confusion matrix summed over all ranks, mIoU and pixel accuracy,
and a sampler that gives each rank a disjoint shard of the validation set so every image
is counted exactly once (DistributedSampler would pad the set with duplicates)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

IGNORE_INDEX = 255


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``range(num_samples)``: the shards of all
    ranks are disjoint and cover the set exactly once (ranks may get one sample less)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def scores(confusion: torch.Tensor) -> dict[str, float | list[float]]:
    """Scores from a (K, K) confusion matrix, rows = ground truth, columns = prediction.

    ``miou`` is the mean IoU over the classes that occur in the ground truth or the
    predictions (a class absent from both has no IoU); ``pixel_acc`` the fraction of
    labelled pixels predicted right; ``iou`` the per-class IoU (NaN where undefined).
    """
    m = confusion.double()
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp
    iou = tp / union  # NaN for classes absent everywhere
    total = m.sum()
    present = union > 0
    return {
        "miou": float(iou[present].mean()) if bool(present.any()) else float("nan"),
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "iou": [float(v) for v in iou],
    }


class ConfusionMatrix:
    """Accumulates a (K, K) int64 confusion matrix over labelled pixels (``target`` not
    ``IGNORE_INDEX``) and the number of images seen."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.num_images = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: (N, H, W) integer class indices (target may hold IGNORE_INDEX)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        k = self.num_classes
        valid = target != IGNORE_INDEX
        t, p = target[valid].long(), pred[valid].long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
            raise ValueError(
                f"target holds labels outside [0, {k}) and != {IGNORE_INDEX}: "
                f"min {int(t.min())}, max {int(t.max())}"
            )
        self.mat += torch.bincount(t * k + p, minlength=k * k).view(k, k).to(self.mat.device)
        self.num_images += target.shape[0]

    def all_reduce(self) -> None:
        """Sums the matrix and image count over all ranks (one collective)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        count = torch.tensor([self.num_images], dtype=torch.int64, device=self.mat.device)
        buf = torch.cat([self.mat.flatten(), count])
        dist.all_reduce(buf)
        self.mat = buf[:-1].view_as(self.mat)
        self.num_images = int(buf[-1])

    def compute(self) -> dict[str, float | list[float] | int]:
        out: dict[str, float | list[float] | int] = dict(scores(self.mat))
        out["num_images"] = self.num_images
        out["num_pixels"] = int(self.mat.sum())
        return out
