"""The segmentation example (examples/segmentation): data, metrics and tooling in-process,
then short torchrun runs on 2 gloo ranks for training, resume, preemption and restarts."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "segmentation"
TRAIN = EXAMPLE / "train.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _load(name: str):
    """Imports examples/segmentation/<name>.py under a private module name."""
    spec = importlib.util.spec_from_file_location(f"_seg_example_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _load_train():
    """Imports train.py in this process. It imports its siblings by their plain names
    (data, utils, ...), which are found on sys.path only for the time of the import and
    taken out of sys.modules afterwards, so that no other test sees them."""
    siblings = ("data", "metrics", "model", "utils")
    saved = {name: sys.modules.pop(name) for name in siblings if name in sys.modules}
    sys.path.insert(0, str(EXAMPLE))
    try:
        return _load("train")
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in siblings:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


data = _load("data")
metrics = _load("metrics")
model_mod = _load("model")
utils = _load("utils")
train = _load_train()

# Small runs: 32-pixel images, 2 images per process.
TINY = ["--image-size", "32", "-b", "2", "--workers", "0", "--print-freq", "1", "--seed", "3"]


# --------------------------------------------------------------------------------------
# Helpers for the launched runs
# --------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _torchrun_cmd(args: list[str], max_restarts: int = 0) -> list[str]:
    return [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={max_restarts}",
        str(TRAIN),
        *args,
    ]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kills a launcher and its workers: torchrun starts each worker in its own session,
    so killing torchrun alone would leave them running."""
    if proc.poll() is None:
        for child in _children(proc.pid):
            try:
                os.killpg(child, signal.SIGKILL)
            except OSError:
                pass
        proc.kill()
    proc.wait()


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int, str]:
    proc = _start(cmd, log)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        _kill_tree(proc)
    return rc, log.read_text()


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _worker_pid(agent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank (a direct child of the agent)."""
    for pid in _children(agent_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under pid {agent_pid}")


def _dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _partial_name(name: str, pid: int, host: str | None = None) -> str:
    """The name of a temporary file of ``name`` that process ``pid`` on ``host`` wrote."""
    return f".{name}.syncsn-tmp.{host or socket.gethostname()}.{pid}.0123abcd"


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _reference_scores(pred: np.ndarray, target: np.ndarray, k: int) -> tuple[float, float]:
    """mIoU over classes present in target or prediction, and pixel accuracy, by loops."""
    valid = target != 255
    t, p = target[valid], pred[valid]
    ious = []
    for c in range(k):
        inter = np.sum((t == c) & (p == c))
        union = np.sum((t == c) | (p == c))
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)), float(np.mean(t == p))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_labelled():
    a = data.SyntheticShapes(6, 48, seed=1, split="val")
    b = data.SyntheticShapes(6, 48, seed=1, split="val")
    other_seed = data.SyntheticShapes(6, 48, seed=2, split="val")
    train = data.SyntheticShapes(6, 48, seed=1, split="train")
    x0, y0 = a[4]
    x1, y1 = b[4]
    assert x0.shape == (3, 48, 48) and x0.dtype == torch.float32
    assert y0.shape == (48, 48) and y0.dtype == torch.int64
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(x0, other_seed[4][0])
    assert not torch.equal(x0, train[4][0].flip(-1)) and not torch.equal(x0, train[4][0])

    labels = torch.stack([a[i][1] for i in range(6)])
    assert set(labels.unique().tolist()) <= set(range(6)) | {255}
    ignored = (labels == 255).float().mean().item()
    assert 0.001 < ignored < 0.1
    # Ignore marks boundaries: each ignored pixel sees two different classes within its
    # 5x5 neighbourhood (the two sides of the edge it straddles).
    padded = torch.nn.functional.pad(labels, (2, 2, 2, 2), value=255)
    for n, i, j in (labels == 255).nonzero().tolist():
        window = padded[n, i : i + 5, j : j + 5]
        assert len(set(window[window != 255].tolist())) >= 2, (n, i, j)


def test_synthetic_images_vary_in_brightness_and_contrast():
    ds = data.SyntheticShapes(40, 32, seed=0, split="val")
    mean = torch.tensor(data.MEAN).view(3, 1, 1)
    std = torch.tensor(data.STD).view(3, 1, 1)
    raw = torch.stack([ds[i][0] * std + mean for i in range(40)])
    means, stds = raw.mean(dim=(1, 2, 3)), raw.std(dim=(1, 2, 3))
    assert means.max() - means.min() > 0.25
    assert stds.max() / stds.min() > 2.0


def _write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _write_label(path: Path, label: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8), mode="L")
    if palette:
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    img.save(path)


def _label(seed: int, size: tuple[int, int], values: list[int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(values, size=(size[1], size[0])).astype(np.uint8)


def make_voc(root: Path, n_train: int = 3, n_val: int = 3) -> dict[str, np.ndarray]:
    base = root / "VOCdevkit" / "VOC2012"
    labels = {}
    sizes = [(40, 30), (36, 44), (50, 28), (33, 33), (41, 39)]
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"{split}_{i:03d}" for i in range(n)]
        for k, i in enumerate(ids):
            size = sizes[k % len(sizes)]
            _write_image(base / "JPEGImages" / f"{i}.jpg", size, k)
            labels[i] = _label(k, size, [0, 3, 20, 255])
            _write_label(base / "SegmentationClass" / f"{i}.png", labels[i], palette=True)
        lists = base / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return labels


def make_cityscapes(root: Path) -> dict[str, np.ndarray]:
    labels = {}
    for split, cities in (("train", ["aachen", "bonn"]), ("val", ["lindau"])):
        for c, city in enumerate(cities):
            for k in range(2):
                stem = f"{city}_{k:06d}_000019"
                _write_image(
                    root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", (48, 24), c + k
                )
                labels[stem] = _label(k, (48, 24), [0, 7, 18, 255])
                _write_label(
                    root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png",
                    labels[stem],
                )
    return labels


def make_ade20k(root: Path) -> dict[str, np.ndarray]:
    base = root / "ADEChallengeData2016"
    labels = {}
    for sub in ("training", "validation"):
        for k in range(2):
            name = f"ADE_{sub}_{k:08d}"
            _write_image(base / "images" / sub / f"{name}.jpg", (30, 26), k)
            labels[name] = _label(k + 5, (30, 26), [0, 1, 77, 150])
            _write_label(base / "annotations" / sub / f"{name}.png", labels[name])
    return labels


def test_voc_loader(tmp_path):
    labels = make_voc(tmp_path)
    val, k = data.build_dataset("voc", "val", data_path=str(tmp_path))
    assert k == 21 and len(val) == 3
    x, y = val[1]
    assert x.shape == (3, 44, 36)
    np.testing.assert_array_equal(y.numpy(), labels["val_001"])  # palette indices, not colours
    train, _ = data.build_dataset("voc", "train", data_path=str(tmp_path), image_size=24)
    torch.manual_seed(0)
    for i in range(len(train)):
        x, y = train[i]
        assert x.shape == (3, 24, 24) and y.shape == (24, 24)
        assert set(y.unique().tolist()) <= {0, 3, 20, 255}
    # A crop larger than the scaled image is padded with the ignore label.
    big, _ = data.build_dataset("voc", "train", data_path=str(tmp_path), image_size=120)
    _, y = big[0]
    assert y.shape == (120, 120) and (y == 255).float().mean() > 0.5
    # num_samples keeps the first N, and VOC2012 itself is accepted as the root.
    sub, _ = data.build_dataset(
        "voc", "val", data_path=str(tmp_path / "VOCdevkit" / "VOC2012"), num_samples=2
    )
    assert len(sub) == 2


def test_cityscapes_loader(tmp_path):
    labels = make_cityscapes(tmp_path)
    train, k = data.build_dataset("cityscapes", "train", data_path=str(tmp_path), image_size=16)
    assert k == 19 and len(train) == 4
    val, _ = data.build_dataset("cityscapes", "val", data_path=str(tmp_path))
    assert len(val) == 2
    _, y = val[1]
    np.testing.assert_array_equal(y.numpy(), labels["lindau_000001_000019"])
    x, y = train[3]
    assert x.shape == (3, 16, 16) and set(y.unique().tolist()) <= {0, 7, 18, 255}


def test_ade20k_loader_ignores_label_zero(tmp_path):
    labels = make_ade20k(tmp_path)
    val, k = data.build_dataset("ade20k", "val", data_path=str(tmp_path))
    assert k == 150 and len(val) == 2
    x, y = val[0]
    raw = labels["ADE_validation_00000000"].astype(np.int64)
    expected = np.where(raw == 0, 255, raw - 1)
    assert x.shape == (3, 26, 30)
    np.testing.assert_array_equal(y.numpy(), expected)
    assert {0, 76, 149, 255} >= set(np.unique(expected).tolist())


def test_bad_dataset_errors_show_the_layout(tmp_path):
    with pytest.raises(data.DatasetLayoutError, match="does not exist") as e:
        data.build_dataset("voc", "train", data_path=str(tmp_path / "nowhere"))
    assert "JPEGImages/<id>.jpg" in str(e.value) and "expected layout" in str(e.value)

    make_voc(tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClass/val_002.png").unlink()
    with pytest.raises(data.DatasetLayoutError, match="val_002.png") as e:
        data.build_dataset("voc", "val", data_path=str(tmp_path))
    assert "SegmentationClass/<id>.png" in str(e.value)

    city = tmp_path / "city"
    make_cityscapes(city)
    label = city / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"
    label.rename(str(label).replace("labelTrainIds", "labelIds"))
    with pytest.raises(data.DatasetLayoutError, match="createTrainIdLabelImgs"):
        data.build_dataset("cityscapes", "val", data_path=str(city))

    with pytest.raises(data.DatasetLayoutError, match="ADEChallengeData2016/") as e:
        data.build_dataset("ade20k", "train", data_path=str(city))
    assert "annotations/training/<name>.png" in str(e.value)

    # A file that exists but is no image: the error names it.
    ade = tmp_path / "ade"
    make_ade20k(ade)
    broken = ade / "ADEChallengeData2016/images/validation/ADE_validation_00000001.jpg"
    broken.write_bytes(b"not a jpeg")
    val, _ = data.build_dataset("ade20k", "val", data_path=str(ade))
    with pytest.raises(data.DatasetLayoutError, match="ADE_validation_00000001.jpg"):
        val[1]


# --------------------------------------------------------------------------------------
# Metrics and tooling
# --------------------------------------------------------------------------------------


def test_confusion_matrix_scores_match_a_reference():
    rng = np.random.default_rng(0)
    k = 5
    target = rng.integers(0, k, size=(3, 17, 11))
    target[rng.random(target.shape) < 0.1] = 255
    target[target == 4] = 1  # class 4 is absent from the ground truth ...
    pred = rng.integers(0, k - 1, size=target.shape)  # ... and from the predictions
    pred[0, 0, :3] = 3
    cm = metrics.ConfusionMatrix(k)
    cm.update(torch.from_numpy(pred[:2]), torch.from_numpy(target[:2]))
    cm.update(torch.from_numpy(pred[2:]), torch.from_numpy(target[2:]))
    out = cm.compute()
    miou, acc = _reference_scores(pred, target, k)
    assert out["miou"] == pytest.approx(miou, rel=1e-12)
    assert out["pixel_acc"] == pytest.approx(acc, rel=1e-12)
    assert out["num_images"] == 3 and out["num_pixels"] == int((target != 255).sum())
    assert np.isnan(out["iou"][4])
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))


@pytest.mark.parametrize("n,world", [(5, 2), (7, 3), (1, 2), (8, 4)])
def test_shard_sampler_counts_each_image_once(n, world):
    shards = [list(metrics.ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(metrics.ShardSampler(n, r, world)) for r in range(world)] == list(map(len, shards))


def test_lr_schedule():
    f = [utils.lr_factor(s, 100, 10, 0.01) for s in range(101)]
    assert f[0] == pytest.approx(0.01) and f[10] == pytest.approx(1.0)
    assert f[5] == pytest.approx(0.01 + 0.99 * 0.5)
    assert f[55] == pytest.approx((1 - 45 / 90) ** 0.9)
    assert f[100] == 0.0
    assert all(a < b for a, b in zip(f[:10], f[1:11], strict=True))
    assert all(a >= b for a, b in zip(f[10:-1], f[11:], strict=True))


def test_atomic_save_keeps_the_old_file_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    utils.atomic_save({"epoch": 1}, str(path))

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(utils.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        utils.atomic_save({"epoch": 2}, str(path))
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_stop_request_records_sigusr1():
    old = {s: signal.getsignal(s) for s in utils.StopRequest.SIGNALS}
    try:
        stop = utils.StopRequest()
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signum == signal.SIGUSR1
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("backbone,stride", [("resnet18", 8), ("resnet50", 16)])
def test_model_shapes(backbone, stride):
    norms = []

    def norm(c):
        norms.append(c)
        return torch.nn.BatchNorm2d(c)

    net = model_mod.DeepLabV3(7, norm, backbone, stride, base_width=8).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 40, 56)).shape == (2, 7, 40, 56)
        feats = net.backbone(torch.randn(1, 3, 64, 64))
    assert feats.shape[-1] == 64 // stride
    assert len(norms) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


# --------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------


def _damage(path: Path, nbytes: int = 64) -> None:
    """Flips ``nbytes`` bytes in the middle of the largest tensor stored in a checkpoint,
    where torch.load still succeeds (it checks no checksum) and only values change."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for k in range(nbytes):
        raw[start + k] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_load_checkpoint_names_the_file_and_what_is_wrong(tmp_path):
    state = {"model": {"w": torch.arange(4096.0)}, "epoch": 3, "args": {"lr": 0.1}}
    good = tmp_path / "good.pth"
    utils.atomic_save(utils.with_integrity(state), str(good))
    loaded = utils.load_checkpoint(str(good), required=("model", "epoch"))
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 3

    def fails(path: Path, pattern: str, required=()) -> None:
        with pytest.raises(utils.CheckpointError, match=pattern) as e:
            utils.load_checkpoint(str(path), required)
        assert str(path) in str(e.value)

    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(good.read_bytes())
    _damage(damaged)
    # torch itself reads the damaged file without a word, with other weights.
    assert not torch.equal(
        torch.load(damaged, weights_only=True)["model"]["w"], state["model"]["w"]
    )
    fails(damaged, "damaged: its contents do not match the checksum")
    # A changed number outside the tensors is caught as well.
    other = tmp_path / "other.pth"
    torch.save({**utils.with_integrity(state), "epoch": 4}, other)
    fails(other, "do not match the checksum")

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    fails(empty, r"is empty \(0 bytes\)")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    fails(truncated, "cannot be read .*truncated or damaged")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).bytes(5000))
    fails(noise, "cannot be read .*truncated or damaged")
    fails(tmp_path / "missing.pth", "does not exist")
    listed = tmp_path / "list.pth"
    torch.save([1, 2], listed)
    fails(listed, "holds a list, not a checkpoint dictionary")
    fails(good, "lacks 'optimizer'", required=("model", "optimizer"))

    # A checkpoint from before the integrity record loads, with a warning.
    old = tmp_path / "old.pth"
    torch.save(state, old)
    with pytest.warns(UserWarning, match="no integrity record"):
        assert utils.load_checkpoint(str(old))["epoch"] == 3


def test_atomic_save_keeps_the_previous_file_and_removes_partial_ones(tmp_path, monkeypatch):
    path, previous = tmp_path / "checkpoint.pth", tmp_path / "checkpoint.pth.prev"
    utils.atomic_save({"epoch": 0}, str(path), previous=str(previous))
    assert not previous.exists()
    utils.atomic_save({"epoch": 1}, str(path), previous=str(previous))
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert torch.load(previous, weights_only=True) == {"epoch": 0}
    # Without hard links (some network filesystems) the previous file is copied.
    monkeypatch.setattr(utils.os, "link", lambda *a: (_ for _ in ()).throw(OSError("no links")))
    utils.atomic_save({"epoch": 2}, str(path), previous=str(previous))
    assert torch.load(previous, weights_only=True) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint.pth.prev"]

    # What a save killed with SIGKILL leaves behind goes; other files stay.
    dead = _dead_pid()
    partial = [_partial_name(name, dead) for name in ("checkpoint.pth", "metrics.jsonl")]
    for name in partial:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "notes.tmp.txt").write_text("mine")
    names = ("checkpoint.pth", "checkpoint.pth.prev", "metrics.jsonl")
    assert utils.remove_partial_files(str(tmp_path), names) == (sorted(partial), [])
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint.pth",
        "checkpoint.pth.prev",
        "notes.tmp.txt",
    ]


# --------------------------------------------------------------------------------------
# The command line, checked before anything starts
# --------------------------------------------------------------------------------------


def _resolve(*flags: str):
    return train.resolve_args(train.get_args_parser().parse_args(list(flags)))


@pytest.mark.parametrize(
    "flags, name",
    [
        (["--print-freq", "0"], "--print-freq"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "-1"], "--epochs"),
        (["--dist-timeout", "0"], "--dist-timeout"),
        (["-b", "0"], "--batch-size"),
        (["--num-train", "0"], "--num-train"),
        (["--num-val", "-3"], "--num-val"),
        (["--image-size", "0"], "--image-size"),
        (["--image-size", "12"], "--image-size"),  # below 2 x --output-stride 8
        (["--base-width", "0"], "--base-width"),
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--momentum", "1.5"], "--momentum"),
        (["--weight-decay", "-0.5"], "--weight-decay"),
        (["--switch-lr-scale", "inf"], "--switch-lr-scale"),
        (["--lr-warmup-epochs", "-1"], "--lr-warmup-epochs"),
        (["--lr-warmup-decay", "0"], "--lr-warmup-decay"),
        (["--workers", "-1"], "--workers"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_numeric_flags_are_checked_with_their_name(flags, name):
    with pytest.raises(SystemExit, match=rf"^{name} must be .*got") as e:
        _resolve(*flags)
    assert flags[-1] in str(e.value) or name == "--image-size"


def test_every_numeric_flag_has_a_check():
    numeric = {
        a.dest
        for a in train.get_args_parser()._actions
        if a.type in (int, float) and a.choices is None
    }
    assert numeric == {key for key, _, _ in train._NUMERIC_FLAGS}
    _resolve("--epochs", "1", "--print-freq", "1", "--lr-warmup-epochs", "0")  # edges pass


@pytest.mark.parametrize("norm", ["sn", "ssn"])
def test_a_local_switchable_norm_with_one_image_stops_with_the_fixes(norm):
    with pytest.raises(SystemExit) as e:
        _resolve("--norm", norm, "-b", "1")
    message = str(e.value)
    assert f"--norm {norm}_nobn" in message and "using_bn=False" in message
    assert "-b 2" in message and f"--norm sync{norm}" in message
    _resolve("--norm", f"{norm}_nobn", "-b", "1")
    # Evaluation needs no batch statistics.
    _resolve("--norm", norm, "-b", "1", "--test-only")
    # A synchronized norm needs two images over all processes.
    args = _resolve("--norm", f"sync{norm}", "-b", "1")
    with pytest.raises(SystemExit, match=rf"--norm {norm}_nobn .*using_bn=False.*-b 2"):
        train.check_batch(args, world_size=1)
    train.check_batch(args, world_size=2)
    layer = train.norm_factory(f"{norm}_nobn")(8)
    assert not layer.using_bn and layer.running_mean is None


# --------------------------------------------------------------------------------------
# Single-process runs in this process
# --------------------------------------------------------------------------------------

# 4 training images in 2 steps, 2 validation images, a narrow network: a second an epoch.
HERE_ARGS = [*TINY, "--num-train", "4", "--num-val", "2", "--base-width", "8"]
_PLOTS = ("plot_curves", "plot_switch_weights")
_LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@pytest.fixture
def train_here(monkeypatch):
    """``train_here(out, *flags)`` runs train.py's main in this process, as one process
    (whatever launcher runs the suite), and returns its exit status. The pictures are
    stand-in files (drawing them takes seconds; the launched runs draw real ones)."""
    import syncsn

    for name in _PLOTS:
        monkeypatch.setattr(train, name, lambda what, path: Path(path).write_bytes(b"png"))

    for name in list(os.environ):
        if name in _LAUNCH_VARS or name.startswith(("SLURM_", "TORCHELASTIC_")):
            monkeypatch.delenv(name)
    handlers = {s: signal.getsignal(s) for s in utils.StopRequest.SIGNALS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(out: Path, *flags: str) -> int:
        return train.main(_resolve(*HERE_ARGS, "--output-dir", str(out), *flags))

    try:
        yield run
    finally:
        torch.set_num_threads(threads)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        syncsn.distributed.cleanup()


def _snapshot(out: Path) -> dict[str, bytes]:
    """The files of a run directory, without the lock file (each run rewrites it)."""
    return {
        p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != utils.LOCK_FILE
    }


@pytest.mark.timeout(120)
def test_resume_none_moves_the_earlier_run_aside(train_here, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_here(out, "--epochs", "1") == 0
    before = _snapshot(out)
    assert {"checkpoint.pth", "metrics.jsonl", "curves.png", "switch_weights.txt"} <= set(before)

    capsys.readouterr()
    # Starting over keeps every file of the earlier run, byte for byte.
    assert train_here(out, "--epochs", "1", "--resume", "none", "--seed", "4") == 0
    (aside,) = (out / "set-aside").iterdir()
    assert _snapshot(aside) == before
    assert f"moved {', '.join(n for n in train.RUN_FILES if n in before)} to {aside}" in (
        capsys.readouterr().out
    )
    assert [r["epoch"] for r in _rows(out)] == [0]
    assert _rows(out) != [json.loads(before["metrics.jsonl"])]  # a new run (seed 4)

    # The flag-mismatch error suggests --resume none, which is now safe to follow.
    now = _snapshot(out)
    with pytest.raises(SystemExit, match="--resume none \\(which moves the run") as e:
        train_here(out, "--epochs", "1", "--norm", "sn")
    assert str(out / "checkpoint.pth") in str(e.value)
    assert _snapshot(out) == now


def test_every_way_of_starting_over_sets_the_earlier_run_aside(tmp_path, capsys):
    def run_dir(name: str, files: tuple[str, ...]) -> Path:
        out = tmp_path / name
        out.mkdir()
        for file in files:
            (out / file).write_text(json.dumps({"epoch": 0}) + "\n" if file.endswith("l") else file)
        return out

    # No checkpoint (deleted, say) next to the metrics of a run: they are kept.
    out = run_dir("no_checkpoint", ("metrics.jsonl", "curves.png"))
    train.prepare_output_dir(str(out), None, 0)
    (aside,) = (out / "set-aside").iterdir()
    assert sorted(os.listdir(aside)) == ["curves.png", "metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == ""
    # A checkpoint from another directory: this one's run is not continued.
    out = run_dir("elsewhere", ("checkpoint.pth", "checkpoint.pth.prev", "metrics.jsonl"))
    train.prepare_output_dir(str(out), str(tmp_path / "other" / "checkpoint.pth"), 1)
    (aside,) = (out / "set-aside").iterdir()
    assert sorted(os.listdir(aside)) == ["checkpoint.pth", "checkpoint.pth.prev", "metrics.jsonl"]
    # Continuing the run in place moves nothing.
    out = run_dir("continue", ("checkpoint.pth", "metrics.jsonl"))
    train.prepare_output_dir(str(out), str(out / "checkpoint.pth"), 1)
    assert not (out / "set-aside").exists() and [r["epoch"] for r in _rows(out)] == [0]
    assert "held an earlier run: moved checkpoint.pth" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_a_damaged_checkpoint_stops_the_resume_and_the_previous_one_continues(
    train_here, tmp_path, capsys
):
    out = tmp_path / "run"
    assert train_here(out, "--epochs", "2") == 0
    ckpt, previous = out / "checkpoint.pth", out / "checkpoint.pth.prev"
    assert torch.load(previous, weights_only=True)["epoch"] == 0
    rows = _rows(out)
    _damage(ckpt)
    damaged = ckpt.read_bytes()

    with pytest.raises(SystemExit) as e:
        train_here(out, "--epochs", "3")
    message = str(e.value)
    assert f"checkpoint {ckpt} is damaged" in message
    assert f"{previous} (after epoch 0) is intact" in message
    assert f"--resume {previous}" in message
    assert ckpt.read_bytes() == damaged  # left as it was

    # Continue from the previous checkpoint; the next run also removes what a killed
    # save left behind.
    partial = _partial_name("checkpoint.pth", _dead_pid())
    (out / partial).write_bytes(damaged[:1000])
    capsys.readouterr()
    assert train_here(out, "--epochs", "3", "--resume", str(previous)) == 0
    log = capsys.readouterr().out
    assert "continuing at epoch 1\n" in log
    assert f"removed 1 partial file(s) of an interrupted save: {partial}" in log
    assert not list(out.glob(".*syncsn-tmp*"))
    # Nothing the earlier runs wrote is lost: the damaged file and the metrics of the
    # epoch trained again are set aside.
    (aside,) = (out / "set-aside").iterdir()
    assert (aside / "checkpoint.pth").read_bytes() == damaged
    assert [json.loads(line) for line in (aside / "metrics.jsonl").read_text().splitlines()] == rows
    assert [r["epoch"] for r in _rows(out)] == [0, 1, 2] and _rows(out)[0] == rows[0]
    assert utils.load_checkpoint(str(ckpt))["epoch"] == 2
    assert utils.load_checkpoint(str(previous))["epoch"] == 1


@pytest.mark.timeout(120)
def test_training_without_matplotlib_skips_the_pictures_with_one_warning(
    train_here, tmp_path, capsys, monkeypatch
):
    for name in _PLOTS:  # the real ones, which import matplotlib
        monkeypatch.setattr(train, name, getattr(utils, name))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    out = tmp_path / "run"
    assert train_here(out, "--epochs", "2") == 0
    err = capsys.readouterr().err
    assert err.count("matplotlib is not installed") == 1, err
    assert "pip install matplotlib" in err
    assert [r["epoch"] for r in _rows(out)] == [0, 1]
    assert (out / "switch_weights.txt").exists()
    assert not list(out.glob("*.png"))


def test_missing_pillow_or_tqdm_is_handled_at_start_up(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(SystemExit, match="--dataset voc needs Pillow.*pip install pillow"):
        train.check_dependencies(_resolve("--dataset", "voc", "--data-path", "/nowhere"))
    assert train.check_dependencies(_resolve())  # the synthetic data needs no Pillow
    # Without tqdm a terminal gets the log lines instead of a bar.
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    progress = utils.Progress("epoch 0/0", 2, 0, 0, print_freq=1, enabled=True)
    progress.update(loss=1.0)
    assert progress.bar is None and "epoch 0/0 [1/2] loss 1" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_sn_without_the_bn_scope_trains_on_one_image_per_process(train_here, tmp_path):
    out = tmp_path / "run"
    assert train_here(out, "--epochs", "1", "--norm", "sn_nobn", "-b", "1") == 0
    ckpt = utils.load_checkpoint(str(out / "checkpoint.pth"))
    assert ckpt["args"]["norm"] == "sn_nobn"
    assert "backbone.bn1.mean_weight" in ckpt["model"]
    assert not any("running_mean" in k for k in ckpt["model"])  # no BN scope anywhere
    assert ckpt["model"]["backbone.bn1.mean_weight"].shape == (2,)  # IN and LN


# --------------------------------------------------------------------------------------
# Launched runs on 2 gloo ranks
# --------------------------------------------------------------------------------------


def _reference_eval(ckpt: dict, val) -> tuple[float, float]:
    """Scores of a checkpoint on the whole validation set, in this process, one image at a
    time, with a confusion computed by loops: the reference for the distributed evaluation."""
    import syncsn

    a = ckpt["args"]
    net = model_mod.DeepLabV3(
        6, syncsn.SwitchNorm2d, a["backbone"], a["output_stride"], a["base_width"]
    )
    net.load_state_dict(ckpt["model"])  # a SyncSN state dict is an SN state dict
    net.eval()
    preds, targets = [], []
    with torch.no_grad():
        for i in range(len(val)):
            x, y = val[i]
            preds.append(net(x[None]).argmax(1)[0].numpy())
            targets.append(y.numpy())
    return _reference_scores(np.stack(preds), np.stack(targets), 6)


# One run directory taken through every phase, as a preempted cluster job would be:
#   1. torchrun --epochs 2, SIGTERM to the launcher during epoch 1 -> mid-epoch checkpoint
#   2. torchrun --epochs 2 again      -> resumes mid-epoch 1, finishes epoch 1
#   3. python --test-only             -> one process evaluates that checkpoint
#   4. torchrun --epochs 3 --max-restarts=1, SIGKILL of rank 1 during epoch 2 -> the
#      restarted group resumes from the checkpoint of epoch 1 and finishes
# Each launch costs seconds of start-up, so the phases share one fixture and the tests
# below check one aspect each.
STEPS = 10  # per epoch: 40 images / (2 processes x 2 images)
# A peer that never shows up fails the run after 60 s instead of hanging the test.
RUN_ARGS = [*TINY, "--num-train", "40", "--num-val", "5", "--dist-timeout", "60"]


def _load_ckpt(out: Path) -> dict:
    return torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("segmentation")
    out = tmp / "run"
    args = [*RUN_ARGS, "--output-dir", str(out)]
    result: dict = {"out": out}

    # 1. SIGTERM to torchrun during epoch 1.
    log = tmp / "1.txt"
    proc = _start(_torchrun_cmd([*args, "--epochs", "2"]), log)
    try:
        _wait_for(lambda: f"epoch 1/1 [2/{STEPS}]" in log.read_text(), 120, proc, "epoch 1")
        proc.send_signal(signal.SIGTERM)
        result["rc1"] = proc.wait(timeout=60)
    finally:
        _kill_tree(proc)
    result["log1"], result["rows1"], result["ckpt1"] = log.read_text(), _rows(out), _load_ckpt(out)

    # 2. Same command: resumes mid-epoch.
    result["rc2"], result["log2"] = _run(
        _torchrun_cmd([*args, "--epochs", "2"]), tmp / "2.txt", timeout=120
    )
    result["rows2"], result["ckpt2"] = _rows(out), _load_ckpt(out)
    result["files2"] = {
        name: (out / name).read_bytes()
        for name in ("curves.png", "switch_weights.png", "switch_weights.txt")
        if (out / name).exists()
    }
    result["listing2"] = sorted(os.listdir(out))

    # 3. Evaluation only, one process, no launcher.
    result["rc3"], result["log3"] = _run(
        [sys.executable, str(TRAIN), *args, "--epochs", "2", "--test-only"],
        tmp / "3.txt",
        timeout=60,
    )

    # 4. One more epoch; a worker is killed during it and the group restarts once.
    log = tmp / "4.txt"
    proc = _start(_torchrun_cmd([*args, "--epochs", "3"], max_restarts=1), log)
    try:
        _wait_for(lambda: f"epoch 2/2 [2/{STEPS}]" in log.read_text(), 120, proc, "epoch 2")
        os.kill(_worker_pid(proc.pid, 1), signal.SIGKILL)
        result["rc4"] = proc.wait(timeout=120)
    finally:
        _kill_tree(proc)
    result["log4"], result["rows4"] = log.read_text(), _rows(out)
    return result


@pytest.mark.timeout(420)
def test_sigterm_writes_a_mid_epoch_checkpoint(run):
    assert run["rc1"] != 0, run["log1"]  # stopped, not finished
    assert "received SIGTERM" in run["log1"]
    assert "stopped at epoch 1, step" in run["log1"], run["log1"]
    ckpt = run["ckpt1"]
    assert ckpt["epoch"] == 0 and 2 <= ckpt["step"] < STEPS
    assert [r["epoch"] for r in run["rows1"]] == [0]


@pytest.mark.timeout(420)
def test_training_writes_metrics_and_a_checkpoint(run):
    assert run["rc2"] == 0, run["log2"]
    rows = run["rows2"]
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert {"epoch", "train_loss", "miou", "pixel_acc", "lr", "images_per_sec"} <= set(r)
        assert np.isfinite(r["train_loss"]) and r["images_per_sec"] > 0
        assert 0 <= r["miou"] <= 1 and 0 <= r["pixel_acc"] <= 1
    assert rows[-1]["lr"] == 0.0  # the poly schedule ends at zero
    ckpt = run["ckpt2"]
    assert ckpt["epoch"] == 1 and ckpt["step"] == 0
    assert {"model", "optimizer", "lr_scheduler", "scaler"} <= set(ckpt)
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["norm"] == "syncsn"
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert not [p for p in run["listing2"] if "syncsn-tmp" in p]
    files = run["files2"]
    for name in ("curves.png", "switch_weights.png"):
        assert Image.open(io.BytesIO(files[name])).size[0] > 100, name
    table = files["switch_weights.txt"].decode()
    assert "backbone.layer1.0.bn1" in table and "mean IN" in table


@pytest.mark.timeout(420)
def test_resume_continues_mid_epoch_and_at_the_next_epoch(run):
    step = run["ckpt1"]["step"]
    assert f"continuing at epoch 1, step {step}" in run["log2"]
    # The interrupted epoch is finished, not restarted.
    assert f"[{step + 1}/{STEPS}]" in run["log2"] and f"epoch 1/1 [1/{STEPS}]" not in run["log2"]
    assert [r["epoch"] for r in run["rows2"]] == [0, 1]
    assert run["rows2"][0] == run["rows1"][0]
    # --epochs 3 after --epochs 2 continues with epoch 2.
    assert "continuing at epoch 2\n" in run["log4"]


@pytest.mark.timeout(420)
def test_evaluation_counts_each_image_once(run):
    # 5 validation images on 2 ranks: a padded sampler would count 6.
    val = data.SyntheticShapes(5, 32, seed=3, split="val")
    pixels = sum(int((val[i][1] != 255).sum()) for i in range(5))
    for r in run["rows2"]:
        assert r["val_images"] == 5 and r["val_pixels"] == pixels
    # The distributed evaluation of the last epoch equals one in this process.
    miou, acc = _reference_eval(run["ckpt2"], val)
    last = run["rows2"][-1]
    assert last["miou"] == pytest.approx(miou, abs=2e-3)
    assert last["pixel_acc"] == pytest.approx(acc, abs=2e-3)
    # --test-only in a single process gives the same figures.
    assert run["rc3"] == 0, run["log3"]
    result = json.loads((run["out"] / "eval.json").read_text())
    assert result["num_images"] == 5 and result["num_pixels"] == pixels
    assert result["miou"] == pytest.approx(last["miou"], abs=2e-3)


@pytest.mark.timeout(420)
def test_killed_worker_restarts_from_the_last_checkpoint(run):
    log = run["log4"]
    assert run["rc4"] == 0, log
    # Started at epoch 2, killed during it, restarted from the same checkpoint.
    assert log.count("continuing at epoch 2\n") == 2, log
    assert [r["epoch"] for r in run["rows4"]] == [0, 1, 2]
    assert run["rows4"][:2] == run["rows2"]


@pytest.mark.timeout(120)
def test_single_process_run_on_a_voc_tree_and_the_bad_dataset_error(tmp_path):
    """Real-dataset path end to end (random scale/crop, full-size validation images of
    different sizes), then the error a broken tree gives on the command line."""
    labels = make_voc(tmp_path / "voc", n_train=4, n_val=3)
    out = tmp_path / "run"
    args = [*TINY, "--dataset", "voc", "--data-path", str(tmp_path / "voc"), "--norm", "sn"]
    args += ["--base-width", "8", "--epochs", "1", "--output-dir", str(out)]
    rc, log = _run([sys.executable, str(TRAIN), *args], tmp_path / "a.txt", timeout=60)
    assert rc == 0, log
    (row,) = _rows(out)
    assert row["val_images"] == 3
    assert row["val_pixels"] == sum(int((v != 255).sum()) for k, v in labels.items() if "val" in k)

    (tmp_path / "voc/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    rc, log = _run([sys.executable, str(TRAIN), *args], tmp_path / "b.txt", timeout=60)
    assert rc != 0
    assert "missing split list" in log and "ImageSets/Segmentation/val.txt" in log
    assert "SegmentationClass/<id>.png" in log  # the expected layout is shown
    assert "Traceback" not in log
