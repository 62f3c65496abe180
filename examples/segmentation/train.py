"""Distributed semantic segmentation training: DeepLabV3 on a dilated ResNet with
synchronized Switchable Normalization (or any other norm of the syncsn registry).

    torchrun --nproc_per_node=2 examples/segmentation/train.py           # CPU, ~3 minutes
    torchrun --nproc_per_node=8 examples/segmentation/train.py \\
        --dataset voc --data-path /data --norm syncsn                     # 8 GPUs, 2 img each

Defaults that depend on the dataset (image size, backbone, epochs, ...) come from PRESETS;
any flag given on the command line wins. Outputs go to --output-dir: checkpoint.pth (and
checkpoint.pth.prev, the one before), metrics.jsonl, curves.png and, for the Switchable
Normalization family, switch_weights.txt / switch_weights.png. A run that starts over in a
directory holding another run moves that run to <output-dir>/set-aside/ first. One run at a
time uses a directory: rank 0 holds a lock on <output-dir>/run.lock while it runs, and a
second run started there stops at once, naming the first.

The layout follows torchvision's reference scripts: get_args_parser / resolve_args, the
builders, the checkpoint helpers, train_one_epoch, evaluate and main.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from data import DATASETS, IGNORE_INDEX, DatasetLayoutError, build_dataset
from metrics import ConfusionMatrix, ShardSampler
from model import BACKBONES, DeepLabV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from utils import (
    CheckpointError,
    DirectoryInUse,
    DirectoryLock,
    Progress,
    ResumableSampler,
    StopRequest,
    WriteError,
    atomic_save,
    describe_holder,
    ignore_stop_signals,
    load_checkpoint,
    lr_factor,
    move_aside,
    plot_curves,
    plot_switch_weights,
    read_jsonl,
    remove_partial_files,
    with_integrity,
    write_jsonl,
    write_text,
)

import syncsn
from syncsn.distributed import init_distributed

# --norm choices -> (name in syncsn's registry, constructor arguments).
NORMS: dict[str, tuple[str, dict[str, object]]] = {
    "syncsn": ("SyncSN", {}),
    "sn": ("SN", {}),
    # Without the BN scope: the SN authors' setting for one image per GPU, where a local
    # layer has no batch statistics.
    "sn_nobn": ("SN", {"using_bn": False}),
    "syncbn": ("SyncBN", {}),
    "bn": ("BN", {}),
    "gn": ("GN", {}),
    "syncssn": ("SyncSSN", {}),
    "ssn": ("SSN", {}),
    "ssn_nobn": ("SSN", {"using_bn": False}),
}
SPARSE_NORMS = ("syncssn", "ssn", "ssn_nobn")
# Switchable norms whose BN scope needs two images or more per step: per process for the
# local ones, over all processes for the synchronized ones.
_LOCAL_BN_SCOPE = {"sn": "SN", "ssn": "SSN"}
_SYNC_BN_SCOPE = {"syncsn": "sn", "syncssn": "ssn"}

# Per-dataset defaults for the flags left at None. The synthetic preset is sized so that
# `torchrun --nproc_per_node=2 train.py` trains to a clear result in about three minutes on
# a 2-core CPU; the others follow the usual DeepLabV3 recipes (crop, schedule).
PRESETS: dict[str, dict[str, object]] = {
    "synthetic": dict(
        image_size=64,
        num_train=800,
        num_val=400,
        backbone="resnet18",
        base_width=16,
        output_stride=8,
        epochs=5,
        lr=0.02,
        lr_warmup_epochs=0.2,
        # A thousand steps are few for the switch logits to move at the base rate: train
        # them faster, so the short run shows which normalizer each layer prefers.
        switch_lr_scale=10.0,
    ),
    "voc": dict(
        image_size=513,
        backbone="resnet101",
        base_width=64,
        output_stride=8,
        epochs=50,
        lr=0.01,
        lr_warmup_epochs=1,
    ),
    "cityscapes": dict(
        image_size=769,
        backbone="resnet101",
        base_width=64,
        output_stride=8,
        epochs=240,
        lr=0.01,
        lr_warmup_epochs=5,
    ),
    "ade20k": dict(
        image_size=512,
        backbone="resnet101",
        base_width=64,
        output_stride=8,
        epochs=60,
        lr=0.01,
        lr_warmup_epochs=1,
    ),
}
# Keys that must match to resume from a checkpoint (the model would not load otherwise).
_MODEL_ARGS = ("dataset", "backbone", "base_width", "output_stride", "norm", "convert")

# Files of a run in --output-dir. A run that does not continue the one found there moves
# them aside first (never deletes or overwrites them).
CHECKPOINT = "checkpoint.pth"
PREVIOUS_CHECKPOINT = "checkpoint.pth.prev"  # the one before the last, kept by every save
METRICS = "metrics.jsonl"
RUN_FILES = (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    METRICS,
    "curves.png",
    "switch_weights.txt",
    "switch_weights.png",
    "eval.json",
)
_TRAINING_STATE = ("model", "optimizer", "lr_scheduler", "scaler", "epoch", "step", "args")
_INSTALL_EXAMPLES = "pip install 'syncsn[examples]'"


def log(*msg: object) -> None:
    """print() on global rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*msg, flush=True)


def warn(msg: str) -> None:
    """One warning line on stderr, on global rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DeepLabV3 segmentation with synchronized Switchable Normalization",
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="synthetic", choices=DATASETS)
    p.add_argument("--data-path", default=None, help="root of the dataset on disk")
    p.add_argument("--num-train", type=int, default=None, help="use the first N (synthetic: N)")
    p.add_argument("--num-val", type=int, default=None, help="use the first N (synthetic: N)")
    p.add_argument("--image-size", type=int, default=None, help="training crop side, pixels")
    p.add_argument("--backbone", default=None, choices=BACKBONES)
    p.add_argument("--base-width", type=int, default=None, help="first-stage channels (64)")
    p.add_argument("--output-stride", type=int, default=None, choices=(8, 16))
    p.add_argument(
        "--norm",
        default="syncsn",
        choices=tuple(NORMS),
        help="normalization layer; sn_nobn / ssn_nobn: SN / SSN without the BN scope",
    )
    p.add_argument(
        "--convert",
        action="store_true",
        help="build with BatchNorm2d, then convert_sync_switchnorm (needs --norm syncsn)",
    )
    p.add_argument("-b", "--batch-size", type=int, default=2, help="images per process")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="base learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", "--wd", type=float, default=1e-4)
    p.add_argument(
        "--switch-lr-scale",
        type=float,
        default=None,
        help="learning rate of the SN/SSN switch logits relative to --lr",
    )
    p.add_argument("--lr-warmup-epochs", type=float, default=None)
    p.add_argument("--lr-warmup-decay", type=float, default=0.01, help="first warm-up factor")
    p.add_argument(
        "-j", "--workers", type=int, default=None, help="data workers per process (auto)"
    )
    p.add_argument("--amp", action="store_true", help="mixed precision (fp16+GradScaler on CUDA)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--output-dir", default="runs/segmentation", help="this run's directory (one run at a time)"
    )
    p.add_argument(
        "--resume",
        default="auto",
        help="auto: continue from <output-dir>/checkpoint.pth if it exists; none: start over "
        "(an earlier run in <output-dir> is moved to <output-dir>/set-aside/); or a path",
    )
    p.add_argument("--test-only", action="store_true", help="only evaluate the checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dist-backend", default=None, help="nccl on CUDA, gloo otherwise")
    p.add_argument("--dist-timeout", type=int, default=1800, help="seconds")
    p.add_argument("--print-freq", type=int, default=20, help="steps between log lines")
    return p


# Every numeric flag: (attribute, accepts(value), what it must be). None (a preset that
# does not exist, such as --num-train of a dataset on disk: all images) is always allowed.
_NUMERIC_FLAGS: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("num_train", lambda v: v >= 1, "an integer >= 1"),
    ("num_val", lambda v: v >= 1, "an integer >= 1"),
    ("image_size", lambda v: v >= 1, "an integer >= 1"),
    ("base_width", lambda v: v >= 1, "an integer >= 1"),
    ("batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("epochs", lambda v: v >= 1, "an integer >= 1"),
    ("lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("momentum", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("switch_lr_scale", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("lr_warmup_epochs", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("lr_warmup_decay", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("workers", lambda v: v >= 0, "an integer >= 0"),
    ("seed", lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
    ("dist_timeout", lambda v: v >= 1, "a number of seconds >= 1"),
    ("print_freq", lambda v: v >= 1, "an integer >= 1"),
)


def check_numeric_args(args: argparse.Namespace) -> None:
    """Stops with the flag's name when a numeric flag is out of its range."""
    for key, accepts, expected in _NUMERIC_FLAGS:
        value = getattr(args, key)
        if value is not None and not accepts(value):
            raise SystemExit(f"--{key.replace('_', '-')} must be {expected}, got {value!r}")
    # The deepest feature map must hold 2x2 pixels: the IN scope of SN and SSN needs two.
    if args.image_size < 2 * args.output_stride:
        raise SystemExit(
            f"--image-size must be at least 2 x --output-stride = {2 * args.output_stride} "
            f"(the deepest feature map needs 2x2 pixels), got {args.image_size}"
        )


def smallest_batch(norm: str, world_size: int) -> int:
    """The fewest images per process a training step of ``--norm norm`` can take: the BN
    scope of a switchable norm needs two, in each process for the local ones and over all
    processes for the synchronized ones."""
    if norm in _LOCAL_BN_SCOPE:
        return 2
    if norm in _SYNC_BN_SCOPE:
        return -(-2 // world_size)
    return 1


def check_batch(args: argparse.Namespace, world_size: int | None) -> None:
    """Stops before training when the BN scope of a switchable norm would see one image.
    world_size None (not known yet) checks the local norms only."""
    if args.test_only:
        return  # evaluation uses the running statistics
    fixes = "a larger batch (-b 2 or more)"
    if args.norm in _LOCAL_BN_SCOPE and args.batch_size < smallest_batch(args.norm, 1):
        name = _LOCAL_BN_SCOPE[args.norm]
        raise SystemExit(
            f"--norm {args.norm} with -b {args.batch_size}: a local {name} layer takes the "
            "statistics of its BN scope over the images of its own process, and one image "
            f"has none, so training would stop at its first step. Use --norm {args.norm}_nobn "
            f"({name} without the BN scope, using_bn=False: the SN authors' setting for one "
            f"image per GPU), {fixes}, or --norm sync{args.norm} (the BN scope over the "
            "images of all processes)"
        )
    sync = args.norm in _SYNC_BN_SCOPE
    if sync and world_size is not None and args.batch_size < smallest_batch(args.norm, world_size):
        local = _SYNC_BN_SCOPE[args.norm]
        raise SystemExit(
            f"--norm {args.norm} with -b {args.batch_size} on {world_size} process: the "
            "synchronized BN scope sees one image in all, and one image has no batch "
            f"statistics. Use --norm {local}_nobn ({local.upper()} without the BN scope, "
            f"using_bn=False), {fixes}, or more processes (torchrun --nproc_per_node=2)"
        )


def check_dependencies(args: argparse.Namespace) -> bool:
    """Optional packages (the examples extra): stops when the dataset cannot be read;
    returns whether the pictures can be drawn (a warning says so when not)."""
    if args.dataset != "synthetic" and not _installed("PIL"):
        raise SystemExit(
            f"reading --dataset {args.dataset} needs Pillow, which is not installed: "
            f"pip install pillow (or {_INSTALL_EXAMPLES})"
        )
    if args.test_only or _installed("matplotlib"):
        return True
    warn(
        "matplotlib is not installed: curves.png and switch_weights.png will not be drawn "
        f"(metrics.jsonl and switch_weights.txt are written). To get them: pip install "
        f"matplotlib (or {_INSTALL_EXAMPLES})"
    )
    return False


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module in sys.modules without a spec
        return module in sys.modules and sys.modules[module] is not None


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fills flags left at None from the dataset's preset and checks every value and
    combination, so that a bad command line stops before anything starts."""
    for key, value in PRESETS[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.switch_lr_scale is None:
        # SSN authors: a tenth of the learning rate; SN authors: the same.
        args.switch_lr_scale = 0.1 if args.norm in SPARSE_NORMS else 1.0
    if args.workers is None:
        # Leave one core per process for the training loop itself.
        cores = len(os.sched_getaffinity(0))
        per_proc = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        args.workers = max(0, min(8, per_proc - 1))
    check_numeric_args(args)
    if args.convert and args.norm != "syncsn":
        raise SystemExit(
            f"--convert builds a SyncSN network; it needs --norm syncsn, got {args.norm}"
        )
    check_batch(args, world_size=None)  # main() checks again once the world size is known
    if args.resume not in ("auto", "none") and not os.path.isfile(args.resume):
        raise SystemExit(f"--resume {args.resume!r}: no such checkpoint file")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise SystemExit(
            f"--output-dir {args.output_dir} is a file, not a directory: pass another "
            "--output-dir (the file is left as it is)"
        )
    return args


# --------------------------------------------------------------------------------------
# Data, model, optimizer
# --------------------------------------------------------------------------------------


@dataclass
class Data:
    """What build_data returns: the datasets, the training sampler and both loaders."""

    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    num_classes: int
    train_sampler: ResumableSampler
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int


def build_data(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> Data:
    """Datasets, samplers and loaders; every rank trains on its own shard of each epoch."""
    common = dict(data_path=args.data_path, image_size=args.image_size, seed=args.seed)
    train_set, num_classes = build_dataset(
        args.dataset, "train", num_samples=args.num_train, **common
    )
    val_set, _ = build_dataset(args.dataset, "val", num_samples=args.num_val, **common)
    train_sampler = ResumableSampler(
        len(train_set),
        rank,
        world,
        args.batch_size,
        args.seed,
        min_batch=min(args.batch_size, smallest_batch(args.norm, world)),
    )
    loader_kw = dict(
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_stop_signals,
    )
    # The sampler yields whole batches only, but for the smaller last step of a resumed epoch.
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, sampler=train_sampler, drop_last=False, **loader_kw
    )
    # Full-size images of the datasets on disk differ in size: evaluate them one at a time.
    val_batch = args.batch_size if args.dataset == "synthetic" else 1
    val_loader = DataLoader(
        val_set, batch_size=val_batch, sampler=ShardSampler(len(val_set), rank, world), **loader_kw
    )
    steps_per_epoch = len(train_set) // (world * args.batch_size)
    if steps_per_epoch == 0 and not args.test_only:
        raise SystemExit(
            f"{len(train_set)} training images cannot fill one step of {args.batch_size} "
            f"images on each of {world} processes: raise --num-train or lower --batch-size"
        )
    return Data(
        train_set, val_set, num_classes, train_sampler, train_loader, val_loader, steps_per_epoch
    )


def norm_factory(norm: str) -> Callable[[int], nn.Module]:
    """``--norm`` -> ``f(num_channels) -> nn.Module`` built by syncsn's registry."""
    name, kwargs = NORMS[norm]
    if name == "GN":
        # 32 groups as in the GroupNorm paper, fewer where the channels do not divide.
        return lambda c: syncsn.build_norm_layer(name, c, num_groups=math.gcd(32, c))
    return lambda c: syncsn.build_norm_layer(name, c, **kwargs)


def norm_description(norm: str) -> str:
    """``--norm`` as the log shows it: ``SN(using_bn=False)``."""
    name, kwargs = NORMS[norm]
    return name + (f"({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else "")


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    norm = nn.BatchNorm2d if args.convert else norm_factory(args.norm)
    model = DeepLabV3(num_classes, norm, args.backbone, args.output_stride, args.base_width)
    if args.convert:
        model = syncsn.convert_sync_switchnorm(model)
    return model


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    # Switch logits of SN / SSN layers get their own learning rate; SSN's are not decayed
    # (decay pulls them towards equal weights, against sparsestmax), SN's are, as in the
    # SN authors' recipe. Models without switches get one group.
    sparse = args.norm in SPARSE_NORMS
    params = syncsn.param_groups(
        model,
        args.lr,
        args.weight_decay,
        switch_lr_scale=args.switch_lr_scale,
        switch_weight_decay=0.0 if sparse else args.weight_decay,
    )
    return torch.optim.SGD(
        params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels; 0 (not NaN) when a crop has none."""
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


# --------------------------------------------------------------------------------------
# Checkpoints and the output directory
# --------------------------------------------------------------------------------------


@dataclass
class EpochTotals:
    """Sums over the steps done so far in the current epoch; a mid-epoch checkpoint keeps
    them (as ``partial``) so that the resumed epoch reports the whole epoch.

    ``images`` is also the position in the epoch: the samples of the epoch's global order
    trained so far (see ResumableSampler), which means the same at any world size and
    batch size. ``loss_sum`` weighs each step's mean loss by its images, so that
    ``loss_sum / images`` is the epoch's mean even when its steps differ in size (an epoch
    resumed with another world size or batch size).

    ``end`` is where the epoch ends in its order: the samples a fresh epoch of the run that
    started it trains (whole steps of its world size and batch size), kept through any
    number of resumes; None until the epoch has started.
    """

    loss_sum: float = 0.0
    images: int = 0
    train_time: float = 0.0
    end: int | None = None

    def add_step(self, mean_loss: float, images: int) -> None:
        self.loss_sum += mean_loss * images
        self.images += images

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.images


def resume_path(args: argparse.Namespace) -> str | None:
    """The checkpoint to start from: None for a fresh start."""
    if args.resume == "none":
        return None
    if args.resume == "auto":
        path = os.path.join(args.output_dir, CHECKPOINT)
        return path if os.path.exists(path) else None
    return args.resume


def load_resume_checkpoint(path: str, args: argparse.Namespace) -> dict:
    """Loads and verifies ``path``; a damaged or foreign file stops the run with what is
    wrong and, where the output directory keeps an intact previous checkpoint, how to
    continue from it."""
    required = ("model", "args", "epoch", "step") if args.test_only else _TRAINING_STATE
    try:
        ckpt = load_checkpoint(path, required)
    except CheckpointError as e:
        hint = ""
        previous = os.path.join(os.path.dirname(path), PREVIOUS_CHECKPOINT)
        if os.path.basename(path) == CHECKPOINT and os.path.isfile(previous):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    epoch = load_checkpoint(previous, required)["epoch"]
                hint = (
                    f" The previous checkpoint {previous} (after epoch {epoch}) is intact: "
                    f"continue from it with --resume {previous}."
                )
            except CheckpointError as prev_error:
                hint = f" The previous one is no better: {prev_error}."
        raise SystemExit(
            f"cannot resume: {e}.{hint} To start over instead, pass --resume none (the run "
            f"in {args.output_dir} is then moved to {args.output_dir}/set-aside/, not deleted) "
            "or another --output-dir"
        ) from None
    check_compatible(ckpt["args"], args, path)
    return ckpt


def resumed_totals(
    ckpt: dict, path: str, args: argparse.Namespace, train_images: int
) -> EpochTotals:
    """The totals, and so the position, of the epoch a checkpoint stopped in (zeros for an
    end-of-epoch checkpoint). A position counts samples of the epoch's global order, valid
    at any world size and batch size; it stops the run when that order is another one."""
    if ckpt["step"] == 0:
        return EpochTotals()
    partial = dict(ckpt.get("partial") or {})
    saved_args, epoch = ckpt["args"], ckpt["epoch"] + 1
    this_world = dist.get_world_size() if dist.is_initialized() else 1
    step_images = saved_args["batch_size"] * ckpt.get("world_size", this_world)
    saved_images = ckpt.get("train_images", train_images)
    if "images" not in partial:
        # Written before positions were counted in samples: its world size and training
        # set size are unknown.
        warn(
            f"checkpoint {path} stopped epoch {epoch} after {ckpt['step']} steps but does not "
            f"say on how many processes, nor how many training images it had: taken as "
            f"{this_world} (this run's) x {saved_args['batch_size']} images per step and "
            f"{train_images} images (this run's). If it ran on another number of processes or "
            "another training set, resume it with those, or start the epoch over from the "
            "checkpoint written at its start"
        )
        partial["loss_sum"] = partial.get("loss_sum", 0.0) * step_images
        partial["images"] = ckpt["step"] * step_images
    if partial.get("end") is None:  # where a fresh epoch of the checkpoint's run ends
        partial["end"] = saved_images // step_images * step_images
    if partial["images"] > partial["end"]:  # an older checkpoint, taken at the wrong size
        raise SystemExit(
            f"checkpoint {path} stopped epoch {epoch} after {ckpt['step']} steps: at "
            f"{step_images} images per step that would be {partial['images']} images, more "
            f"than the {partial['end']} of the epoch, so it ran on fewer processes or another "
            "training set. Resume it with those, or start the epoch over from the checkpoint "
            "written at its start"
        )
    order = (saved_images, saved_args.get("seed"))
    if order != (train_images, args.seed):
        raise SystemExit(
            f"checkpoint {path} stopped epoch {epoch} after {partial['images']} images of the "
            f"order drawn for {order[0]} training images and --seed {order[1]}; this run has "
            f"{train_images} training images and --seed {args.seed}, so that position would "
            f"repeat some images and skip others. Resume with --seed {order[1]} and the same "
            "training set (--num-train), or start the epoch over from an end-of-epoch "
            "checkpoint (checkpoint.pth.prev, if it is one)"
        )
    return EpochTotals(**partial)


def resume_description(
    ckpt: dict, totals: EpochTotals, args: argparse.Namespace, world: int
) -> str:
    """Where a resumed run starts: ``epoch 3, step 7``, or with another world size or batch
    size ``epoch 3 after 28 of its images (trained 2 x 2 per step; now 1 x 4)``."""
    where = f"epoch {ckpt['epoch'] + 1}"
    if not totals.images:
        return where
    saved = (ckpt.get("world_size", world), ckpt["args"]["batch_size"])
    if saved == (world, args.batch_size):
        return f"{where}, step {ckpt['step']}"
    return (
        f"{where} after {totals.images} of its images (trained {saved[0]} x {saved[1]} per step; "
        f"now {world} x {args.batch_size})"
    )


def _covers(start_epoch: int, args: argparse.Namespace) -> str:
    return (
        f"already covers {start_epoch} epoch(s) of --epochs {args.epochs}: nothing to train "
        "(raise --epochs; or start over with another --output-dir, or with --resume none, which "
        "moves this run to its set-aside/ folder)"
    )


def check_epochs_left(path: str, start_epoch: int, args: argparse.Namespace) -> None:
    """Stops, before anything in --output-dir moves, when ``--resume PATH`` names a
    checkpoint with nothing left to train (``--resume auto`` in a finished run is a no-op)."""
    if args.resume != "auto" and start_epoch >= args.epochs:
        raise SystemExit(f"--resume {path} {_covers(start_epoch, args)}; nothing was moved")


def move_schedules(
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
    radius: syncsn.RadiusSchedule | None,
    step: int,
) -> None:
    """Puts the learning-rate (and SSN radius) schedules at ``step`` (a no-op where they are
    there): an epoch resumed with another world size or batch size has another number of
    steps left than the checkpoint's schedules count."""
    if lr_scheduler.last_epoch != step:
        lr_scheduler.last_epoch = step
        groups = lr_scheduler.optimizer.param_groups
        for group, base, factor in zip(
            groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(step)
    if radius is not None and radius.last_step != step:
        radius.load_state_dict({"last_step": step, "total_steps": radius.total_steps})


def check_compatible(saved: dict, args: argparse.Namespace, path: str) -> None:
    diff = [
        f"--{k.replace('_', '-')} {saved.get(k)!r} (now {getattr(args, k)!r})"
        for k in _MODEL_ARGS
        if saved.get(k) != getattr(args, k)
    ]
    if diff:
        raise SystemExit(
            f"checkpoint {path} was written with {', '.join(diff)}; pass the same flags, "
            "another --output-dir, or --resume none (which moves the run in --output-dir to "
            "its set-aside/ folder)"
        )


def _continues_run(path: str | None, output_dir: str) -> bool:
    """Whether ``path`` is one of the checkpoints of the run in ``output_dir``."""
    return (
        path is not None
        and os.path.basename(path) in (CHECKPOINT, PREVIOUS_CHECKPOINT)
        and os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(output_dir)
    )


# flock's errors on a filesystem without locks (NFS without a lock daemon, Lustre without
# -o flock).
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


def claim_output_dir(output_dir: str, device: torch.device) -> DirectoryLock | None:
    """Makes ``output_dir`` this run's: rank 0 creates it and takes its lock (held until
    the run ends or the process dies) and every rank learns whether it could, so that when
    another run holds the directory, it cannot be written, or rank 0 fails in any other way,
    all ranks stop at once. Returns the lock on rank 0, None elsewhere."""
    lock, problem, claimed = None, "", False
    try:
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                lock = DirectoryLock(output_dir)
                lock.acquire()
            except DirectoryInUse as e:
                lock, problem = None, _in_use(output_dir, e.holder)
            except OSError as e:
                lock = None
                if e.errno in _NO_LOCKS:
                    warn(
                        f"cannot lock {e.filename}: {e.strerror}. The filesystem of --output-dir "
                        "has no file locks (Lustre: mount it with -o flock), so a second run "
                        "started in this directory would not be stopped; this one goes on"
                    )
                else:
                    problem = output_error(e, output_dir) or f"--output-dir {output_dir}: {e}"
        claimed = not problem
    finally:
        # Also when rank 0 raised: the other ranks would otherwise wait in the broadcast
        # for the whole --dist-timeout.
        if dist.is_initialized() and dist.get_world_size() > 1:
            refused = torch.tensor([float(not claimed)], device=device)
            dist.broadcast(refused, 0)
            if dist.get_rank() != 0 and refused.item():
                raise SystemExit(
                    f"rank {dist.get_rank()}: stopped, rank 0 could not take {output_dir}"
                )
    if problem:
        raise SystemExit(problem)
    return lock


def _in_use(output_dir: str, holder: dict) -> str:
    checkpoint = os.path.join(output_dir, CHECKPOINT)
    return (
        f"--output-dir {output_dir} is in use by another run, {describe_holder(holder)}. Wait "
        "for it to end or stop it, or pass another --output-dir (to evaluate its checkpoint "
        f"meanwhile: --test-only --resume {checkpoint} --output-dir OTHER)"
    )


def output_error(e: OSError, output_dir: str) -> str | None:
    """One line for an OSError on a file of --output-dir (disk full, read-only, not a
    directory, unreadable): whether reading or writing it failed, the path, the cause and
    what to do. None for errors elsewhere."""
    path = e.filename
    if path is None:
        return None
    inside = os.path.realpath(path) + os.sep
    if not inside.startswith(os.path.realpath(output_dir) + os.sep):
        return None
    cause = f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})"
    if not isinstance(e, WriteError):
        if e.errno in (errno.EACCES, errno.EPERM):
            fix = "make it readable or pass another --output-dir"
        else:
            fix = "check the file and its disk, or pass another --output-dir"
        return f"cannot read {path}: {cause}; {fix}. Nothing already written there is lost"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space there or pass another --output-dir"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "make it writable or pass another --output-dir"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        fix = "a file stands where a directory is needed: pass another --output-dir"
    else:
        fix = "check that --output-dir can be written, or pass another"
    return f"cannot write {path}: {cause}; {fix}. Nothing already written there is lost"


def write_eval(output_dir: str, result: dict) -> None:
    """Rank 0: eval.json of a --test-only run; an earlier one is moved aside first."""
    path = os.path.join(output_dir, "eval.json")
    if os.path.exists(path):
        where = move_aside(output_dir, ["eval.json"])
        log(f"moved the earlier eval.json to {where}")
    write_text(path, json.dumps(result) + "\n")


def prepare_output_dir(output_dir: str, resumed_from: str | None, start_epoch: int) -> None:
    """Rank 0, before training: removes the partial files of a killed save and makes room
    for this run without losing anything an earlier one wrote.

    Continuing the run found there keeps its history up to the checkpoint. Starting over
    (``--resume none``, no checkpoint, or one from elsewhere) moves its files to
    ``set-aside/<time>/``; so do the files that continuing from an older checkpoint would
    replace (the newer checkpoint, metrics of the epochs that will be trained again).
    """
    removed, left = remove_partial_files(output_dir, RUN_FILES)
    if removed:
        log(f"removed {len(removed)} partial file(s) of an interrupted save: {', '.join(removed)}")
    if left:
        warn(
            f"left {', '.join(left)} in {output_dir}: partial file(s) of a save by a process "
            "that is alive or on another host; remove them once no run writes there"
        )
    metrics_path = os.path.join(output_dir, METRICS)
    if _continues_run(resumed_from, output_dir):
        rows = read_jsonl(metrics_path)
        history = [r for r in rows if r["epoch"] < start_epoch]
        aside = [METRICS] if len(history) < len(rows) else []
        newer = os.path.join(output_dir, CHECKPOINT)
        if os.path.basename(resumed_from) != CHECKPOINT and os.path.exists(newer):
            aside.append(CHECKPOINT)
        if aside:
            where = move_aside(output_dir, aside)
            log(f"continuing from {resumed_from}: moved {', '.join(aside)} to {where}")
        write_jsonl(metrics_path, history)
        return
    present = [n for n in RUN_FILES if os.path.exists(os.path.join(output_dir, n))]
    if present:
        where = move_aside(output_dir, present)
        log(
            f"{output_dir} held an earlier run: moved {', '.join(present)} to {where} "
            "(nothing deleted); starting over"
        )
    write_jsonl(metrics_path, [])


def save_checkpoint(
    path: str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    radius: syncsn.RadiusSchedule | None,
    epoch: int,
    step: int,
    totals: EpochTotals,
    train_images: int,
    args: argparse.Namespace,
) -> None:
    """Rank 0 writes the training state with its checksum; the file it replaces is kept
    as ``checkpoint.pth.prev``.

    epoch: the last completed epoch (-1 for none); step: the steps already done in the
    next one (0 at an epoch's end); totals: that epoch's so far, with the position in it;
    train_images: the size of the training set, whose sample order the position counts in.
    """
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "radius_schedule": radius.state_dict() if radius is not None else None,
        "epoch": epoch,
        "step": step,
        "partial": asdict(totals),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "train_images": train_images,
        "args": vars(args),
    }
    previous = os.path.join(os.path.dirname(path), PREVIOUS_CHECKPOINT)
    atomic_save(with_integrity(state), path, previous=previous)


# --------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers everywhere: local norms' running statistics drift apart after the
    last step, and evaluation and checkpoint should describe one model."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buf in model.buffers():
            dist.broadcast(buf, 0)


def global_step_stats(loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
    """One all-reduce per step: the mean loss over ranks and whether any rank was asked to
    stop. Deciding together keeps every rank in the same collective sequence."""
    buf = torch.stack([loss.detach().float(), torch.tensor(float(stop), device=loss.device)])
    world = 1
    if dist.is_initialized():
        dist.all_reduce(buf)
        world = dist.get_world_size()
    return float(buf[0]) / world, bool(buf[1] > 0)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """fp16 on CUDA (with GradScaler), bfloat16 on CPU (no scaler needed)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    radius: syncsn.RadiusSchedule | None,
    data: Data,
    device: torch.device,
    epoch: int,
    args: argparse.Namespace,
    stop: StopRequest,
    totals: EpochTotals | None = None,
) -> tuple[int, bool, EpochTotals]:
    """Trains ``epoch``; a resumed one from the position in ``totals`` (the images of the
    epoch's order trained before), whatever world size and batch size trained those.

    The learning-rate (and SSN radius) schedules count this run's steps as if every epoch
    had been trained with this world size and batch size: the epoch starts so many steps
    before step ``(epoch + 1) * steps_per_epoch`` as it has left, so that it ends there
    whatever a resume left of it, and the last epoch ends the schedules.

    Returns (steps done in the epoch, counted in this run's steps; whether the ranks stopped
    early on a signal; the epoch's totals including those of ``totals``).
    """
    model.train()
    totals = EpochTotals(**asdict(totals)) if totals is not None else EpochTotals()
    sampler = data.train_sampler
    sampler.set_epoch(epoch, start=totals.images, end=totals.end)
    totals.end = sampler.end
    world = dist.get_world_size() if dist.is_initialized() else 1
    if sampler.left_out:
        warn(left_out_description(sampler, epoch, args.norm))
    move_schedules(lr_scheduler, radius, max(0, (epoch + 1) * data.steps_per_epoch - sampler.steps))
    first_step = totals.images // sampler.step_size
    progress = Progress(
        f"epoch {epoch}/{args.epochs - 1}",
        first_step + sampler.steps,
        first_step,
        (args.epochs - 1 - epoch) * data.steps_per_epoch,
        args.print_freq,
        not dist.is_initialized() or dist.get_rank() == 0,
    )
    t0 = time.perf_counter()
    step, stopped = first_step, False
    for image, target in data.train_loader:
        image = image.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if args.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast(device, args.amp):
            loss = segmentation_loss(model(image), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        if radius is not None:
            radius.step()
        step += 1
        mean_loss, stopped = global_step_stats(loss, stop.requested)
        if not math.isfinite(mean_loss) and not scaler.is_enabled():
            raise FloatingPointError(
                f"non-finite training loss at epoch {epoch}, step {step}: lower --lr"
            )
        totals.add_step(mean_loss, image.shape[0] * world)
        progress.update(loss=mean_loss, lr=optimizer.param_groups[0]["lr"])
        if stopped:
            break
    progress.close()
    totals.train_time += time.perf_counter() - t0
    return step, stopped, totals


def left_out_description(sampler: ResumableSampler, epoch: int, norm: str) -> str:
    """Why the last images of a resumed epoch are not trained, in one line."""
    world, batch = sampler.world_size, sampler.batch_size
    leftover = (sampler.end - sampler.start) % sampler.step_size
    per_process = leftover // world
    if per_process == 0:
        why = f"fewer than one per process for a last, smaller step on {world} processes"
    elif sampler.last_batch == 0:
        why = (
            f"{per_process} per process for a last, smaller step, fewer than the "
            f"{sampler.min_batch} that --norm {norm} trains on"
        )
    else:
        why = (
            f"a last, smaller step takes {per_process} per process, and {leftover % world} "
            f"cannot be split evenly over {world} processes"
        )
    return (
        f"epoch {epoch} resumed with {world} x {batch} images per step: the last "
        f"{sampler.left_out} of its {sampler.end} images are left out of it ({leftover} left "
        f"after its whole steps: {why})"
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    args: argparse.Namespace,
) -> dict:
    """Scores of the whole validation set: each rank runs its shard, then one all-reduce of
    the confusion matrix. Runs the bare module (no DDP): evaluation never communicates."""
    model.eval()
    confusion = ConfusionMatrix(num_classes, device)
    for image, target in loader:
        image = image.to(device, non_blocking=True)
        if args.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast(device, args.amp):
            logits = model(image)
        confusion.update(logits.argmax(1), target.to(device, non_blocking=True))
    confusion.all_reduce()
    return confusion.compute()


def record_epoch(output_dir: str, row: dict, model: nn.Module, draw: bool) -> None:
    """Rank 0: appends the epoch's row to metrics.jsonl (rewritten whole, so that a crash
    never leaves half a line) and writes the curves and the switch weights."""
    metrics_path = os.path.join(output_dir, METRICS)
    rows = [*read_jsonl(metrics_path), row]
    write_jsonl(metrics_path, rows)
    if draw:
        plot_curves(rows, os.path.join(output_dir, "curves.png"))
    weights = syncsn.switch_weights(model)
    if weights:
        text = syncsn.format_switch_weights(weights) + "\n"
        write_text(os.path.join(output_dir, "switch_weights.txt"), text)
        if draw:
            plot_switch_weights(weights, os.path.join(output_dir, "switch_weights.png"))


def main(args: argparse.Namespace) -> int:
    info = init_distributed(backend=args.dist_backend, timeout=timedelta(seconds=args.dist_timeout))
    check_batch(args, info.world_size)
    lock = claim_output_dir(args.output_dir, info.device)
    try:
        return run(args, info)
    except OSError as e:
        message = output_error(e, args.output_dir)
        if message is None:
            raise
        raise SystemExit(message) from None
    finally:
        if lock is not None:
            lock.release()


def run(args: argparse.Namespace, info: syncsn.distributed.DistInfo) -> int:
    """The run itself, once this process's rank 0 holds the output directory."""
    t_start = time.perf_counter()
    device, rank, world = info.device, info.rank, info.world_size
    draw = check_dependencies(args)
    stop = StopRequest()

    ckpt_path = os.path.join(args.output_dir, CHECKPOINT)
    log(f"syncsn segmentation: {world} process(es), device {device}, args {vars(args)}")

    data = build_data(args, rank, world, device)
    steps_per_epoch = data.steps_per_epoch

    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP broadcasts anyway)
    model = build_model(args, data.num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(args.lr_warmup_epochs * steps_per_epoch))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, args.lr_warmup_decay)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    radius = syncsn.RadiusSchedule(model, total_steps) if args.norm in SPARSE_NORMS else None
    log(
        f"model: DeepLabV3-{args.backbone} (width {args.base_width}, output stride "
        f"{args.output_stride}), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters, norm {'BN->SyncSN' if args.convert else norm_description(args.norm)}, "
        f"{data.num_classes} classes; {len(data.train_set)} train / {len(data.val_set)} val "
        f"images, {steps_per_epoch} steps per epoch of {args.batch_size}x{world} images"
    )

    # ---- resume
    start_epoch, totals = 0, EpochTotals()
    path = resume_path(args)
    if args.test_only and path is None:
        raise SystemExit(
            f"--test-only needs a checkpoint: none at {ckpt_path}, or pass --resume PATH"
        )
    if path is not None:
        ckpt = load_resume_checkpoint(path, args)
        model.load_state_dict(ckpt["model"])
        if not args.test_only:
            optimizer.load_state_dict(ckpt["optimizer"])
            lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            if radius is not None and ckpt.get("radius_schedule") is not None:
                # Like the learning rate, the radius follows the current --epochs.
                radius.load_state_dict({**ckpt["radius_schedule"], "total_steps": total_steps})
        start_epoch = ckpt["epoch"] + 1
        if not args.test_only:
            check_epochs_left(path, start_epoch, args)
            totals = resumed_totals(ckpt, path, args, len(data.train_set))
        log(f"resumed from {path}: continuing at {resume_description(ckpt, totals, args, world)}")
    if info.is_main and not args.test_only:
        prepare_output_dir(args.output_dir, path, start_epoch)

    model_without_ddp = model
    if dist.is_initialized():
        model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # Sparse SN freezes layers whose switches became one-hot: their logits drop
            # out of the graph mid-training.
            find_unused_parameters=args.norm in SPARSE_NORMS,
        )

    if args.test_only:
        sync_buffers(model_without_ddp)
        result = evaluate(model_without_ddp, data.val_loader, data.num_classes, device, args)
        log(
            f"test: mIoU {result['miou']:.4f} pixel acc {result['pixel_acc']:.4f} "
            f"over {result['num_images']} images"
        )
        if info.is_main:
            write_eval(args.output_dir, result)
        return 0
    if start_epoch >= args.epochs:  # --resume auto in a finished run: nothing moved
        log(f"{path} {_covers(start_epoch, args)}")
        return 0

    # Different augmentation on each rank, reproducible per (seed, rank, epoch).
    torch.manual_seed(args.seed + 1000 * rank + start_epoch)
    training = dict(
        model=model_without_ddp,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        scaler=scaler,
        radius=radius,
        args=args,
    )
    train_images = len(data.train_set)
    for epoch in range(start_epoch, args.epochs):
        step, stopped, totals = train_one_epoch(
            model,
            optimizer,
            lr_scheduler,
            scaler,
            radius,
            data,
            device,
            epoch,
            args,
            stop,
            totals if epoch == start_epoch else None,
        )
        if stopped:
            save_checkpoint(
                ckpt_path,
                epoch=epoch - 1,
                step=step,
                totals=totals,
                train_images=train_images,
                **training,
            )
            if dist.is_initialized():
                dist.barrier()  # nobody exits before the checkpoint is on disk
            log(f"stopped at epoch {epoch}, step {step}: checkpoint written to {ckpt_path}")
            return 128 + (stop.signum or 15)

        sync_buffers(model_without_ddp)
        t_eval = time.perf_counter()
        result = evaluate(model_without_ddp, data.val_loader, data.num_classes, device, args)
        eval_time = time.perf_counter() - t_eval
        row = {
            "epoch": epoch,
            "train_loss": totals.mean_loss,
            "miou": result["miou"],
            "pixel_acc": result["pixel_acc"],
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_sec": totals.images / totals.train_time,
            "iou": result["iou"],
            "val_images": result["num_images"],
            "val_pixels": result["num_pixels"],
            "epoch_time": totals.train_time + eval_time,
        }
        if info.is_main:
            record_epoch(args.output_dir, row, model_without_ddp, draw)
        save_checkpoint(
            ckpt_path,
            epoch=epoch,
            step=0,
            totals=EpochTotals(),
            train_images=train_images,
            **training,
        )
        log(
            f"epoch {epoch}: train loss {row['train_loss']:.4f}  val mIoU {row['miou']:.4f}  "
            f"pixel acc {row['pixel_acc']:.4f}  lr {row['lr']:.2e}  "
            f"{row['images_per_sec']:.1f} img/s  ({row['epoch_time']:.0f} s)"
        )
        _, stopped = global_step_stats(torch.zeros((), device=device), stop.requested)
        if stopped:
            log(f"stopped after epoch {epoch}: checkpoint written to {ckpt_path}")
            return 128 + (stop.signum or 15)

    log(
        f"done: {args.epochs} epochs, final val mIoU {row['miou']:.4f}, pixel acc "
        f"{row['pixel_acc']:.4f}; wall time {time.perf_counter() - t_start:.0f} s; "
        f"outputs in {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    try:
        status = main(resolve_args(get_args_parser().parse_args()))
    except DatasetLayoutError as e:
        # A usage error, not a bug: the message (with the expected layout) is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        status = 2
    syncsn.distributed.cleanup()
    sys.exit(status)
