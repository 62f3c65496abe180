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


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_learns_when_rank_0_fails_to_take_the_directory(tmp_path, monkeypatch, rank):
    # Any failure of rank 0, not only a refusal: the other ranks must not wait in the
    # broadcast for the whole --dist-timeout.
    sent = []

    def broadcast(tensor, src):
        if rank == 0:
            sent.append(tensor.item())
        else:
            tensor.fill_(1.0)  # what rank 0 sends

    class Broken:
        def __init__(self, directory):
            pass

        def acquire(self):
            raise RuntimeError("unexpected")

    monkeypatch.setattr(train.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(train.dist, "get_rank", lambda: rank)
    monkeypatch.setattr(train.dist, "broadcast", broadcast)
    monkeypatch.setattr(train, "DirectoryLock", Broken)
    if rank == 0:
        with pytest.raises(RuntimeError, match="unexpected"):
            train.claim_output_dir(str(tmp_path), torch.device("cpu"))
        assert sent == [1.0]
    else:
        with pytest.raises(SystemExit, match="rank 1: stopped, rank 0 could not take"):
            train.claim_output_dir(str(tmp_path), torch.device("cpu"))


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


def test_a_writer_never_removes_a_temporary_file_it_did_not_create(tmp_path, monkeypatch):
    # Another writer's file under the name this one drew (a collision of the random token).
    theirs = tmp_path / _partial_name("checkpoint.pth", os.getpid())
    theirs.write_text("another writer's")
    monkeypatch.setattr(utils, "temporary_path", lambda path: str(theirs))
    path = tmp_path / "checkpoint.pth"
    with pytest.raises(OSError) as e:
        utils.atomic_save({"a": 1}, str(path))
    assert e.value.errno == errno.EEXIST and e.value.filename == str(path)
    assert theirs.read_text() == "another writer's" and not path.exists()
    # Keeping the previous file, by a hard link and by a copy where there are none.
    path.write_text("old")
    previous = tmp_path / "checkpoint.pth.prev"
    for links in (True, False):
        if not links:
            monkeypatch.setattr(utils.os, "link", lambda *a: (_ for _ in ()).throw(OSError()))
        with pytest.raises(OSError) as e:
            utils._replace_with_link(str(path), str(previous))
        assert e.value.errno == errno.EEXIST and e.value.filename == str(previous)
        assert theirs.read_text() == "another writer's" and not previous.exists()


# --------------------------------------------------------------------------------------
# Exact resume at any world size and batch size
# --------------------------------------------------------------------------------------


def _steps_of(samplers: list) -> list[list[int]]:
    """The samples of each step of a world of samplers (rank r's k-th batch of each rank)."""
    batches = []
    for s in samplers:
        samples = list(s)
        assert len(samples) == len(s)
        batches.append([samples[i : i + s.batch_size] for i in range(0, len(s), s.batch_size)])
    assert len({len(b) for b in batches}) == 1  # every rank takes the same number of steps
    steps = [sum(step, []) for step in zip(*batches, strict=True)]
    assert all(len(set(map(len, step))) == 1 for step in zip(*batches, strict=True))
    return steps


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
            assert len(sampler) == steps * batch and sampler.left_out == 0
    # Stopped after `done` samples of an epoch that ends at `end`, resumed by another world:
    # each step trains the next samples of the order, every sample once; all steps are
    # whole but the last, which takes the leftover split evenly over the ranks, each rank
    # at least `min_batch` of it; what is left out is fewer than one per rank, or fewer than
    # `min_batch` per rank.
    order = utils.ResumableSampler(n, 0, 1, 1, seed).order(epoch)
    for done, end in ((12, 24), (8, 24), (6, 24), (0, 24), (5, 25), (10, 20)):
        if end > n:
            continue
        for new_world, new_batch in ((1, 2), (3, 2), (2, 3), (1, 5), (2, 4), (4, 4)):
            for min_batch in (1, 2):
                world = [
                    utils.ResumableSampler(n, r, new_world, new_batch, seed, min_batch=min_batch)
                    for r in range(new_world)
                ]
                for s in world:
                    s.set_epoch(epoch, start=done, end=end)
                position = done
                for k, step in enumerate(_steps_of(world)):
                    assert sorted(step) == sorted(order[position : position + len(step)])
                    position += len(step)
                    if k < world[0].steps - 1:
                        assert len(step) == new_world * new_batch
                    else:
                        assert len(step) >= new_world * min_batch
                left = end - position
                assert left == world[0].left_out >= 0
                assert left < new_world * min_batch, (done, end, new_world, new_batch)


@pytest.mark.parametrize(
    "n, done, end, world, batch, min_batch, expected",
    [
        # (steps, samples of the last step per rank, left out)
        (24, 6, 24, 1, 4, 2, (5, 2, 0)),  # stopped after 1 x 6, resumed with 1 x 4
        (24, 6, 24, 2, 4, 1, (3, 1, 0)),  # 2 whole steps, then one of 2 x 1
        (24, 6, 24, 2, 4, 2, (2, 0, 2)),  # 2 x 1 is too few for a local SN: left out
        (24, 6, 24, 3, 4, 1, (2, 2, 0)),  # 18 = 12 + 3 x 2
        (24, 6, 24, 4, 4, 1, (1, 0, 2)),  # 2 left for 4 ranks
        (25, 5, 25, 2, 3, 1, (4, 1, 0)),  # 20 = 3 x 6 + 2 x 1
        (25, 5, 25, 3, 3, 1, (2, 0, 2)),  # 20 = 2 x 9 + 2 left for 3 ranks
        (25, 5, 25, 2, 4, 1, (3, 2, 0)),  # 20 = 2 x 8 + 2 x 2
        (25, 5, 20, 2, 3, 1, (3, 1, 1)),  # ends where the 1 x 5 run ends: 15 = 2 x 6 + 2 + 1
        (25, 0, None, 2, 3, 1, (4, 0, 0)),  # a fresh epoch: 24 of 25, as drop_last
        (24, 24, 24, 2, 3, 1, (0, 0, 0)),  # nothing left
    ],
)
def test_a_resumed_epoch_trains_its_leftover_in_a_last_smaller_step(
    n, done, end, world, batch, min_batch, expected
):
    samplers = [utils.ResumableSampler(n, r, world, batch, 0, min_batch) for r in range(world)]
    for s in samplers:
        s.set_epoch(2, start=done, end=end)
    steps, last, left_out = expected
    assert (samplers[0].steps, samplers[0].last_batch, samplers[0].left_out) == expected
    trained = sum((list(s) for s in samplers), [])
    assert sorted(trained) == sorted(samplers[0].order(2)[done : samplers[0].end - left_out])
    assert [len(s) for s in samplers] == [(steps - bool(last)) * batch + last] * world


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


@pytest.fixture
def recording(train_here, monkeypatch):
    """``recording(out, *flags, stop_after=0)`` runs train.py's main here as train_here does
    and returns (exit status, the training samples it loaded, the loss of each step); with
    stop_after, it asks itself to stop (SIGTERM) once it has loaded that many samples."""
    samples: list[int] = []
    losses: list[float] = []
    stop_at = [0]

    class Recorder(train.ResumableSampler):
        def __iter__(self):
            for index in super().__iter__():
                samples.append(index)
                if len(samples) == stop_at[0]:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield index

    def loss(logits, target, _loss=train.segmentation_loss):
        value = _loss(logits, target)
        losses.append(float(value.detach()))
        return value

    monkeypatch.setattr(train, "ResumableSampler", Recorder)
    monkeypatch.setattr(train, "segmentation_loss", loss)

    def run(out: Path, *flags: str, stop_after: int = 0):
        samples.clear()
        losses.clear()
        stop_at[0] = stop_after
        return train_here(out, *flags), list(samples), list(losses)

    return run


_BIG = ("--num-train", "24")  # train_here's default is 4 training images


@pytest.mark.timeout(120)
@pytest.mark.parametrize("epochs", [1, 2])
def test_an_epoch_resumed_with_another_batch_size_trains_every_image_once(
    recording, tmp_path, epochs
):
    # 24 images, stopped after one step of 6, resumed with 4 a step: 4 whole steps and a
    # last one of the 2 images left.
    out = tmp_path / "run"
    flags = (*_BIG, "--epochs", str(epochs))
    rc, first, first_losses = recording(out, *flags, "-b", "6", stop_after=6)
    assert rc == 128 + signal.SIGTERM and len(first) == 6
    rc, resumed, losses = recording(out, *flags, "-b", "4")
    assert rc == 0
    assert sorted(first + resumed[:18]) == list(range(24))
    assert len(losses) == 5 + 6 * (epochs - 1)
    rows = _rows(out)
    images = [6] + [4] * 4 + [2]
    mean = sum(n * loss for n, loss in zip(images, first_losses + losses[:5], strict=True)) / 24
    assert rows[0]["train_loss"] == pytest.approx(mean, rel=1e-6)
    # The schedule: epoch 0 ends at step 6 of the run's 6 x epochs, whatever the resume.
    args = _resolve_here(*flags, "-b", "4")
    warmup = round(args.lr_warmup_epochs * 6)
    factor = utils.lr_factor(6, 6 * epochs, warmup, args.lr_warmup_decay)
    assert rows[0]["lr"] == pytest.approx(args.lr * factor, rel=1e-6, abs=1e-12)
    if epochs == 2:
        assert sorted(resumed[18:]) == list(range(24))
    assert rows[-1]["lr"] == 0.0 and [r["epoch"] for r in rows] == list(range(epochs))


@pytest.mark.timeout(120)
def test_the_leftover_too_small_for_the_norm_is_named_and_the_schedule_still_ends(
    recording, tmp_path, capsys
):
    # 24 images with 5 a step: the epoch ends after 20. Stopped after 5, resumed with 2 a
    # step on one process: 7 whole steps, and 1 image left, which the synchronized SN (the
    # default norm) cannot train alone.
    out = tmp_path / "run"
    flags = (*_BIG, "--epochs", "2")
    rc, first, _ = recording(out, *flags, "-b", "5", stop_after=5)
    assert rc == 128 + signal.SIGTERM
    capsys.readouterr()
    rc, resumed, losses = recording(out, *flags, "-b", "2")
    assert rc == 0
    assert len(losses) == 7 + 12 and len(set(first + resumed[:14])) == 19
    err = capsys.readouterr().err
    assert (
        "warning: epoch 0 resumed with 1 x 2 images per step: the last 1 of its 20 images are "
        "left out of it (1 left after its whole steps: 1 per process for a last, smaller step, "
        "fewer than the 2 that --norm syncsn trains on)\n"
    ) in err
    rows = _rows(out)
    args = _resolve_here(*flags, "-b", "2")
    factor = utils.lr_factor(12, 24, round(args.lr_warmup_epochs * 12), args.lr_warmup_decay)
    assert rows[0]["lr"] == pytest.approx(args.lr * factor, rel=1e-6)
    assert rows[1]["lr"] == 0.0


@pytest.mark.timeout(120)
def test_a_mid_epoch_checkpoint_of_the_previous_version_resumes(recording, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ("--num-train", "8", "--epochs", "1")
    rc, first, first_losses = recording(out, *flags, stop_after=4)
    assert rc == 128 + signal.SIGTERM
    # What the previous version wrote: no world size, no training set size, no position;
    # the loss summed over steps.
    ckpt = utils.load_checkpoint(str(out / "checkpoint.pth"))
    assert ckpt["step"] == 2
    for key in ("world_size", "train_images", utils.INTEGRITY_KEY):
        del ckpt[key]
    ckpt["partial"] = {"loss_sum": sum(first_losses), "train_time": 1.0}
    torch.save(ckpt, out / "checkpoint.pth")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="no integrity record"):
        rc, resumed, losses = recording(out, *flags)
    assert rc == 0
    assert sorted(first + resumed) == list(range(8))
    assert "does not say on how many processes, nor how many training images" in (
        capsys.readouterr().err
    )
    (row,) = _rows(out)
    assert row["train_loss"] == pytest.approx(sum(first_losses + losses) / 4, rel=1e-6)


def _resolve_here(*flags: str):
    return test_example._resolve(*test_example.HERE_ARGS, *flags)


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


@pytest.mark.timeout(120)
def test_a_refused_run_leaves_no_directory_behind(train_here, tmp_path):
    done = tmp_path / "done"
    assert train_here(done, "--epochs", "1") == 0
    resume = ("--resume", str(done / "checkpoint.pth"), "--epochs", "1")
    # Directories it created (here two levels) go with their lock file.
    with pytest.raises(SystemExit, match="already covers 1 epoch"):
        train_here(tmp_path / "new" / "run", *resume)
    with pytest.raises(SystemExit, match="--test-only needs a checkpoint"):
        train_here(tmp_path / "new" / "run", "--test-only")
    assert not (tmp_path / "new").exists()
    # A directory that was there stays, as it was.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="already covers 1 epoch"):
        train_here(empty, *resume)
    assert empty.is_dir() and list(empty.iterdir()) == []
    # A run that wrote something keeps its directory and lock file.
    assert train_here(tmp_path / "new" / "run", "--epochs", "1") == 0
    assert (tmp_path / "new" / "run" / utils.LOCK_FILE).exists()


@pytest.mark.timeout(120)
def test_a_file_that_cannot_be_read_is_reported_as_read_not_written(
    train_here, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    assert train_here(out, "--epochs", "1") == 0
    before = _snapshot(out)

    def unreadable(name):
        def fake_open(path, mode="r", *args, **kwargs):
            if os.path.basename(path) == name and "r" in mode:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            return open(path, mode, *args, **kwargs)

        return fake_open

    # metrics.jsonl, read when the run continues.
    with monkeypatch.context() as m, pytest.raises(SystemExit) as e:
        m.setitem(train.read_jsonl.__globals__, "open", unreadable("metrics.jsonl"))
        train_here(out, "--epochs", "2")
    assert str(e.value) == (
        f"cannot read {out / 'metrics.jsonl'}: Permission denied (EACCES); make it readable or "
        "pass another --output-dir. Nothing already written there is lost"
    )
    # checkpoint.pth, read by torch.load.
    with monkeypatch.context() as m, pytest.raises(SystemExit) as e:
        m.setattr(torch.serialization, "open", unreadable("checkpoint.pth"), raising=False)
        train_here(out, "--epochs", "2")
    message = str(e.value)
    assert message.startswith(
        f"cannot resume: checkpoint {out / 'checkpoint.pth'} cannot be read: Permission denied "
        "(EACCES)."
    ), message
    assert "write" not in message and "damaged" not in message and "\n" not in message
    assert _snapshot(out) == before
