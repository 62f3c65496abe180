"""Tooling for the segmentation example: learning-rate schedule, resumable sampling,
atomic checkpoints, preemption signals, the progress display and the plots."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DistributedSampler, Sampler

# --------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, warmup_decay: float = 0.01, power: float = 0.9
) -> float:
    """Multiplier of the base learning rate at iteration ``step`` (0-based): linear warm-up
    from ``warmup_decay`` to 1 over ``warmup_steps``, then poly decay
    ``(1 - t) ** power`` to 0 over the remaining iterations."""
    if step < warmup_steps:
        return warmup_decay + (1.0 - warmup_decay) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 1.0 - t) ** power


class ResumableSampler(Sampler[int]):
    """Wraps a DistributedSampler so that an epoch interrupted after ``skip`` batches can be
    resumed where it stopped: same permutation (``set_epoch``), first batches skipped."""

    def __init__(self, sampler: DistributedSampler, batch_size: int) -> None:
        self.sampler, self.batch_size, self.skip = sampler, batch_size, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace: a
    crash at any point leaves either the previous file or the new one, never a torn one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, rows: Sequence[Mapping]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------


class StopRequest:
    """Records SIGTERM / SIGUSR1 (cluster preemption) instead of dying, so the training
    loop can finish its step, write a checkpoint and exit. The handler only sets a flag:
    raising inside it could interrupt a collective half-way on one rank."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        for s in self.SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            print(
                f"[pid {os.getpid()}] received {signal.Signals(signum).name}: "
                "stopping after this step",
                file=sys.stderr,
                flush=True,
            )

    @property
    def requested(self) -> bool:
        return self.signum is not None


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: launchers signal the whole process group (torchrun's
    killpg, Slurm's scancel), and a data worker dying of SIGTERM would raise in the main
    process at an arbitrary point. Workers ignore the signals and exit with their parent."""
    for s in StopRequest.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


# --------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Rank-0 progress of one epoch with the ETA of the epoch and of the whole run.

    On a terminal it is a tqdm bar; in a log file (not a TTY) it prints one line every
    ``print_freq`` steps, which reads better than carriage-return updates.
    """

    def __init__(
        self,
        desc: str,
        total: int,
        start: int,
        steps_left_after_epoch: int,
        print_freq: int,
        enabled: bool,
    ) -> None:
        self.desc, self.total, self.done = desc, total, start
        self.after, self.print_freq, self.enabled = steps_left_after_epoch, print_freq, enabled
        self.t0, self.start = time.perf_counter(), start
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)

    def update(self, **values: float) -> None:
        self.done += 1
        if not self.enabled:
            return
        per_step = (time.perf_counter() - self.t0) / (self.done - self.start)
        eta_run = _fmt_time(per_step * (self.total - self.done + self.after))
        shown = {k: f"{v:.4g}" for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(**shown, eta_run=eta_run, refresh=False)
            self.bar.update(1)
        elif self.done % self.print_freq == 0 or self.done == self.total:
            eta = _fmt_time(per_step * (self.total - self.done))
            fields = " ".join(f"{k} {v}" for k, v in shown.items())
            print(
                f"{self.desc} [{self.done}/{self.total}] {fields} "
                f"{per_step:.3f}s/it eta {eta} (run {eta_run})",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------
# Plots (matplotlib with the Agg backend: no display needed)
# --------------------------------------------------------------------------------------


def plot_curves(rows: Sequence[Mapping], path: str) -> None:
    """Training loss and validation mIoU / pixel accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax0.plot(epochs, [r["train_loss"] for r in rows], "o-")
    ax0.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax1.plot(epochs, [r["miou"] for r in rows], "o-", label="mIoU")
    ax1.plot(epochs, [r["pixel_acc"] for r in rows], "s--", label="pixel accuracy")
    ax1.set(xlabel="epoch", ylim=(0, 1), title="validation")
    ax1.legend()
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_switch_weights(weights: Mapping[str, Mapping[str, Sequence[float]]], path: str) -> None:
    """Per layer, the IN/LN/BN importance of the mean and of the variance as stacked
    horizontal bars (the way the Switchable Normalization paper draws them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(weights)
    scopes = ("IN", "LN", "BN")
    colours = ("tab:orange", "tab:green", "tab:blue")
    height = max(3.0, 0.18 * len(names) + 1.2)
    fig, axes = plt.subplots(1, 2, figsize=(10, height), sharey=True)
    for ax, kind in zip(axes, ("mean", "var"), strict=True):
        left = [0.0] * len(names)
        for k, (scope, colour) in enumerate(zip(scopes, colours, strict=True)):
            # None: the layer has no such scope.
            vals = [float(weights[n][kind][k] or 0.0) for n in names]
            ax.barh(range(len(names)), vals, left=left, color=colour, label=scope)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.set(xlim=(0, 1), title=f"importance of the {kind}s")
        ax.invert_yaxis()
    axes[0].set_yticks(range(len(names)), names, fontsize=6)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
