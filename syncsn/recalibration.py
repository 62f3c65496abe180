"""Recompute the running statistics of a model's norm layers over many batches ("precise BN").

Running statistics from training are an exponential average over the last few dozen steps of
weights that kept changing. Recalibrating runs the final model over many batches in train mode
without gradients and sets every layer's running statistics to those of all the batches
pooled as one large batch. It is the reference implementation's batch-average helper, done
for every layer kind of this library and synchronized across ranks.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from . import comm
from . import functional as F
from .batchnorm import SyncBatchNorm
from .switchnorm import _SwitchNorm, _SyncMixin

__all__ = ["recalibrate"]


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 200,
    *,
    device: torch.device | str | None = None,
    synchronize: bool = True,
    progress: bool = True,
) -> nn.Module:
    """Set the running statistics of every BN / SN layer to those of ``num_batches`` batches.

    Layers: ``torch.nn.BatchNorm{1,2,3}d``, ``torch.nn.SyncBatchNorm``,
    :class:`syncsn.SyncBatchNorm` and the (Sync)(Sparse)SwitchNorm family, wherever they keep
    running statistics. The model runs in train mode under ``torch.no_grad()``; each layer
    pools the batch statistics it computed over every batch: ``running_mean`` is the mean of
    the batch means and ``running_var`` the pooled variance, the mean of the batch variances
    plus the variance of the batch means (exact for equal-size batches: use
    ``drop_last=True``). ``num_batches_tracked`` becomes the number of batches a layer saw.
    Each module's training flag and each layer's momentum are restored afterwards; a layer
    that saw no batch keeps its statistics, and so does every layer if an error interrupts.

    Distributed (``torch.distributed`` initialized with more than one rank and
    ``synchronize=True``): every rank must call this. The ranks agree on the number of batches
    (the shortest ``batches`` wins, so a Sync layer never waits for a rank that ran out), Sync
    layers pool each step's global batch as in training, and local layers pool the batches of
    all ranks, so every rank ends with the same statistics. ``synchronize=False`` makes no
    collective call of its own (Sync layers still synchronize their forward).

    Args:
        model: the model; ``model(input)`` is called once per batch.
        batches: an iterable of inputs; from an ``(input, target, ...)`` tuple or list only the
            first element is used, as in ``torch.optim.swa_utils.update_bn``.
        num_batches: how many batches to use at most.
        device: if given, each input is moved there first.
        synchronize: see above.
        progress: show progress on rank 0 (tqdm when installed, else a line every 10%).

    Returns:
        ``model``.

    Example::

        >>> loader = DataLoader(train_set, batch_size=2, shuffle=True, drop_last=True)
        >>> syncsn.recalibrate(model, loader, num_batches=200)  # every rank
        >>> model.eval()
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    # _BatchNorm: torch's batch normalization layers and syncsn's, the switchable ones too.
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None
    ]
    if not layers:
        warnings.warn(
            "recalibrate: the model has no normalization layer with running statistics",
            UserWarning,
            stacklevel=2,
        )
        return model
    distributed = synchronize and comm.group_size(None) > 1
    modes = [(m, m.training) for m in model.modules()]
    settings = [(m, m.momentum, getattr(m, "using_moving_average", None)) for _, m in layers]
    originals = {m: [b.clone() for b in _stat_buffers(m)] for _, m in layers}
    recorder = _Recorder()
    handles: list[RemovableHandle] = []
    finished = False
    try:
        for _, m in layers:
            # momentum 1 leaves the batch statistics themselves in the buffers after a forward.
            m.momentum = 1.0
            if isinstance(m, _SwitchNorm):
                m.using_moving_average = True
            handles += recorder.attach(m)
        model.train()
        seen = _run(model, batches, num_batches, device, distributed, progress)
        finished = True
    finally:
        for h in handles:
            h.remove()
        for module, training in modes:
            module.training = training
        for m, momentum, moving in settings:
            m.momentum = momentum
            if isinstance(m, _SwitchNorm) and moving is not None:
                m.using_moving_average = moving
        if not finished:
            _restore(originals)
    if seen < num_batches:
        warnings.warn(
            f"recalibrate: only {seen} batches were available, fewer than num_batches="
            f"{num_batches}",
            UserWarning,
            stacklevel=2,
        )
    local = [m for _, m in layers if not _is_synchronized(m)]
    if distributed and local:
        _merge_across_ranks(local, recorder.pools)
    with torch.no_grad():
        for _, m in layers:
            count, mean, var = pooled_statistics(recorder.pools[m])
            if count == 0:
                _restore({m: originals[m]})
                continue
            running_mean, running_var, tracked = _stat_buffers(m)
            running_mean.copy_(mean)
            running_var.copy_(var)
            tracked.fill_(count)
    return model


# --- the math: batch statistics pooled as one large batch -----------------------------------
# A pool is a partials buffer of syncsn.functional (1 + 2C,), [count, mean, m2], in which each
# batch counts once: a batch with mean m and variance v is the row [1, m, v], and merging the
# rows with the parallel-variance formula gives m2 / count = mean of the batch variances plus
# the variance of the batch means. The pools of all ranks merge the same way, in one
# collective.


def empty_pool(num_features: int, device: torch.device | str | None = None) -> Tensor:
    return torch.zeros(1 + 2 * num_features, dtype=torch.float64, device=device)


def _pack(count: Tensor, mean: Tensor, m2: Tensor) -> Tensor:
    return torch.cat([count.reshape(1), mean, m2])


def add_to_pool_(pool: Tensor, mean: Tensor, var: Tensor, valid: Tensor) -> None:
    """Add one batch's mean and variance (C,) to ``pool``, where the 0-d ``valid``."""
    batch = _pack(torch.ones_like(pool[0]), mean.double(), var.double())
    merged = _pack(*F.merge_partials(torch.stack([pool, batch])))
    pool.copy_(torch.where(valid, merged, pool))


def merge_pools(pools: Tensor) -> Tensor:
    """Merge (R, 1 + 2C) pools into one (1 + 2C,) pool."""
    return _pack(*F.merge_partials(pools))


def pooled_statistics(pool: Tensor) -> tuple[int, Tensor, Tensor]:
    """(count, mean, var): mean of the batch means; mean of the batch variances plus the
    (population) variance of the batch means."""
    c = (pool.numel() - 1) // 2
    count = int(pool[0].item())
    return count, pool[1 : 1 + c], pool[1 + c :] / max(count, 1)


# --- plumbing ------------------------------------------------------------------------------


def _stat_buffers(m: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """running_mean, running_var, num_batches_tracked of a layer that has them."""
    buffers = (
        getattr(m, "running_mean", None),
        getattr(m, "running_var", None),
        getattr(m, "num_batches_tracked", None),
    )
    if not all(isinstance(b, Tensor) for b in buffers):
        raise ValueError(f"recalibrate: {type(m).__name__} has no running statistics")
    return cast(tuple[Tensor, Tensor, Tensor], buffers)


def _restore(originals: Mapping[_BatchNorm, list[Tensor]]) -> None:
    with torch.no_grad():
        for m, saved in originals.items():
            for buf, value in zip(_stat_buffers(m), saved, strict=True):
                buf.copy_(value)


def _is_synchronized(m: nn.Module) -> bool:
    return isinstance(m, (_SyncMixin, SyncBatchNorm, nn.SyncBatchNorm))


class _Recorder:
    """Forward hooks that add each batch's statistics of a layer to its pool."""

    def __init__(self) -> None:
        self.pools: dict[nn.Module, Tensor] = {}
        self._counters: dict[nn.Module, Tensor] = {}

    def attach(self, m: _BatchNorm) -> list[RemovableHandle]:
        self.pools[m] = empty_pool(m.num_features, _stat_buffers(m)[0].device)
        return [m.register_forward_pre_hook(self.before), m.register_forward_hook(self.after)]

    def before(self, m: nn.Module, args: tuple) -> None:
        # Zeroed buffers and momentum 1: running + 1 * (batch - running) is the batch value.
        mean, var, tracked = _stat_buffers(m)
        mean.zero_()
        var.zero_()
        self._counters[m] = tracked.clone()

    def after(self, m: nn.Module, args: tuple, output: Any) -> None:
        # A layer skips the update for an empty or non-finite batch; its counter tells.
        mean, var, tracked = _stat_buffers(m)
        valid = tracked != self._counters.pop(m)
        add_to_pool_(self.pools[m], mean, var, valid)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _run(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    device: torch.device | str | None,
    distributed: bool,
    progress: bool,
) -> int:
    """Feed up to ``num_batches`` batches; return how many every rank fed."""
    main = comm.group_size(None) == 1 or dist.get_rank() == 0
    bar = _Progress(num_batches, enabled=progress and main)
    iterator = iter(batches)
    seen = 0
    batch: Any
    with torch.no_grad():
        while seen < num_batches:
            batch = next(iterator, _END)
            if distributed:
                # One tiny all-reduce per step: stop everyone as soon as any rank runs out.
                more = torch.tensor([0 if batch is _END else 1], device=_collective_device())
                dist.all_reduce(more, op=dist.ReduceOp.MIN)
                if not bool(more.item()):
                    break
            elif batch is _END:
                break
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            if device is not None:
                batch = batch.to(device)
            model(batch)
            seen += 1
            bar.update(seen)
    bar.close()
    return seen


_END = object()


def _merge_across_ranks(layers: Sequence[nn.Module], pools: dict[nn.Module, Tensor]) -> None:
    """Replace each local layer's pool by the merge of every rank's (one all_gather)."""
    flat = torch.cat([pools[m].to(_collective_device()) for m in layers])
    gathered = comm.all_gather_stacked(flat, None)
    offset = 0
    for m in layers:
        size = pools[m].numel()
        pools[m] = merge_pools(gathered[:, offset : offset + size]).to(pools[m].device)
        offset += size


class _Progress:
    """tqdm when installed, else a plain line every 10% of the batches."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.bar = total, enabled, None
        self.every = max(1, total // 10)
        if enabled and importlib.util.find_spec("tqdm") is not None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="recalibrate", unit="batch")

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and (done % self.every == 0 or done == self.total):
            print(f"recalibrate: {done}/{self.total} batches", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
