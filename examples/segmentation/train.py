"""Distributed semantic segmentation training: DeepLabV3 on a dilated ResNet with
synchronized Switchable Normalization (or any other norm of the syncsn registry).

    torchrun --nproc_per_node=2 examples/segmentation/train.py           # CPU, ~3 minutes
    torchrun --nproc_per_node=8 examples/segmentation/train.py \\
        --dataset voc --data-path /data --norm syncsn                     # 8 GPUs, 2 img each

Defaults that depend on the dataset (image size, backbone, epochs, ...) come from PRESETS;
any flag given on the command line wins. Outputs go to --output-dir: checkpoint.pth,
metrics.jsonl, curves.png and, for the Switchable Normalization family,
switch_weights.txt / switch_weights.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from data import DATASETS, IGNORE_INDEX, DatasetLayoutError, build_dataset
from metrics import ConfusionMatrix, ShardSampler
from model import BACKBONES, DeepLabV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from utils import (
    Progress,
    ResumableSampler,
    StopRequest,
    atomic_save,
    ignore_stop_signals,
    lr_factor,
    plot_curves,
    plot_switch_weights,
    read_jsonl,
    write_jsonl,
)

import syncsn
from syncsn.distributed import init_distributed

# --norm choices -> names in syncsn's registry.
NORMS = {
    "syncsn": "SyncSN",
    "sn": "SN",
    "syncbn": "SyncBN",
    "bn": "BN",
    "gn": "GN",
    "syncssn": "SyncSSN",
    "ssn": "SSN",
}
SPARSE_NORMS = ("syncssn", "ssn")

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
    p.add_argument("--norm", default="syncsn", choices=tuple(NORMS))
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
    p.add_argument("--output-dir", default="runs/segmentation")
    p.add_argument(
        "--resume",
        default="auto",
        help="auto: continue from <output-dir>/checkpoint.pth if it exists; none; or a path",
    )
    p.add_argument("--test-only", action="store_true", help="only evaluate the checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dist-backend", default=None, help="nccl on CUDA, gloo otherwise")
    p.add_argument("--dist-timeout", type=int, default=1800, help="seconds")
    p.add_argument("--print-freq", type=int, default=20, help="steps between log lines")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fills flags left at None from the dataset's preset and checks combinations."""
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
    if args.convert and args.norm != "syncsn":
        raise SystemExit(
            f"--convert builds a SyncSN network; it needs --norm syncsn, got {args.norm}"
        )
    if args.resume not in ("auto", "none") and not os.path.isfile(args.resume):
        raise SystemExit(f"--resume {args.resume!r}: no such checkpoint file")
    return args


# --------------------------------------------------------------------------------------
# Model, optimizer
# --------------------------------------------------------------------------------------


def norm_factory(norm: str) -> Callable[[int], nn.Module]:
    """``--norm`` -> ``f(num_channels) -> nn.Module`` built by syncsn's registry."""
    name = NORMS[norm]
    if name == "GN":
        # 32 groups as in the GroupNorm paper, fewer where the channels do not divide.
        return lambda c: syncsn.build_norm_layer(name, c, num_groups=math.gcd(32, c))
    return lambda c: syncsn.build_norm_layer(name, c)


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
# Checkpoints
# --------------------------------------------------------------------------------------


def resume_path(args: argparse.Namespace) -> str | None:
    if args.resume == "none":
        return None
    if args.resume == "auto":
        path = os.path.join(args.output_dir, "checkpoint.pth")
        return path if os.path.isfile(path) else None
    return args.resume


def check_compatible(saved: dict, args: argparse.Namespace, path: str) -> None:
    diff = [
        f"--{k.replace('_', '-')} {saved.get(k)!r} (now {getattr(args, k)!r})"
        for k in _MODEL_ARGS
        if saved.get(k) != getattr(args, k)
    ]
    if diff:
        raise SystemExit(
            f"checkpoint {path} was written with {', '.join(diff)}; pass the same flags, "
            "another --output-dir, or --resume none"
        )


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


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """fp16 on CUDA (with GradScaler), bfloat16 on CPU (no scaler needed)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def main(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    info = init_distributed(backend=args.dist_backend, timeout=timedelta(seconds=args.dist_timeout))
    device, rank, world = info.device, info.rank, info.world_size
    stop = StopRequest()

    def log(*msg: object) -> None:
        if info.is_main:
            print(*msg, flush=True)

    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    log(f"syncsn segmentation: {world} process(es), device {device}, args {vars(args)}")

    # ---- data
    train_set, num_classes = build_dataset(
        args.dataset,
        "train",
        data_path=args.data_path,
        image_size=args.image_size,
        num_samples=args.num_train,
        seed=args.seed,
    )
    val_set, _ = build_dataset(
        args.dataset,
        "val",
        data_path=args.data_path,
        image_size=args.image_size,
        num_samples=args.num_val,
        seed=args.seed,
    )
    train_sampler = ResumableSampler(
        DistributedSampler(
            train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True
        ),
        args.batch_size,
    )
    loader_kw = dict(
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_stop_signals,
    )
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, sampler=train_sampler, drop_last=True, **loader_kw
    )
    # Full-size images of the datasets on disk differ in size: evaluate them one at a time.
    val_batch = args.batch_size if args.dataset == "synthetic" else 1
    val_loader = DataLoader(
        val_set, batch_size=val_batch, sampler=ShardSampler(len(val_set), rank, world), **loader_kw
    )
    steps_per_epoch = len(train_set) // world // args.batch_size
    if steps_per_epoch == 0 and not args.test_only:
        raise SystemExit(
            f"{len(train_set)} training images cannot fill one step of {args.batch_size} "
            f"images on each of {world} processes: raise --num-train or lower --batch-size"
        )

    # ---- model, optimization
    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP broadcasts anyway)
    model = build_model(args, num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(args.lr_warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, args.lr_warmup_decay)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    radius = syncsn.RadiusSchedule(model, total_steps) if args.norm in SPARSE_NORMS else None
    log(
        f"model: DeepLabV3-{args.backbone} (width {args.base_width}, output stride "
        f"{args.output_stride}), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters, norm {'BN->SyncSN' if args.convert else NORMS[args.norm]}, "
        f"{num_classes} classes; {len(train_set)} train / {len(val_set)} val images, "
        f"{steps_per_epoch} steps per epoch of {args.batch_size}x{world} images"
    )

    # ---- resume
    start_epoch, start_step = 0, 0
    partial = {"loss_sum": 0.0, "train_time": 0.0}
    path = resume_path(args)
    if args.test_only and path is None:
        raise SystemExit(
            f"--test-only needs a checkpoint: none at {ckpt_path}, or pass --resume PATH"
        )
    if path is not None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        check_compatible(ckpt["args"], args, path)
        model.load_state_dict(ckpt["model"])
        if not args.test_only:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["lr_scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            if radius is not None and ckpt.get("radius_schedule") is not None:
                # Like the learning rate, the radius follows the current --epochs.
                radius.load_state_dict({**ckpt["radius_schedule"], "total_steps": total_steps})
        start_epoch, start_step = ckpt["epoch"] + 1, ckpt["step"]
        partial = ckpt.get("partial", partial)
        where = f"epoch {start_epoch}" + (f", step {start_step}" if start_step else "")
        log(f"resumed from {path}: continuing at {where}")
    if info.is_main and not args.test_only:
        # Keep the history up to the checkpoint, drop epochs that were lost with a crash.
        history = [r for r in read_jsonl(metrics_path) if r["epoch"] < start_epoch]
        write_jsonl(metrics_path, history if path is not None else [])

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
        result = evaluate(model_without_ddp, val_loader, num_classes, device, args)
        log(
            f"test: mIoU {result['miou']:.4f} pixel acc {result['pixel_acc']:.4f} "
            f"over {result['num_images']} images"
        )
        if info.is_main:
            with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
                json.dump(result, f)
        return 0
    if start_epoch >= args.epochs:
        log(
            f"{path} already covers {start_epoch} epoch(s) of --epochs {args.epochs}: nothing to "
            "train (raise --epochs, or use --resume none / another --output-dir to start over)"
        )
        return 0

    # Different augmentation on each rank, reproducible per (seed, rank, epoch).
    torch.manual_seed(args.seed + 1000 * rank + start_epoch)

    def save_checkpoint(epoch_done: int, step: int, partial: dict) -> None:
        if info.is_main:
            atomic_save(
                {
                    "model": model_without_ddp.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "radius_schedule": radius.state_dict() if radius is not None else None,
                    "epoch": epoch_done,  # last completed epoch, -1 for none
                    "step": step,  # steps already done in epoch_done + 1
                    "partial": partial,
                    "args": vars(args),
                },
                ckpt_path,
            )

    for epoch in range(start_epoch, args.epochs):
        # ---- train one epoch
        model.train()
        skip = start_step if epoch == start_epoch else 0
        train_sampler.set_epoch(epoch, skip_batches=skip)
        if skip == 0:
            partial = {"loss_sum": 0.0, "train_time": 0.0}
        progress = Progress(
            f"epoch {epoch}/{args.epochs - 1}",
            steps_per_epoch,
            skip,
            (args.epochs - 1 - epoch) * steps_per_epoch,
            args.print_freq,
            info.is_main,
        )
        t0 = time.perf_counter()
        step = skip
        stopped = False
        for image, target in train_loader:
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
            scheduler.step()
            if radius is not None:
                radius.step()
            step += 1
            mean_loss, stopped = global_step_stats(loss, stop.requested)
            if not math.isfinite(mean_loss) and not scaler.is_enabled():
                raise FloatingPointError(
                    f"non-finite training loss at epoch {epoch}, step {step}: lower --lr"
                )
            partial["loss_sum"] += mean_loss
            progress.update(loss=mean_loss, lr=optimizer.param_groups[0]["lr"])
            if stopped:
                break
        progress.close()
        partial["train_time"] += time.perf_counter() - t0

        if stopped:
            save_checkpoint(epoch - 1, step, partial)
            if dist.is_initialized():
                dist.barrier()  # nobody exits before the checkpoint is on disk
            log(f"stopped at epoch {epoch}, step {step}: checkpoint written to {ckpt_path}")
            return 128 + (stop.signum or 15)

        # ---- evaluate, record, checkpoint
        sync_buffers(model_without_ddp)
        t_eval = time.perf_counter()
        result = evaluate(model_without_ddp, val_loader, num_classes, device, args)
        eval_time = time.perf_counter() - t_eval
        row = {
            "epoch": epoch,
            "train_loss": partial["loss_sum"] / steps_per_epoch,
            "miou": result["miou"],
            "pixel_acc": result["pixel_acc"],
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_sec": steps_per_epoch * args.batch_size * world / partial["train_time"],
            "iou": result["iou"],
            "val_images": result["num_images"],
            "val_pixels": result["num_pixels"],
            "epoch_time": partial["train_time"] + eval_time,
        }
        if info.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            plot_curves(read_jsonl(metrics_path), os.path.join(args.output_dir, "curves.png"))
            weights = syncsn.switch_weights(model_without_ddp)
            if weights:
                with open(os.path.join(args.output_dir, "switch_weights.txt"), "w") as f:
                    f.write(syncsn.format_switch_weights(weights) + "\n")
                plot_switch_weights(weights, os.path.join(args.output_dir, "switch_weights.png"))
        save_checkpoint(epoch, 0, {"loss_sum": 0.0, "train_time": 0.0})
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
