"""The segmentation example's run directory: one run at a time, what start-up removes, the
outputs it sets aside, exact resume of an epoch at another world size or batch size, and
the errors of a directory that cannot be written."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_example
import torch
from test_example import (
    EXAMPLE,
    TINY,
    TORCHRUN,
    TRAIN,
    _dead_pid,
    _env,
    _kill_tree,
    _partial_name,
    _rows,
    _run,
    _snapshot,
    train,
    utils,
)
from torch.utils.data import DistributedSampler

train_here = test_example.train_here  # the fixture: runs train.py's main in this process

# A process that takes the lock of a directory, says so, and keeps it until killed; with
# "fork" it first starts a child that outlives it (as a DataLoader worker briefly does).
_HOLDER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import utils
utils.DirectoryLock(sys.argv[2]).acquire()
if len(sys.argv) > 3 and os.fork() == 0:
    # The fork hooks have run by now: the test waits for this line before killing the parent
    # (one write each, so that the two processes' lines do not interleave).
    os.write(1, b"forked\\n")
    time.sleep(60)
    os._exit(0)
os.write(1, b"locked\\n")
time.sleep(60)
"""


def _hold(directory: Path, fork: bool = False) -> subprocess.Popen:
    directory.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-c", _HOLDER, str(EXAMPLE), str(directory)] + (
        ["fork"] if fork else []
    )
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, start_new_session=True)
    expected = {"locked\n", "forked\n"} if fork else {"locked\n"}
    assert {proc.stdout.readline() for _ in expected} == expected
    return proc


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# --------------------------------------------------------------------------------------
# One run per directory
# --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_second_run_refuses_the_directory_and_names_the_holder(train_here, tmp_path):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        (out / "metrics.jsonl").write_text('{"epoch": 0}\n')
        before = _snapshot(out)
        for resume in ("auto", "none"):
            with pytest.raises(SystemExit) as e:
                train_here(out, "--epochs", "1", "--resume", resume)
            message = str(e.value)
            assert f"--output-dir {out} is in use by another run" in message
            assert f"pid {holder.pid} on host {socket.gethostname()}" in message
            assert "started 20" in message and f"-c {EXAMPLE} {out}" in message  # its command
            assert "another --output-dir" in message and "\n" not in message
            assert _snapshot(out) == before and not (out / "set-aside").exists()
    finally:
        _kill_group(holder)
    # The kernel drops the lock of a killed run: its restart goes ahead at once.
    assert train_here(out, "--epochs", "1") == 0
    assert [r["epoch"] for r in _rows(out)] == [0]
    # A run that ends releases the lock.
    lock = utils.DirectoryLock(str(out))
    lock.acquire()
    lock.release()


def test_the_lock_goes_with_the_process_not_with_its_forked_children(tmp_path):
    holder = _hold(tmp_path, fork=True)
    lock = utils.DirectoryLock(str(tmp_path))
    try:
        with pytest.raises(utils.DirectoryInUse):
            lock.acquire()
        os.kill(holder.pid, signal.SIGKILL)  # the child it forked lives on
        holder.wait()
        lock.acquire()
    finally:
        lock.release()
        _kill_group(holder)


def test_a_filesystem_without_locks_is_named_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "run"
    assert train.claim_output_dir(str(out), torch.device("cpu")) is None
    err = capsys.readouterr().err
    assert f"cannot lock {out / utils.LOCK_FILE}: No locks available" in err
    assert "a second run started in this directory would not be stopped" in err
    assert out.is_dir()


@pytest.mark.timeout(120)
def test_under_torchrun_every_rank_stops_when_rank_0_is_refused(tmp_path):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(TRAIN), *TINY]
        # A hang would end at the 300 s timeout of the process group, past the test's.
        cmd += ["--num-train", "8", "--epochs", "1", "--dist-timeout", "300"]
        start = time.monotonic()
        rc, log = _run([*cmd, "--output-dir", str(out)], tmp_path / "log.txt", timeout=90)
    finally:
        _kill_group(holder)
    assert rc != 0 and time.monotonic() - start < 90
    assert f"is in use by another run, pid {holder.pid}" in log
    assert "rank 1: stopped, rank 0 could not take" in log
    assert "epoch 0/0" not in log and not (out / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------
# Outputs kept
# --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_test_only_sets_the_earlier_eval_json_aside(train_here, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_here(out, "--epochs", "1") == 0
    (out / "eval.json").write_text('{"miou": 0.5, "note": "mine"}\n')
    mine = (out / "eval.json").read_bytes()
    capsys.readouterr()
    assert train_here(out, "--epochs", "1", "--test-only") == 0
    (aside,) = (out / "set-aside").iterdir()
    assert (aside / "eval.json").read_bytes() == mine
    assert f"moved the earlier eval.json to {aside}" in capsys.readouterr().out
    assert json.loads((out / "eval.json").read_text())["num_images"] == 2


def test_start_up_removes_only_what_a_dead_writer_of_the_example_left(tmp_path, capsys):
    out = tmp_path
    dead, alive = _dead_pid(), os.getpid()
    gone = [_partial_name("checkpoint.pth", dead), _partial_name("metrics.jsonl", dead)]
    kept = [
        "checkpoint.pth.tmp.backup-before-upgrade",
        "metrics.jsonl.tmp.notes",
        "checkpoint.pth.tmp.4242",  # the name an older version used; could be anyone's
        _partial_name("checkpoint.pth", alive),  # a writer still at work
        _partial_name("checkpoint.pth", dead, host="other-node.cluster"),  # not checkable
        _partial_name("notes.txt", dead),  # not a file of a run
        ".checkpoint.pth.syncsn-tmp.mine",
    ]
    for name in gone + kept:
        (out / name).write_text(name)
    train.prepare_output_dir(str(out), None, 0)
    assert sorted(p.name for p in out.iterdir() if p.name in gone + kept) == sorted(kept)
    for name in kept:
        assert (out / name).read_text() == name
    captured = capsys.readouterr()
    assert f"removed 2 partial file(s) of an interrupted save: {', '.join(sorted(gone))}" in (
        captured.out
    )
    left = sorted(kept[3:5])
    assert f"left {', '.join(left)} in {out}: partial file(s) of a save by a process" in (
        captured.err
    )


def test_a_writer_names_its_temporary_files_for_the_clean_up(tmp_path, monkeypatch):
    names = []
    real_open = open

    def spy(path, mode="r", *args, **kwargs):
        names.append(os.path.basename(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    utils.write_jsonl(str(tmp_path / "metrics.jsonl"), [{"epoch": 0}])
    utils.atomic_save({"a": 1}, str(tmp_path / "checkpoint.pth"))
    monkeypatch.undo()
    (tmp_name, ckpt_name) = names
    assert tmp_name.startswith(f".metrics.jsonl.syncsn-tmp.{socket.gethostname()}.{os.getpid()}.")
    assert ckpt_name.startswith(f".checkpoint.pth.syncsn-tmp.{socket.gethostname()}.")
    # Had the writer died there, the clean-up would know the file as its own.
    for name in names:
        (tmp_path / name).write_text("partial")
    removed, left = utils.remove_partial_files(str(tmp_path), ["metrics.jsonl", "checkpoint.pth"])
    assert removed == [] and left == sorted(names)  # its writer (this process) is alive


# --------------------------------------------------------------------------------------
# Exact resume at any world size and batch size
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [24, 25])
def test_sampler_positions_are_counts_of_the_global_order(n):
    seed, epoch = 5, 3
    # A fresh epoch is DistributedSampler's, less the batches drop_last leaves out.
    for world, batch in ((1, 2), (2, 2), (3, 4)):
        steps = n // world // batch
        for rank in range(world):
            reference = DistributedSampler(
                range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
            )
            reference.set_epoch(epoch)
            sampler = utils.ResumableSampler(n, rank, world, batch, seed)
            sampler.set_epoch(epoch)
            assert list(sampler) == list(reference)[: steps * batch]
            assert len(sampler) == steps * batch
    # Stopped after `done` samples by one world, resumed by another: every sample of the
    # order once, up to a tail shorter than one step of the new world.
    order = utils.ResumableSampler(n, 0, 1, 1, seed).order(epoch)
    for done in (12, 8, 6, 0):  # 3 steps of 2 x 2, 4 of 1 x 2, 2 of 3 x 1, none
        for new_world, new_batch in ((1, 2), (3, 2), (2, 3), (1, 5)):
            trained = []
            for rank in range(new_world):
                s = utils.ResumableSampler(n, rank, new_world, new_batch, seed)
                s.set_epoch(epoch, start=done)
                trained += list(s)
                assert len(s) == s.steps * new_batch
            tail = (n - done) % (new_world * new_batch)
            assert sorted(order[:done] + trained) == sorted(order[: n - tail])


# Runs train.py with every training sample it loads and every training loss it computes
# written down, per rank; rank 0 asks itself to stop (SIGTERM) after STOP_AFTER samples.
_RECORDER = """
import os, signal, sys
sys.path.insert(0, os.environ["EXAMPLE_DIR"])
import data, train

record = os.path.join(os.environ["RECORD_DIR"], os.environ["RECORD_TAG"])
rank = int(os.environ.get("RANK", "0"))
stop_after = int(os.environ.get("STOP_AFTER", "0"))
loaded = []

def getitem(self, index, _getitem=data.SyntheticShapes.__getitem__):
    if self.split == "train":
        loaded.append(index)
        with open(f"{record}.samples.{rank}", "a") as f:
            f.write(f"{index}\\n")
        if rank == 0 and len(loaded) == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
    return _getitem(self, index)

def loss(logits, target, _loss=train.segmentation_loss):
    value = _loss(logits, target)
    with open(f"{record}.losses.{rank}", "a") as f:
        f.write(f"{float(value)!r}\\n")
    return value

data.SyntheticShapes.__getitem__ = getitem
train.segmentation_loss = loss
sys.exit(train.main(train.resolve_args(train.get_args_parser().parse_args())))
"""
_RESUME_ARGS = [*TINY, "--num-train", "24", "--num-val", "2", "--base-width", "8"]
_RESUME_ARGS += ["--dist-timeout", "60"]


def _recorded(tmp: Path, tag: str, kind: str, cast=int) -> list[list]:
    """Per rank, the values a launch wrote down, in order."""
    files = sorted(tmp.glob(f"{tag}.{kind}.*"), key=lambda p: int(p.suffix[1:]))
    return [[cast(line) for line in p.read_text().split()] for p in files]


def _launch(tmp: Path, out: Path, tag: str, nproc: int, *flags: str, stop_after: int = 0):
    script = tmp / "recorder.py"
    script.write_text(_RECORDER)
    args = [str(script), *_RESUME_ARGS, "--output-dir", str(out), *flags]
    cmd = [sys.executable, *args]
    if nproc > 1:
        cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {"EXAMPLE_DIR": str(EXAMPLE), "RECORD_DIR": str(tmp), "RECORD_TAG": tag}
    env["STOP_AFTER"] = str(stop_after)
    log = tmp / f"{tag}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**_env(), **env})
    try:
        rc = proc.wait(timeout=150)
    finally:
        _kill_tree(proc)
    return rc, log.read_text()


def _step_means(losses: list[list[float]], batch: int) -> list[tuple[float, int]]:
    """(mean loss over the ranks, images) of each step of a launch."""
    world = len(losses)
    return [(sum(step) / world, world * batch) for step in zip(*losses, strict=True)]


@pytest.mark.timeout(420)
def test_a_mid_epoch_checkpoint_resumes_exactly_at_another_world_size_and_batch_size(tmp_path):
    # 24 images, 2 ranks x 2 per step: stopped after 3 of 6 steps, 12 images trained.
    out = tmp_path / "run"
    rc, log = _launch(tmp_path, out, "first", 2, "--epochs", "1", "-b", "2", stop_after=6)
    assert rc != 0 and "received SIGTERM" in log, log
    ckpt = utils.load_checkpoint(str(out / "checkpoint.pth"))
    assert (ckpt["epoch"], ckpt["step"], ckpt["partial"]["images"]) == (-1, 3, 12), log
    first = _recorded(tmp_path, "first", "samples")
    assert [len(s) for s in first] == [6, 6]
    first_steps = _step_means(_recorded(tmp_path, "first", "losses", float), batch=2)

    # On 1 process with 3 images per step, and on 3 processes with 2: the epoch goes on
    # with the 12 images left (4 and 2 steps), each trained once.
    for tag, nproc, batch in (("one", 1, 3), ("three", 3, 2)):
        run_dir = tmp_path / tag
        shutil.copytree(out, run_dir)
        rc, log = _launch(tmp_path, run_dir, tag, nproc, "--epochs", "1", "-b", str(batch))
        assert rc == 0, log
        assert f"after 12 of its images (trained 2 x 2 per step; now {nproc} x {batch})" in log
        resumed = _recorded(tmp_path, tag, "samples")
        assert len(resumed) == nproc and [len(s) for s in resumed] == [12 // nproc] * nproc
        trained = [i for s in first + resumed for i in s]
        assert sorted(trained) == list(range(24)), (tag, trained)
        steps = first_steps + _step_means(_recorded(tmp_path, tag, "losses", float), batch)
        (row,) = _rows(run_dir)
        mean = sum(loss * images for loss, images in steps) / 24
        assert row["train_loss"] == pytest.approx(mean, rel=1e-6), tag
        assert row["epoch"] == 0

    # The end-of-epoch checkpoint of 3 processes, continued by 1 with another batch size:
    # a whole epoch of every image once, the learning rate at its schedule's end.
    rc, log = _launch(tmp_path, tmp_path / "three", "next", 1, "--epochs", "2", "-b", "2")
    assert rc == 0, log
    assert "continuing at epoch 1\n" in log
    (samples,) = _recorded(tmp_path, "next", "samples")
    assert sorted(samples) == list(range(24))
    rows = _rows(tmp_path / "three")
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["lr"] == 0.0


def test_a_mid_epoch_position_of_another_sample_order_is_refused(train_here, tmp_path):
    out = tmp_path / "run"
    assert train_here(out, "--epochs", "1") == 0
    ckpt = utils.load_checkpoint(str(out / "checkpoint.pth"))
    # The same checkpoint, as if stopped after 2 of its 4 images.
    ckpt.update(epoch=-1, step=1, partial={"loss_sum": 3.0, "images": 2, "train_time": 1.0})
    utils.atomic_save(utils.with_integrity(ckpt), str(out / "checkpoint.pth"))
    before = _snapshot(out)
    for flags in (("--seed", "9"), ("--num-train", "6")):
        with pytest.raises(SystemExit) as e:
            train_here(out, "--epochs", "1", *flags)
        message = str(e.value)
        assert "stopped epoch 0 after 2 images of the order drawn for 4 training images" in message
        assert "Resume with --seed 3 and the same training set (--num-train)" in message
        assert _snapshot(out) == before


# --------------------------------------------------------------------------------------
# Directories that cannot be written, and nothing to train
# --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_full_disk_stops_with_one_line_and_loses_nothing(train_here, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert train_here(out, "--epochs", "1") == 0
    before = _snapshot(out)

    class FullDisk(io.FileIO):
        room = 4096  # bytes that still fit

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return super().write(data)

    def open_checkpoint_on_a_full_disk(path, mode="r", *args, **kwargs):
        if ".checkpoint.pth." in os.path.basename(path):
            return FullDisk(path, mode.replace("b", ""))
        return open(path, mode, *args, **kwargs)

    # The real torch.save writing to a full disk (it raises a RuntimeError of its own).
    monkeypatch.setitem(train.atomic_save.__globals__, "open", open_checkpoint_on_a_full_disk)
    with pytest.raises(SystemExit) as e:
        train_here(out, "--epochs", "2")
    message = str(e.value)
    assert message.startswith(f"cannot write {out / 'checkpoint.pth'}: No space left on device")
    assert "(ENOSPC)" in message and "\n" not in message
    # Epoch 1 was trained and recorded; its checkpoint could not be written: the one of
    # epoch 0 is intact, and the next run continues from it.
    after = _snapshot(out)
    for name in ("checkpoint.pth", "checkpoint.pth.prev"):
        assert after.get(name) == before.get(name), name
    assert not [p for p in os.listdir(out) if "syncsn-tmp" in p]
    monkeypatch.undo()
    assert train_here(out, "--epochs", "2") == 0
    assert [r["epoch"] for r in _rows(out)] == [0, 1]


def _make_read_only(path: Path) -> None:
    """chmod for a user; a read-only bind mount for root (whom permissions do not stop)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    for cmd in (["mount", "--bind", path, path], ["mount", "-o", "remount,ro,bind", path, path]):
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            pytest.skip("running as root without the right to mount: no read-only directory")


def _make_writable(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o755)
    else:
        subprocess.run(["umount", path], capture_output=True)


@pytest.mark.timeout(120)
def test_a_read_only_output_directory_stops_with_one_line(train_here, tmp_path):
    out = tmp_path / "run"
    assert train_here(out, "--epochs", "1") == 0
    before = _snapshot(out)
    _make_read_only(out)
    try:
        with pytest.raises(SystemExit) as e:
            train_here(out, "--epochs", "2")
        assert _snapshot(out) == before
    finally:
        _make_writable(out)
    message = str(e.value)
    assert message.startswith(f"cannot write {out}/"), message
    assert "(EROFS)" in message or "(EACCES)" in message
    assert "make it writable or pass another --output-dir" in message and "\n" not in message


@pytest.mark.timeout(60)
def test_an_output_path_that_is_a_file_stops_with_one_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    rc, log = _run(
        [sys.executable, str(TRAIN), *TINY, "--output-dir", str(path)], tmp_path / "log", 60
    )
    assert rc != 0 and "Traceback" not in log
    assert log.strip() == (
        f"--output-dir {path} is a file, not a directory: pass another --output-dir (the file "
        "is left as it is)"
    )
    assert path.read_text() == "mine"


@pytest.mark.timeout(120)
def test_resume_path_with_nothing_left_to_train_moves_nothing(train_here, tmp_path):
    done = tmp_path / "done"
    assert train_here(done, "--epochs", "1") == 0
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pth", "metrics.jsonl", "curves.png"):
        (out / name).write_text(name)
    before = _snapshot(out)
    with pytest.raises(SystemExit) as e:
        train_here(out, "--epochs", "1", "--resume", str(done / "checkpoint.pth"))
    message = str(e.value)
    assert f"--resume {done / 'checkpoint.pth'} already covers 1 epoch(s) of --epochs 1" in message
    assert "raise --epochs" in message and "nothing was moved" in message
    assert _snapshot(out) == before and not (out / "set-aside").exists()
