"""Tooling for the segmentation example: learning-rate schedule, resumable sampling,
atomic and checksummed checkpoints, preemption signals, the progress display and the plots."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import struct
import sys
import time
import warnings
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


def atomic_save(obj: Any, path: str, previous: str | None = None) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace: a
    crash at any point leaves either the previous file or the new one, never a torn one.

    previous: where to keep the file that ``path`` held until now (a hard link, or a copy
    where the filesystem has none), so that one damaged checkpoint never leaves a run with
    nothing to resume from. ``path`` exists, old or new, at every moment.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and os.path.exists(path):
            _replace_with_link(path, previous)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _replace_with_link(src: str, dst: str) -> None:
    """Makes ``dst`` a second name of ``src``'s contents, replacing ``dst`` atomically."""
    tmp = f"{dst}.tmp.{os.getpid()}"
    try:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network or FAT filesystems)
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_dir(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames themselves durable
    finally:
        os.close(dir_fd)


def remove_partial_files(directory: str, names: Sequence[str]) -> list[str]:
    """Deletes the ``<name>.tmp.<pid>`` files that a killed :func:`atomic_save` or
    :func:`write_jsonl` left behind (they are never complete); returns their names."""
    if not os.path.isdir(directory):
        return []
    prefixes = tuple(f"{name}.tmp." for name in names)
    removed = sorted(e for e in os.listdir(directory) if e.startswith(prefixes))
    for entry in removed:
        os.remove(os.path.join(directory, entry))
    return removed


def move_aside(directory: str, names: Sequence[str]) -> str:
    """Moves the files ``names`` of ``directory`` into a new folder
    ``<directory>/set-aside/<YYYYmmdd-HHMMSS>[-N]`` and returns that folder's path."""
    base = os.path.join(directory, "set-aside", time.strftime("%Y%m%d-%H%M%S"))
    dest, n = base, 1
    while os.path.exists(dest):
        dest, n = f"{base}-{n}", n + 1
    os.makedirs(dest)
    for name in names:
        os.replace(os.path.join(directory, name), os.path.join(dest, name))
    _fsync_dir(directory)
    return dest


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file; [] when it does not exist."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not a JSON object ({e})") from None
    return rows


def write_jsonl(path: str, rows: Sequence[Mapping]) -> None:
    """Writes ``rows`` as JSON lines through a temporary file and os.replace."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------
# Checkpoint integrity
# --------------------------------------------------------------------------------------

#: Key of the integrity record in a checkpoint dictionary.
INTEGRITY_KEY = "integrity"


class CheckpointError(Exception):
    """A checkpoint file that cannot be used: missing, empty, unreadable, damaged or not a
    checkpoint of this example. ``str()`` names the file and what is wrong with it."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"checkpoint {path} {problem}")
        self.path, self.problem = path, problem


def _feed(h: Any, obj: Any) -> None:
    """Hashes ``obj`` with its type and structure, so that equal digests mean equal contents
    (a 1 and a 1.0, or a list and a tuple, differ)."""
    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"T" if obj else b"F")
    elif isinstance(obj, int):
        h.update(b"i%d;" % obj)
    elif isinstance(obj, float):
        h.update(b"f" + struct.pack("<d", obj))
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"s%d;" % len(data) + data)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        meta = f"{t.dtype}{tuple(t.shape)}".encode()
        h.update(b"t%d;" % len(meta) + meta)
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, (list, tuple)):
        h.update(b"%s%d;" % (b"l" if isinstance(obj, list) else b"u", len(obj)))
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, Mapping):
        h.update(b"d%d;" % len(obj))
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__} in a checkpoint")


def content_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's contents (every tensor's bytes, dtype and shape, every
    number and string), leaving out the integrity record itself.

    It is computed on the objects, not on the file: a checkpoint loads with a plain
    ``torch.load`` as before, and any change to what the training would read changes it.
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != INTEGRITY_KEY})
    return h.hexdigest()


def with_integrity(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` plus its integrity record, ready for :func:`atomic_save`."""
    return {**state, INTEGRITY_KEY: {"sha256": content_digest(state)}}


def load_checkpoint(path: str, required: Sequence[str] = ()) -> dict[str, Any]:
    """Loads a checkpoint written with :func:`with_integrity` onto the CPU and checks it.

    Raises CheckpointError, naming the file, when it is missing, empty, unreadable (torn or
    random bytes), not a dictionary, lacks one of the ``required`` entries, or when its
    contents differ from its checksum. A checkpoint without an integrity record (an older
    version of this example wrote none) loads with a warning.
    """
    if not os.path.isfile(path):
        raise CheckpointError(path, "does not exist")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(path, "is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for torn or foreign files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            path, f"cannot be read ({size} bytes; torch.load: {reason}): truncated or damaged"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"holds a {type(state).__name__}, not a checkpoint dictionary")
    record = state.get(INTEGRITY_KEY)
    if record is None:
        warnings.warn(
            f"checkpoint {path} has no integrity record (written by an older version of this "
            "example): its contents cannot be verified",
            stacklevel=2,
        )
    else:
        expected = record.get("sha256") if isinstance(record, Mapping) else None
        actual = content_digest(state)
        if expected != actual:
            raise CheckpointError(
                path,
                f"is damaged: its contents do not match the checksum written with it (sha256 "
                f"{str(expected)[:16]}..., contents {actual[:16]}...); the file changed after "
                "it was written",
            )
    missing = [key for key in required if key not in state]
    if missing:
        listed = ", ".join(map(repr, missing))
        raise CheckpointError(path, f"lacks {listed}: not a training checkpoint of this example")
    return state


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
            try:
                from tqdm import tqdm
            except ImportError:  # optional (the examples extra): log lines instead
                tqdm = None
            if tqdm is not None:
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
