"""Tooling for the segmentation example: learning-rate schedule, resumable sampling,
atomic and checksummed checkpoints, preemption signals, the progress display and the plots."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import torch
from torch.utils.data import Sampler

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
    """The training samples of one rank, epoch by epoch, resumable at any point of an
    epoch at any world size and batch size.

    Each epoch has one global order: the permutation of the dataset drawn from
    ``seed + epoch`` (DistributedSampler's, whatever the world size). A step trains its next
    ``world_size * batch_size`` samples, rank ``r`` taking the ``r``-th, ``(r + world_size)``-th,
    ... of them, so the samples trained after any number of steps are a prefix of that order:
    their count is a position in the epoch that means the same at every world size and batch
    size.

    A fresh epoch trains whole steps only: the tail of the order that does not fill one
    (fewer than ``world_size * batch_size`` samples) is left out, as
    ``DataLoader(drop_last=True)`` leaves it out. ``set_epoch(epoch, start, end)`` resumes an
    epoch after ``start`` samples and ends it at ``end`` (where the interrupted run would have
    ended it); when what is left does not fill whole steps of this world size and batch size,
    the last step is smaller: it splits the leftover evenly over the ranks (the fewer than
    ``world_size`` samples that do not split are left out), provided each rank gets at least
    ``min_batch`` samples (the smallest batch the model's normalization trains on); otherwise
    the leftover is left out. :attr:`left_out` counts what is left out of ``[start, end)``.

    Example: 24 samples; 1 rank of 6 images stopped after one step (6 samples), resumed with
    4 images a step::

        >>> s = ResumableSampler(24, rank=0, world_size=1, batch_size=4, seed=0)
        >>> s.set_epoch(0, start=6, end=24)
        >>> s.steps, s.last_batch, len(s), s.left_out  # 4 steps of 4, then one of 2
        (5, 2, 18, 0)
    """

    def __init__(
        self,
        num_samples: int,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        min_batch: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if not 1 <= min_batch <= batch_size:
            raise ValueError(f"min_batch must be in [1, {batch_size}], got {min_batch}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.batch_size, self.seed, self.min_batch = batch_size, seed, min_batch
        self.set_epoch(0)

    @property
    def step_size(self) -> int:
        """Samples of one whole step, over all ranks."""
        return self.world_size * self.batch_size

    def order(self, epoch: int) -> list[int]:
        """The global order of ``epoch``: the same list on every rank and world size."""
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def set_epoch(self, epoch: int, start: int = 0, end: int | None = None) -> None:
        """Iterate ``epoch`` from sample ``start`` of its order (0: the whole epoch) up to
        sample ``end`` (None: where a fresh epoch of this world size and batch size ends)."""
        if end is None:
            end = self.num_samples // self.step_size * self.step_size
        if not 0 <= end <= self.num_samples:
            raise ValueError(f"end must be in [0, {self.num_samples}], got {end}")
        if not 0 <= start <= end:
            raise ValueError(f"start must be in [0, {end}], got {start}")
        self.epoch, self.start, self.end = epoch, start, end
        whole, leftover = divmod(end - start, self.step_size)
        last = leftover // self.world_size
        # A step of fewer samples per rank than the normalization trains on would fail.
        self.last_batch = last if last >= self.min_batch else 0
        self.steps = whole + (1 if self.last_batch else 0)
        self.stop = start + whole * self.step_size + self.last_batch * self.world_size

    @property
    def left_out(self) -> int:
        """Samples of ``[start, end)`` that this epoch does not train."""
        return self.end - self.stop

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start + self.rank : self.stop : self.world_size])

    def __len__(self) -> int:
        return (self.stop - self.start) // self.world_size


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


# Temporary files are hidden, carry this marker and name their writer (host and pid) and a
# random token: ``.<name>.syncsn-tmp.<host>.<pid>.<token>``. No user file looks like that,
# and the writer can be checked dead before its leftovers are removed.
_TMP_MARKER = ".syncsn-tmp."
_TMP_NAME = re.compile(
    r"^\.(?P<name>.+?)" + re.escape(_TMP_MARKER) + r"(?P<host>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}$"
)


def temporary_path(path: str) -> str:
    """A fresh temporary name next to ``path`` that only this process uses."""
    directory, name = os.path.split(path)
    tmp = f".{name}{_TMP_MARKER}{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
    return os.path.join(directory, tmp)


class WriteError(OSError):
    """An OSError of a write into a run's directory (a file written, replaced, moved or
    removed; the directory or its lock created), naming the file. Errors of reads stay
    plain OSErrors, so that a message can say which of the two failed."""


def _name_the_file(error: OSError, path: str) -> WriteError:
    """The error of a write, reported as a WriteError for the file it was to become (a
    temporary file's name means nothing to a user, and a write that fails on a file
    object, such as ENOSPC, carries no file name at all)."""
    return WriteError(error.errno, error.strerror or str(error), path)


def _os_error_behind(error: BaseException) -> OSError | None:
    """The OSError that ``error`` was raised while handling, if any: torch.save reports a
    failed write (a full disk) as a RuntimeError of its zip writer raised on top of it."""
    seen = error.__context__
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__context__
    return seen


def atomic_write(path: str, write: Callable[[BinaryIO], Any], previous: str | None = None) -> None:
    """Calls ``write(f)`` on a temporary file in the same directory, fsyncs it, then
    renames it to ``path``: a crash or a full disk at any point leaves either the previous
    file or the new one, never a torn one. An OSError names ``path``.

    previous: where to keep the file that ``path`` held until now (a hard link, or a copy
    where the filesystem has none), so that one damaged checkpoint never leaves a run with
    nothing to resume from. ``path`` exists, old or new, at every moment.
    """
    tmp, created = temporary_path(path), False
    try:
        with open(tmp, "xb") as f:
            created = True  # from here on, tmp is this call's to remove
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and os.path.exists(path):
            _replace_with_link(path, previous)
        os.replace(tmp, path)
        created = False
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except WriteError:
        raise
    except OSError as e:
        raise _name_the_file(e, path) from None
    except RuntimeError as e:
        cause = _os_error_behind(e)
        if cause is None:
            raise
        raise _name_the_file(cause, path) from None
    finally:
        if created:
            _remove_quietly(tmp)


def atomic_save(obj: Any, path: str, previous: str | None = None) -> None:
    """torch.save through :func:`atomic_write` (``previous``: see there)."""
    atomic_write(path, lambda f: torch.save(obj, f), previous)


def _replace_with_link(src: str, dst: str) -> None:
    """Makes ``dst`` a second name of ``src``'s contents, replacing ``dst`` atomically."""
    tmp, created = temporary_path(dst), False
    try:
        try:
            os.link(src, tmp)
            created = True
        except FileExistsError:  # another process's file: never copied over
            raise
        except OSError:  # no hard links here (some network or FAT filesystems)
            with open(src, "rb") as source, open(tmp, "xb") as copy:
                created = True
                shutil.copyfileobj(source, copy)
        os.replace(tmp, dst)
        created = False
    except OSError as e:
        raise _name_the_file(e, dst) from None
    finally:
        if created:
            _remove_quietly(tmp)


def _remove_quietly(path: str) -> None:
    """Removes a temporary file this process created, keeping the error being raised (if
    removing fails too, the start-up clean-up of a later run removes it)."""
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_dir(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames themselves durable
    finally:
        os.close(dir_fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_partial_files(directory: str, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Deletes the temporary files of ``names`` that a killed writer of this program left
    in ``directory`` (they are never complete): those written on this host by a process
    that no longer exists. Returns (names removed, names left: their writer is alive or on
    another host). Nothing else is touched, whatever its name."""
    if not os.path.isdir(directory):
        return [], []
    host = socket.gethostname()
    removed, left = [], []
    for entry in sorted(os.listdir(directory)):
        match = _TMP_NAME.match(entry)
        if match is None or match["name"] not in names:
            continue
        if match["host"] == host and not _pid_alive(int(match["pid"])):
            try:
                os.remove(os.path.join(directory, entry))
            except FileNotFoundError:  # another run's clean-up was first
                continue
            except OSError as e:
                raise _name_the_file(e, os.path.join(directory, entry)) from None
            removed.append(entry)
        else:
            left.append(entry)
    return removed, left


def move_aside(directory: str, names: Sequence[str]) -> str:
    """Moves the files ``names`` of ``directory`` into a new folder
    ``<directory>/set-aside/<YYYYmmdd-HHMMSS>[-N]`` and returns that folder's path."""
    base = os.path.join(directory, "set-aside", time.strftime("%Y%m%d-%H%M%S"))
    dest, n = base, 1
    while os.path.exists(dest):
        dest, n = f"{base}-{n}", n + 1
    try:
        os.makedirs(dest)
        for name in names:
            os.replace(os.path.join(directory, name), os.path.join(dest, name))
        _fsync_dir(directory)
    except OSError as e:
        raise _name_the_file(e, e.filename or dest) from None
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
    """Writes ``rows`` as JSON lines through :func:`atomic_write`."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(path, lambda f: f.write(text.encode()))


def write_text(path: str, text: str) -> None:
    """Writes ``text`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode()))


# --------------------------------------------------------------------------------------
# One run per directory
# --------------------------------------------------------------------------------------

#: Lock file of a run directory; it stays after the run (removing it would race with a run
#: starting at that moment) and names the last run that held it.
LOCK_FILE = "run.lock"
# Lock descriptors held by this process: a forked child (a DataLoader worker) closes its
# copies, so that the lock goes with this process and not with its slowest child.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class DirectoryInUse(Exception):
    """Another process holds the lock of a run directory. ``holder`` is what that process
    wrote into the lock file (pid, host, started, command, ...), {} if it has not yet."""

    def __init__(self, directory: str, holder: Mapping[str, Any]) -> None:
        self.directory, self.holder = directory, dict(holder)
        super().__init__(f"{directory} is in use by {describe_holder(self.holder)}")


def describe_holder(holder: Mapping[str, Any]) -> str:
    """``pid 12 on host h (started ..., torchrun agent pid 11, Slurm job 5): python ...``."""
    if not holder:
        return "a run that is starting (it has not written its details yet)"
    extra = [f"started {holder.get('started', '?')}"]
    if holder.get("launcher_pid"):
        extra.append(f"torchrun agent pid {holder['launcher_pid']}")
    if holder.get("slurm_job"):
        extra.append(f"Slurm job {holder['slurm_job']}")
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} ({', '.join(extra)}): "
        f"{holder.get('command', '?')}"
    )


class DirectoryLock:
    """An exclusive ``fcntl.flock`` on ``<directory>/run.lock``, held until :meth:`release`
    or the end of the process: the kernel drops it when the process dies however it dies
    (SIGKILL, OOM), so a killed run never blocks its own restart.

    :meth:`acquire` creates the directory (and its missing parents) when needed. A run that
    wrote nothing leaves no trace: when the directory holds nothing but the lock file that
    :meth:`acquire` created, :meth:`release` removes that file and the directories it created.

    Example::

        lock = DirectoryLock("runs/a")
        lock.acquire()           # DirectoryInUse if another run holds it
        try:
            ...                  # the run
        finally:
            lock.release()
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: int | None = None
        self._created_dirs: list[str] = []  # deepest first
        self._created_file = False

    def acquire(self) -> None:
        """Takes the lock at once or raises DirectoryInUse; then writes this process's
        details into the lock file for the message a second run shows. A failure to create
        the directory or the lock file is a WriteError."""
        missing, parent = [], os.path.abspath(self.directory)
        while not os.path.exists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        fd = None
        for _ in range(2):  # a second try if a run tidying up removes the directory meanwhile
            try:
                os.makedirs(self.directory, exist_ok=True)
                self._created_file = not os.path.exists(self.path)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                break
            except FileNotFoundError:
                continue
            except OSError as e:
                raise _name_the_file(e, e.filename or self.path) from None
        if fd is None:
            raise WriteError(errno.ENOENT, os.strerror(errno.ENOENT), self.path)
        self._created_dirs = [d for d in missing if os.path.isdir(d)]
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DirectoryInUse(self.directory, read_lock_holder(self.path)) from None
        except OSError as e:  # ENOLCK: a filesystem without locks
            os.close(fd)
            raise _name_the_file(e, self.path) from None
        _HELD_LOCKS.add(fd)
        self._fd = fd
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": shlex.join([sys.executable, *sys.argv]),
            "launcher_pid": os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None,
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError as e:
            self.release()
            raise _name_the_file(e, self.path) from None

    def release(self) -> None:
        """Drops the lock; first, while still holding it, removes the lock file and the
        directories that :meth:`acquire` created if the run wrote nothing else there."""
        if self._fd is None:
            return
        try:
            if self._created_file and os.listdir(self.directory) == [LOCK_FILE]:
                # A run starting now either opened this file before it goes (and finds it
                # locked) or creates a new one (and the directory stays).
                os.remove(self.path)
                for directory in self._created_dirs:
                    os.rmdir(directory)
        except OSError:  # not empty after all, or gone: nothing to tidy
            pass
        _HELD_LOCKS.discard(self._fd)
        os.close(self._fd)
        self._fd = None


def read_lock_holder(path: str) -> dict[str, Any]:
    """What the holder wrote into a lock file; {} when nothing (yet) or unreadable."""
    try:
        with open(path) as f:
            holder = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


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
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EIO):
            # Nothing says the file is damaged: reading it failed.
            cause = f"{e.strerror or e} ({errno.errorcode[e.errno]})"
            raise CheckpointError(path, f"cannot be read: {cause}") from None
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
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
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
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
