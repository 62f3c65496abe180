"""Training throughput of the segmentation example's DeepLabV3 with each normalization layer.

Every norm gets its own copy of the model (examples/segmentation/model.py, a small config by
default) and SGD; at world size > 1 the model is wrapped in DistributedDataParallel and the
Sync layers synchronize over the same ranks. One timed step is forward, loss, backward
and optimizer step on a fixed random batch of ``--batch-size`` images per rank; the
slowest rank decides each step's time. The norms are interleaved in rounds (order rotated
every round) so that noise from the machine hits all of them alike.

Reports, per norm and world size: median step time, images per second (all ranks), the
step time relative to BatchNorm2d at the same world size, and the weak-scaling factor
(step time at this world size / at world size 1, per-rank batch fixed).

    python benchmarks/bench_train.py                              # world sizes 1 and 2, CPU
    python benchmarks/bench_train.py --world-sizes 1 2 4 --markdown benchmarks/train.md
    python benchmarks/bench_train.py --quick                      # seconds, smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import REPO, Rank, fmt_ms, markdown_table, max_over_group, median, sync_group  # noqa: E402

import syncsn  # noqa: E402

EXAMPLE = REPO / "examples" / "segmentation"
HAS_SPARSE = importlib.util.find_spec("syncsn.sparse_switchnorm") is not None
NUM_CLASSES = 21
ALL_NORMS = ("bn", "syncbn", "sn", "syncsn", "gn", "ssn", "syncssn")
LABELS = {
    "bn": "BatchNorm2d (torch)",
    "syncbn": "SyncBatchNorm",
    "sn": "SwitchNorm2d",
    "syncsn": "SyncSwitchNorm2d",
    "gn": "GroupNorm (torch)",
    "ssn": "SparseSwitchNorm2d",
    "syncssn": "SyncSparseSwitchNorm2d",
}


def norm_factory(norm: str, group):
    """``norm`` -> ``f(num_channels) -> nn.Module``; Sync layers synchronize over ``group``."""
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    if norm == "syncbn":
        return lambda c: syncsn.SyncBatchNorm(c, process_group=group)
    if norm == "sn":
        return syncsn.SwitchNorm2d
    if norm == "syncsn":
        return lambda c: syncsn.SyncSwitchNorm2d(c, process_group=group)
    from syncsn import sparse_switchnorm as ssn

    if norm == "ssn":
        return ssn.SparseSwitchNorm2d
    return lambda c: ssn.SyncSparseSwitchNorm2d(c, process_group=group)


def skip_reason(norm: str) -> str | None:
    if norm in ("ssn", "syncssn") and not HAS_SPARSE:
        return "not available: syncsn.sparse_switchnorm is not part of this installation"
    return None


def _model_class():
    if not (EXAMPLE / "model.py").is_file():
        raise SystemExit(f"bench_train needs the segmentation example's model: {EXAMPLE}/model.py")
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    from model import DeepLabV3

    return DeepLabV3


def bench_world_size(ctx: Rank, ws: int, norms: list[str], opts) -> list[dict]:
    """Step times of every norm's model at world size ``ws`` (run by ranks 0..ws-1)."""
    DeepLabV3 = _model_class()
    group = ctx.group(ws)
    gen = torch.Generator().manual_seed(100 + ctx.rank)  # each rank its own batch
    shape = (opts.batch_size, 3, opts.image_size, opts.image_size)
    images = torch.randn(shape, generator=gen).to(ctx.device)
    target = torch.randint(0, NUM_CLASSES, (shape[0],) + shape[2:], generator=gen)
    target = target.to(ctx.device)
    if opts.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    models, optims = {}, {}
    for norm in norms:
        torch.manual_seed(0)  # same initial weights on every rank
        model = DeepLabV3(
            NUM_CLASSES,
            norm_factory(norm, group),
            opts.backbone,
            opts.output_stride,
            opts.base_width,
        ).to(ctx.device)
        if opts.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if ws > 1:
            model = DistributedDataParallel(
                model,
                device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                process_group=group,
                # No sparse layer freezes here: the sparsestmax radius stays at 0.
                find_unused_parameters=False,
            )
        models[norm] = model.train()
        optims[norm] = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(norm: str) -> list[float]:
        model, optim = models[norm], optims[norm]
        clock = common.PhaseClock(ctx.device)
        clock.mark()
        optim.zero_grad(set_to_none=True)
        with torch.autocast(ctx.device.type, torch.bfloat16, enabled=opts.amp):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), target)
        loss.backward()
        optim.step()
        clock.mark()
        return clock.durations()

    need_barrier = ws > 1 or ctx.device.type == "cuda"
    before = (lambda: sync_group(group, ctx.device)) if need_barrier else (lambda: None)
    timings = common.interleaved_rounds(norms, opts.warmup, opts.steps, step, before)
    # (norms, steps, 1): the slowest rank decides each step's time.
    table = torch.tensor([timings[n] for n in norms], dtype=torch.float64)
    table = max_over_group(table.to(ctx.device), group).cpu()
    records = []
    for i, norm in enumerate(norms):
        step_s = median(table[i, :, 0].tolist())
        records.append(
            {
                "world_size": ws,
                "norm": norm,
                "label": LABELS[norm],
                "step_s": step_s,
                "images_per_s": ws * opts.batch_size / step_s,
            }
        )
    return records


def _world_body(ctx: Rank, opts, result_path: str) -> None:
    t0 = time.perf_counter()
    records: list[dict] = []
    norms = [n for n in opts.norms if skip_reason(n) is None]
    for ws in opts.world_sizes:
        if ctx.rank < ws:
            recs = bench_world_size(ctx, ws, norms, opts)
            records.extend(recs)
            if ctx.rank == 0:
                times = ", ".join(f"{r['norm']} {fmt_ms(r['step_s'])}" for r in recs)
                common.progress(f"world {ws}: {times} (ms per step)", t0)
        ctx.barrier()  # ranks outside the subgroup wait here
    if ctx.rank == 0:
        with open(result_path, "w") as f:
            json.dump(records, f)


def _add_ratios(records: list[dict], norms: list[str]) -> None:
    for r in records:
        same_ws = {x["norm"]: x for x in records if x["world_size"] == r["world_size"]}
        single = [x for x in records if x["norm"] == r["norm"] and x["world_size"] == 1]
        r["vs_bn"] = r["step_s"] / same_ws["bn"]["step_s"] if "bn" in same_ws else None
        r["weak_scaling"] = r["step_s"] / single[0]["step_s"] if single else None


def markdown_report(records: list[dict], meta: dict, opts) -> str:
    lines = [
        f"Date {meta['date']}; machine: {meta['machine']}; torch {meta['torch']}; "
        f"1 thread per rank; device {opts.device}; {opts.warmup} warm-up + {opts.steps} timed "
        "rounds.",
        "",
        f"Model: DeepLabV3-{opts.backbone}, base width {opts.base_width}, output stride "
        f"{opts.output_stride}, {NUM_CLASSES} classes; {opts.batch_size} images of "
        f"{opts.image_size}x{opts.image_size} per rank"
        + (", channels_last" if opts.channels_last else "")
        + (", bfloat16 autocast" if opts.amp else "")
        + "; SGD with momentum; DistributedDataParallel at world size > 1.",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    headers = ["norm", "world size", "step ms", "images/s", "step / BN step", "weak scaling"]
    rows = []
    for r in records:
        rows.append(
            [
                r["label"],
                r["world_size"],
                fmt_ms(r["step_s"]),
                f"{r['images_per_s']:.1f}",
                "-" if r["vs_bn"] is None else f"{r['vs_bn']:.2f}",
                "-" if r["weak_scaling"] is None else f"{r['weak_scaling']:.2f}",
            ]
        )
    for norm in opts.norms:
        reason = skip_reason(norm)
        if reason is not None:
            rows.append([LABELS[norm], "-", "skipped (see below)", "-", "-", "-"])
    lines += [markdown_table(headers, rows), ""]
    lines += [
        "Weak scaling: step time at this world size divided by the same norm's step time at "
        "world size 1 (per-rank batch fixed; 1.00 is perfect).",
        "",
    ]
    for norm in opts.norms:
        reason = skip_reason(norm)
        if reason is not None:
            lines += [f"{LABELS[norm]} was skipped: {reason}.", ""]
    target = [r for r in records if r["norm"] == "syncsn" and r["world_size"] > 1]
    if target and target[0]["vs_bn"] is not None:
        r = target[0]
        verdict = "met" if r["vs_bn"] <= 1.15 else "MISSED"
        lines += [
            f"Target: a SyncSN training step at most 1.15x the BN step (world size "
            f"{r['world_size']}): measured {r['vs_bn']:.2f}x, {verdict}.",
            "",
        ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--norms", nargs="+", choices=ALL_NORMS, default=list(ALL_NORMS))
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--base-width", type=int, default=16, help="first-stage channels")
    p.add_argument("--output-stride", type=int, default=8, choices=(8, 16))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2, help="images per rank")
    p.add_argument("--steps", type=int, default=10, help="timed rounds (one step per norm)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument(
        "--quick", action="store_true", help="tiny model and images, 1 timed step: checks it runs"
    )
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--markdown", default=None, help="write RESULTS.md-ready tables here")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.base_width, opts.image_size, opts.steps, opts.warmup = 8, 32, 1, 1
    if min(opts.world_sizes) < 1:
        p.error(f"--world-sizes must be positive, got {opts.world_sizes}")
    if opts.steps < 1 or opts.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {opts.steps}, {opts.warmup}")
    if opts.batch_size < 1:
        p.error(f"--batch-size must be positive, got {opts.batch_size}")
    if opts.world_sizes.count(1) == 0 and opts.batch_size * min(opts.world_sizes) < 2:
        p.error("BatchNorm needs at least 2 images per step over all ranks")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if "bn" not in opts.norms:
        opts.norms.insert(0, "bn")  # the ratios need BN in the same run
    _model_class()  # fail early, before starting the world
    world = max(opts.world_sizes)
    print(
        f"bench_train: {len(opts.norms)} norms x world sizes {opts.world_sizes}, "
        f"{opts.warmup}+{opts.steps} rounds, one world of {world} rank(s) on {opts.device}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "records.json")
        common.run_world(world, opts.device, _world_body, opts, result_path)
        with open(result_path) as f:
            records = json.load(f)
    _add_ratios(records, opts.norms)
    meta = common.run_metadata(opts.device)
    meta.update(device=opts.device, warmup=opts.warmup, steps=opts.steps)
    report = markdown_report(records, meta, opts)
    print()
    print(report)
    if opts.json:
        common.write_json(opts.json, {"meta": meta, "options": vars(opts), "records": records})
    if opts.markdown:
        common.write_text(opts.markdown, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
