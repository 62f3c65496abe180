"""Forward+backward cost of the normalization layers against torch's BatchNorm2d.

For each configuration (world size, shape, dtype, memory layout) every rank runs each
layer in training mode on its own (N, C, H, W) input and reports, per layer:

- median forward, backward and forward+backward time after warm-up (the slowest rank of
  each step counts), and its ratio to the anchor measured in the same run: torch's
  BatchNorm2d (cuDNN's kernels on CUDA). The layers are interleaved in rounds
  (order rotated every round) so that noise from the machine hits all of them alike;
- bytes autograd saves for backward (each storage once), relative to the input's bytes;
- collectives per forward and per backward, from the profiler's ``gloo:``/``nccl:`` events,
  and the bytes of their result buffers on one rank;
- on CUDA, the achieved memory bandwidth as a fraction of a large device-to-device copy
  measured in the same run, taking a forward+backward to move 8 input-sized tensors
  (forward: read x for the statistics, read x and write y; backward: read x and dy for the
  reductions, read x and dy and write dx);
- on CUDA, the kernels one training call launches (forward / backward, the profiler's CUDA
  kernel events), and the forward+backward time of the call captured in a CUDA graph and
  replayed: the device's time without the host's launch overhead (``--no-graphs`` skips it).

The world is started once, with as many ranks as the largest world size; smaller world
sizes use the first ranks (one thread each). ``--profile`` prints torch.profiler op tables
instead of timing.

    python benchmarks/bench_layers.py                                  # everything (long)
    python benchmarks/bench_layers.py --world-sizes 2 --shapes 8,64,56,56 \\
        --dtypes float32 --layouts contiguous --markdown benchmarks/out.md
    python benchmarks/bench_layers.py --quick                          # seconds, smoke test
    python benchmarks/bench_layers.py --profile --world-sizes 1 --shapes 8,64,56,56 \\
        --layers bn sn sync_bn
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import (  # noqa: E402
    DTYPES,
    LAYOUTS,
    Rank,
    fmt_bytes,
    fmt_ms,
    markdown_table,
    max_over_group,
    median,
    profile_collectives,
    saved_bytes_counter,
    sync_group,
)

import syncsn  # noqa: E402
from syncsn import comm  # noqa: E402

DEFAULT_SHAPES = ["2,64,128,128", "8,64,56,56", "8,256,28,28", "8,1024,14,14"]
KEY_CONFIG = dict(world_size=2, shape=(8, 64, 56, 56), dtype="float32", layout="contiguous")
HAS_SPARSE = importlib.util.find_spec("syncsn.sparse_switchnorm") is not None


class NaiveSwitchNorm2d(nn.Module):
    """Switchable Normalization written the direct autograd way (the baseline to beat).

    Instance statistics from ``x.view(N, C, -1)``, LN and BN statistics derived from them,
    softmax mixing and ``(x - mean) / sqrt(var + eps) * weight + bias``, every step an autograd
    op that keeps its own full-size intermediates. Local only: it never synchronizes.
    (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
        self.register_buffer("running_var", torch.ones(1, num_features, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        flat = x.reshape(n, c, -1)
        mean_in = flat.mean(-1, keepdim=True)
        var_in = flat.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        second_moment = var_in + mean_in**2
        var_ln = second_moment.mean(1, keepdim=True) - mean_ln**2
        mean_bn = mean_in.mean(0, keepdim=True)
        var_bn = second_moment.mean(0, keepdim=True) - mean_bn**2
        if self.training:
            with torch.no_grad():
                self.running_mean.lerp_(mean_bn.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var_bn.to(self.running_var.dtype), self.momentum)
        mw = torch.softmax(self.mean_weight, 0)
        vw = torch.softmax(self.var_weight, 0)
        mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
        var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
        out = (flat - mean) / (var + self.eps).sqrt()
        return out.reshape(n, c, h, w) * self.weight + self.bias


class _CommOnlyFunction(torch.autograd.Function):
    """Identity that makes SyncSwitchNorm2d's two collectives with their buffer sizes."""

    @staticmethod
    def forward(ctx, x: Tensor, group, channels: int) -> Tensor:
        comm.all_gather_stacked(x.new_zeros(1 + 2 * channels, dtype=torch.float64), group)
        ctx.group, ctx.channels = group, channels
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy: Tensor):
        comm.all_reduce_sum_(dy.new_zeros(2 * ctx.channels, dtype=torch.float64), ctx.group)
        return dy, None, None


class CommOnly(nn.Module):
    """The synchronization floor: one all_gather of 1 + 2C and one all_reduce of 2C float64
    values (SyncSwitchNorm2d's collectives) and no math. Its time is what the collectives
    alone cost on this machine, in the same run as the layers."""

    def __init__(self, num_features: int, group) -> None:
        super().__init__()
        self.num_features, self.group = num_features, group

    def forward(self, x: Tensor) -> Tensor:
        return _CommOnlyFunction.apply(x, self.group, self.num_features)


@dataclass(frozen=True)
class Candidate:
    key: str
    label: str
    build: Callable  # (num_features, group) -> nn.Module
    synchronized: bool = False
    cuda_only: bool = False


def _sparse(num_features: int, group) -> nn.Module:
    from syncsn.sparse_switchnorm import SyncSparseSwitchNorm2d

    return SyncSparseSwitchNorm2d(num_features, process_group=group)


def _sparse_local(num_features: int, group) -> nn.Module:
    from syncsn.sparse_switchnorm import SparseSwitchNorm2d

    return SparseSwitchNorm2d(num_features)


def _torch_sync_bn(num_features: int, group) -> nn.Module:
    return nn.SyncBatchNorm(num_features, process_group=group)


CANDIDATES = [
    Candidate("bn", "BatchNorm2d (torch)", lambda c, g: nn.BatchNorm2d(c)),
    Candidate("torch_sync_bn", "SyncBatchNorm (torch)", _torch_sync_bn, True, cuda_only=True),
    Candidate("gn", "GroupNorm (torch)", lambda c, g: nn.GroupNorm(math.gcd(32, c), c)),
    Candidate("naive_sn", "SN, naive autograd", lambda c, g: NaiveSwitchNorm2d(c)),
    Candidate("sn", "SwitchNorm2d", lambda c, g: syncsn.SwitchNorm2d(c)),
    Candidate(
        "sync_sn",
        "SyncSwitchNorm2d",
        lambda c, g: syncsn.SyncSwitchNorm2d(c, process_group=g),
        True,
    ),
    Candidate(
        "sync_bn", "SyncBatchNorm", lambda c, g: syncsn.SyncBatchNorm(c, process_group=g), True
    ),
    Candidate("sync_ssn", "SyncSparseSwitchNorm2d", _sparse, True),
    Candidate("ssn", "SparseSwitchNorm2d", _sparse_local),
    Candidate("comm_only", "collectives only (no math)", CommOnly, True),
]
BY_KEY = {c.key: c for c in CANDIDATES}


def anchor_key(device: str) -> str:
    return "bn"


def candidates_for(keys: list[str], device: str, world_size: int) -> list[Candidate]:
    chosen = [
        BY_KEY[k]
        for k in keys
        if not (BY_KEY[k].cuda_only and device != "cuda")
        and not (k == "comm_only" and world_size == 1)  # nothing to measure alone
    ]
    anchor = anchor_key(device)
    if anchor not in [c.key for c in chosen]:
        chosen.insert(0, BY_KEY[anchor])  # ratios need the anchor in the same run
    return chosen


def skip_reason(cand: Candidate) -> str | None:
    if cand.key in ("sync_ssn", "ssn") and not HAS_SPARSE:
        return "not available: syncsn.sparse_switchnorm is not part of this installation"
    return None


# --------------------------------------------------------------------------------------
# One configuration, on every rank of its group
# --------------------------------------------------------------------------------------


def _inputs(ctx: Rank, shape, dtype: str, layout: str) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1234 + ctx.rank)  # each rank its own data
    fmt = LAYOUTS[layout]
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    dy = torch.randn(shape, generator=gen)
    x = x.to(ctx.device, DTYPES[dtype]).contiguous(memory_format=fmt).requires_grad_()
    dy = dy.to(ctx.device, DTYPES[dtype]).contiguous(memory_format=fmt)
    return x, dy


def _build(cand: Candidate, channels: int, group, ctx: Rank, dtype: str) -> nn.Module:
    module = cand.build(channels, group).to(ctx.device).train()
    half = DTYPES[dtype] in (torch.float16, torch.bfloat16)
    if cand.key == "naive_sn" or (cand.key == "gn" and half and ctx.device.type == "cuda"):
        # The direct transcription has no mixed-precision handling, and GroupNorm's CUDA
        # kernel wants parameters of the input's dtype: run them in the input's dtype, as
        # `model.to(dtype)` would. The other layers keep float32 parameters (autocast).
        module = module.to(DTYPES[dtype])
    return module


_COPY_BANDWIDTH: dict[str, float] = {}


def _device_copy_bandwidth(device: torch.device, repeat: int) -> float:
    """Bytes per second of a 512 MiB device-to-device copy (read + write), once per run:
    the memory bandwidth the device reaches in practice."""
    key = str(device)
    if key not in _COPY_BANDWIDTH:
        src = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
        _COPY_BANDWIDTH[key] = _copy_bandwidth(src, max(repeat, 5))
        del src
    return _COPY_BANDWIDTH[key]


def _cuda_kernels_per_call(module: nn.Module, x: Tensor, dy: Tensor) -> tuple[int, int]:
    """Kernels one training forward and one backward launch (memcpy and memset excluded)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def count(fn) -> int:
        with common.quiet_profiler():
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
        return sum(
            1
            for e in prof.events()
            if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
        )

    x.grad = None
    module.zero_grad(set_to_none=True)
    holder = {}
    fwd = count(lambda: holder.update(y=module(x)))
    bwd = count(lambda: holder["y"].backward(dy))
    return fwd, bwd


def _graphed_seconds(module: nn.Module, x: Tensor, dy: Tensor, repeat: int) -> float:
    """Median time of one forward+backward captured in a CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).backward(dy)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    module.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        module(x).backward(dy)
    graph.replay()
    times = []
    for _ in range(repeat):
        clock = common.PhaseClock(x.device)
        clock.mark()
        graph.replay()
        clock.mark()
        times.append(clock.durations()[0])
    del graph
    x.grad = None
    module.zero_grad(set_to_none=True)
    return median(times)


def _copy_bandwidth(x: Tensor, repeat: int) -> float:
    """Bytes per second of a device-to-device copy of ``x`` (read + write)."""
    out = torch.empty_like(x)
    times = []
    for _ in range(repeat + 3):
        clock = common.PhaseClock(x.device)
        clock.mark()
        out.copy_(x.detach())
        clock.mark()
        times.append(clock.durations()[0])
    return 2 * x.numel() * x.element_size() / median(times[3:])


def bench_config(ctx: Rank, ws: int, shape, dtype: str, layout: str, opts) -> list[dict]:
    """Time and account every layer on one (N, C, H, W) configuration; run by ranks < ws.

    Each rank feeds its own input of ``shape`` (the global batch is ws * N). Returns one
    record per layer (the same on every rank after the max-reduction of the timings).
    """
    group = ctx.group(ws)
    x, dy = _inputs(ctx, shape, dtype, layout)
    cands = candidates_for(opts.layers, opts.device, ws)
    runnable = [c for c in cands if skip_reason(c) is None]
    modules = {c.key: _build(c, shape[1], group, ctx, dtype) for c in runnable}

    def step(key: str) -> list[float]:
        module = modules[key]
        x.grad = None
        module.zero_grad(set_to_none=True)
        clock = common.PhaseClock(ctx.device)
        clock.mark()
        y = module(x)
        clock.mark()
        y.backward(dy)
        clock.mark()
        fwd, bwd = clock.durations()
        return [fwd, bwd, fwd + bwd]

    need_barrier = ws > 1 or ctx.device.type == "cuda"
    before = (lambda: sync_group(group, ctx.device)) if need_barrier else (lambda: None)
    keys = [c.key for c in runnable]
    timings = common.interleaved_rounds(keys, opts.warmup, opts.repeat, step, before)
    # (layers, repeat, 3): the slowest rank decides each step's time.
    table = torch.tensor([timings[k] for k in keys], dtype=torch.float64, device=ctx.device)
    table = max_over_group(table, group).cpu()

    on_cuda = ctx.device.type == "cuda"
    copy_bw = _device_copy_bandwidth(ctx.device, opts.repeat) if on_cuda else None
    anchor = anchor_key(opts.device)
    anchor_total = table[keys.index(anchor), :, 2]
    input_bytes = x.untyped_storage().nbytes()
    records = []
    for cand in cands:
        rec = {
            "world_size": ws,
            "shape": list(shape),
            "dtype": dtype,
            "layout": layout,
            "device": opts.device,
            "layer": cand.key,
            "label": cand.label,
            "synchronized": cand.synchronized,
            "input_bytes": input_bytes,
            "anchor": anchor,
        }
        reason = skip_reason(cand)
        if reason is not None:
            rec["skipped"] = reason
            records.append(rec)
            continue
        t = table[keys.index(cand.key)]
        module = modules[cand.key]
        x.grad = None
        with saved_bytes_counter() as saved:
            y, fwd_comm = profile_collectives(lambda m=module: m(x), ws)
        _, bwd_comm = profile_collectives(lambda y=y: y.backward(dy), ws)
        total = median(t[:, 2].tolist())
        rec.update(
            fwd_s=median(t[:, 0].tolist()),
            bwd_s=median(t[:, 1].tolist()),
            total_s=total,
            ratio=total / median(anchor_total.tolist()),
            # Median of the per-round ratios: pairs each step with the anchor's step of the
            # same round, which cancels slow drifts of the machine's load.
            ratio_paired=median((t[:, 2] / anchor_total).tolist()),
            saved_bytes=saved["bytes"],
            saved_ratio=saved["bytes"] / input_bytes,
            collectives_fwd=fwd_comm.count,
            collectives_bwd=bwd_comm.count,
            comm_bytes_fwd=fwd_comm.bytes,
            comm_bytes_bwd=bwd_comm.bytes,
            collective_names=fwd_comm.names + bwd_comm.names,
        )
        if copy_bw is not None:
            rec["copy_bandwidth"] = copy_bw
            rec["bandwidth_fraction"] = 8 * input_bytes / total / copy_bw
        if on_cuda:
            rec["kernels_fwd"], rec["kernels_bwd"] = _cuda_kernels_per_call(module, x, dy)
            if opts.graphs:
                try:
                    rec["graph_s"] = _graphed_seconds(module, x, dy, opts.repeat)
                    rec["graph_bandwidth_fraction"] = 8 * input_bytes / rec["graph_s"] / copy_bw
                except Exception as error:  # noqa: BLE001 - reported in the table
                    rec["graph_error"] = f"{type(error).__name__}: {error}"[:200]
        records.append(rec)
    if on_cuda and opts.graphs:
        anchor_rec = next((r for r in records if r["layer"] == anchor and "graph_s" in r), None)
        for rec in records:
            if anchor_rec is not None and "graph_s" in rec:
                rec["graph_ratio"] = rec["graph_s"] / anchor_rec["graph_s"]
    return records


def profile_config(ctx: Rank, ws: int, shape, dtype: str, layout: str, opts) -> str:
    """Op tables (self time per call, by torch.profiler) of each layer's forward and backward.

    Each call is profiled on its own, forward and backward in separate profiler blocks, and
    the blocks are summed: one graph is alive at a time, as in training, so the tables do
    not mix the two passes and fresh allocations cost what they cost in a training loop.
    """
    from torch.profiler import ProfilerActivity, profile

    group = ctx.group(ws)
    x, dy = _inputs(ctx, shape, dtype, layout)
    activities = [ProfilerActivity.CPU]
    if ctx.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    out = []
    for cand in candidates_for(opts.layers, opts.device, ws):
        if skip_reason(cand) is not None:
            continue
        module = _build(cand, shape[1], group, ctx, dtype)
        for _ in range(opts.warmup):
            x.grad = None
            module(x).backward(dy)
        totals: dict[str, dict[str, list[float]]] = {"forward": {}, "backward": {}}
        for _ in range(opts.repeat):
            x.grad = None
            module.zero_grad(set_to_none=True)
            sync_group(group, ctx.device)
            with common.quiet_profiler():
                with profile(activities=activities) as fwd:
                    y = module(x)
                with profile(activities=activities) as bwd:
                    y.backward(dy)
            del y
            for phase, prof in (("forward", fwd), ("backward", bwd)):
                for e in prof.key_averages():
                    self_time = _self_time_us(e, ctx.device.type)
                    row = totals[phase].setdefault(e.key, [0.0, 0.0])
                    row[0] += self_time
                    row[1] += e.count
        for phase, ops in totals.items():
            total = sum(t for t, _ in ops.values())
            ranked = sorted(ops.items(), key=lambda kv: -kv[1][0])[: opts.profile_rows]
            rows = [
                [
                    name[:60],
                    f"{t / opts.repeat / 1e3:.3f}",
                    f"{100 * t / total:.1f}",
                    f"{n / opts.repeat:g}",
                ]
                for name, (t, n) in ranked
            ]
            title = f"{cand.label} {phase}, world {ws}, {_shape_str(shape)} {dtype} {layout}"
            unit = "GPU" if ctx.device.type == "cuda" else "CPU"
            out.append(
                f"#### {title}: {total / opts.repeat / 1e3:.3f} ms self {unit} time per call\n\n"
                + markdown_table(["op", "self ms / call", "%", "calls / call"], rows)
                + "\n"
            )
    return "\n".join(out)


def _self_time_us(event, device_type: str) -> float:
    if device_type == "cuda":
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, name):
                return getattr(event, name)
    return event.self_cpu_time_total


# --------------------------------------------------------------------------------------
# The world: every configuration in one start
# --------------------------------------------------------------------------------------


def _configs(opts) -> list[tuple]:
    return list(itertools.product(opts.shapes, opts.dtypes, opts.layouts))


def _world_body(ctx: Rank, opts, result_path: str) -> None:
    t0 = time.perf_counter()
    records: list[dict] = []
    profiles: list[str] = []
    configs = _configs(opts)
    total = len(configs) * len(opts.world_sizes)
    done = 0
    for ws in opts.world_sizes:
        if ctx.rank < ws:
            for shape, dtype, layout in configs:
                if opts.profile:
                    text = profile_config(ctx, ws, shape, dtype, layout, opts)
                    if ctx.rank == 0:
                        profiles.append(text)
                else:
                    recs = bench_config(ctx, ws, shape, dtype, layout, opts)
                    if ctx.rank == 0:
                        records.extend(recs)
                        summary = ", ".join(
                            f"{r['layer']} {fmt_ms(r['total_s'])}"
                            + ("" if r["layer"] == r["anchor"] else f" ({r['ratio']:.2f}x)")
                            for r in recs
                            if "skipped" not in r
                        )
                        done += 1
                        common.progress(
                            f"{done}/{total} world {ws} {tuple(shape)} {dtype} {layout}: "
                            f"{summary} (ms)",
                            t0,
                        )
        else:
            done += len(configs)
        ctx.barrier()  # ranks outside the subgroup wait here
    if ctx.rank == 0:
        with open(result_path, "w") as f:
            json.dump({"records": records, "profiles": profiles}, f)


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def _group_key(r: dict) -> tuple:
    return (r["world_size"], r["dtype"], r["layout"])


def _shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def markdown_report(records: list[dict], meta: dict) -> str:
    device = meta["device"]
    anchor_label = BY_KEY[anchor_key(device)].label
    lines = [
        f"Date {meta['date']}; machine: {meta['machine']}; torch {meta['torch']}; "
        f"{meta['threads_per_rank']} thread per rank; device {device}; "
        f"{meta['warmup']} warm-up + {meta['repeat']} timed rounds.",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    lines += _targets_section(records, device)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(_group_key(r), []).append(r)

    lines += [
        f"### Forward+backward time relative to {anchor_label}",
        "",
        "Median over rounds of each layer's step time divided by the anchor's median, both "
        "from the same run (the slowest rank decides each step).",
        "",
    ]
    for (ws, dtype, layout), recs in groups.items():
        shapes = list(dict.fromkeys(_shape_str(r["shape"]) for r in recs))
        layers = list(dict.fromkeys(r["layer"] for r in recs))
        rows = []
        for layer in layers:
            row = [next(r["label"] for r in recs if r["layer"] == layer)]
            for s in shapes:
                match = [r for r in recs if r["layer"] == layer and _shape_str(r["shape"]) == s]
                row.append(_ratio_cell(match[0]) if match else "-")
            rows.append(row)
        lines += [f"World size {ws}, {dtype}, {layout}:", ""]
        lines += [markdown_table(["layer"] + shapes, rows), ""]

    lines += ["### Details", ""]
    skipped: dict[str, str] = {}
    for (ws, dtype, layout), recs in groups.items():
        headers = [
            "shape",
            "layer",
            "fwd ms",
            "bwd ms",
            "fwd+bwd ms",
            f"x {BY_KEY[anchor_key(device)].key}",
            "saved / input",
            "collectives fwd / bwd",
            "comm bytes fwd / bwd",
        ]
        if device == "cuda":
            headers += [
                "of copy bandwidth",
                "kernels fwd / bwd",
                "graphed fwd+bwd ms",
                f"graphed x {BY_KEY[anchor_key(device)].key}",
                "graphed of copy bandwidth",
            ]
        rows = []
        for r in recs:
            row = [_shape_str(r["shape"]), r["label"]]
            if "skipped" in r:
                row += ["skipped (see below)"] + ["-"] * (len(headers) - 3)
                skipped[r["label"]] = r["skipped"]
            else:
                row += [
                    fmt_ms(r["fwd_s"]),
                    fmt_ms(r["bwd_s"]),
                    fmt_ms(r["total_s"]),
                    f"{r['ratio']:.2f}",
                    f"{r['saved_ratio']:.2f}",
                    f"{r['collectives_fwd']} / {r['collectives_bwd']}",
                    f"{fmt_bytes(r['comm_bytes_fwd'])} / {fmt_bytes(r['comm_bytes_bwd'])}",
                ]
                if device == "cuda":
                    row += [
                        f"{r['bandwidth_fraction']:.2f}",
                        f"{r.get('kernels_fwd', '-')} / {r.get('kernels_bwd', '-')}",
                        _graph_cell(r),
                        f"{r['graph_ratio']:.2f}" if "graph_ratio" in r else "-",
                        f"{r['graph_bandwidth_fraction']:.2f}" if "graph_s" in r else "-",
                    ]
                    if "graph_error" in r:
                        skipped[f"{r['label']} (CUDA graph)"] = r["graph_error"]
            rows.append(row)
        lines += [f"World size {ws}, {dtype}, {layout}:", ""]
        lines += [markdown_table(headers, rows), ""]
    for label, reason in skipped.items():
        lines += [f"{label} was skipped: {reason}.", ""]
    if any(r["layer"] == "naive_sn" for r in records):
        lines += [
            "The naive SN baseline is local on every world size (it never synchronizes).",
            "",
        ]
    return "\n".join(lines)


def _graph_cell(r: dict) -> str:
    if "graph_s" in r:
        return fmt_ms(r["graph_s"])
    return "failed" if "graph_error" in r else "-"


def _ratio_cell(r: dict) -> str:
    return "skipped" if "skipped" in r else f"{r['ratio']:.2f}x"


def _find(records, layer, world_size, shape, dtype, layout) -> dict | None:
    for r in records:
        if (
            r["layer"] == layer
            and r["world_size"] == world_size
            and tuple(r["shape"]) == tuple(shape)
            and r["dtype"] == dtype
            and r["layout"] == layout
            and "skipped" not in r
        ):
            return r
    return None


def _targets_section(records: list[dict], device: str) -> list[str]:
    """The performance targets, checked on the configurations they are defined for."""
    rows = []
    if device == "cpu":
        k = KEY_CONFIG
        where = (k["world_size"], k["shape"], k["dtype"], k["layout"])
        for layer, goal, hard in (("sync_sn", 1.0, 1.5), ("sn", 0.9, 1.2), ("sync_bn", 0.9, 1.2)):
            r = _find(records, layer, *where)
            if r is not None:
                rows.append(_target_row(f"{r['label']} fwd+bwd / BN2d", r["ratio"], goal, hard))
        for layer in ("sync_sn", "sn", "sync_bn"):
            r = _find(records, layer, *where)
            if r is not None:
                rows.append(_target_row(f"{r['label']} saved / input", r["saved_ratio"], 1.1))
        for layer in ("sync_sn", "sync_bn"):
            r = _find(records, layer, *where)
            if r is not None:
                ok = r["collectives_fwd"] == 1 and r["collectives_bwd"] == 1
                rows.append(
                    [
                        f"{r['label']} collectives fwd / bwd",
                        f"{r['collectives_fwd']} / {r['collectives_bwd']}",
                        "1 / 1",
                        "met" if ok else "MISSED",
                    ]
                )
        scope = (
            f"world size {k['world_size']}, {_shape_str(k['shape'])}, {k['dtype']}, {k['layout']}"
        )
    else:
        scope = "fwd+bwd / torch BatchNorm2d (eager; graphed in brackets), world 1"
        goals = {"sn": 1.2, "sync_sn": 1.2, "sync_bn": 1.1, "ssn": 1.3, "sync_ssn": 1.3}
        for r in records:
            if r["layer"] not in goals or "skipped" in r or r["world_size"] != 1:
                continue
            name = f"{r['label']} {_shape_str(r['shape'])} {r['dtype']} {r['layout']}"
            row = _target_row(name, r["ratio"], goals[r["layer"]])
            if "graph_ratio" in r:
                row[1] += f" ({r['graph_ratio']:.2f})"
            rows.append(row)
        for r in records:
            large = math.prod(r["shape"]) >= 10_000_000
            if r["layer"] in goals and "skipped" not in r and large and r["world_size"] == 1:
                name = f"{r['label']} {_shape_str(r['shape'])} {r['dtype']} {r['layout']} bandwidth"
                best = max(r["bandwidth_fraction"], r.get("graph_bandwidth_fraction", 0.0))
                rows.append([name, f"{best:.2f}", ">= 0.6", "met" if best >= 0.6 else "MISSED"])
    if not rows:
        return []
    return [
        f"### Targets ({scope})",
        "",
        markdown_table(["target", "measured", "goal (hard limit)", "verdict"], rows),
        "",
    ]


def _target_row(name: str, value: float, goal: float, hard: float | None = None) -> list[str]:
    if value <= goal:
        verdict = "met"
    elif hard is not None and value <= hard:
        verdict = "within hard limit only"
    else:
        verdict = "MISSED"
    limit = f"<= {goal:g}" + (f" ({hard:g})" if hard is not None else "")
    return [name, f"{value:.2f}", limit, verdict]


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="N,C,H,W each")
    p.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=tuple(DTYPES),
        default=None,
        help="default: float32 bfloat16 (float16 also on cuda)",
    )
    p.add_argument("--layouts", nargs="+", choices=tuple(LAYOUTS), default=list(LAYOUTS))
    p.add_argument(
        "--layers", nargs="+", choices=tuple(BY_KEY), default=[c.key for c in CANDIDATES]
    )
    p.add_argument("--repeat", type=int, default=30, help="timed rounds")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shape, world sizes 1 and 2, float32, 2 rounds: checks it runs",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler op tables per layer instead of timing",
    )
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument(
        "--no-graphs",
        dest="graphs",
        action="store_false",
        help="on CUDA, skip the CUDA-graph timing of each layer",
    )
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--markdown", default=None, help="write RESULTS.md-ready tables here")
    opts = p.parse_args(argv)
    if opts.quick:  # shrinks whatever was left at its default
        if opts.shapes == DEFAULT_SHAPES:
            opts.shapes = ["2,8,6,6"]
        if opts.world_sizes == [1, 2, 4]:
            opts.world_sizes = [1, 2]
        opts.dtypes = opts.dtypes or ["float32"]
        opts.repeat, opts.warmup = min(opts.repeat, 2), min(opts.warmup, 1)
    if opts.device == "cuda" and opts.world_sizes == [1, 2, 4]:
        # One rank per GPU: by default, the world sizes this machine can run.
        gpus = max(1, torch.cuda.device_count())
        opts.world_sizes = [w for w in opts.world_sizes if w <= gpus]
    if opts.dtypes is None:
        opts.dtypes = ["float32", "bfloat16"] + (["float16"] if opts.device == "cuda" else [])
    opts.shapes = [common.parse_shape(s) for s in opts.shapes]
    if min(opts.world_sizes) < 1:
        p.error(f"--world-sizes must be positive, got {opts.world_sizes}")
    if opts.repeat < 1 or opts.warmup < 0:
        p.error(f"--repeat must be >= 1 and --warmup >= 0, got {opts.repeat}, {opts.warmup}")
    for shape in opts.shapes:
        if shape[2] * shape[3] < 2:
            p.error(f"--shapes: SN needs at least 2 pixels per channel, got {shape}")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    world = max(opts.world_sizes)
    n_configs = len(_configs(opts)) * len(opts.world_sizes)
    layers = candidates_for(opts.layers, opts.device, world)
    print(
        f"bench_layers: {n_configs} configurations x {len(layers)} layers, "
        f"{opts.warmup}+{opts.repeat} rounds each, one world of {world} rank(s) on "
        f"{opts.device}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "records.json")
        common.run_world(world, opts.device, _world_body, opts, result_path)
        with open(result_path) as f:
            result = json.load(f)
    meta = common.run_metadata(opts.device)
    meta.update(device=opts.device, warmup=opts.warmup, repeat=opts.repeat)
    if opts.profile:
        text = "\n".join(result["profiles"])
        print(text)
        if opts.markdown:
            common.write_text(opts.markdown, text)
        return 0
    report = markdown_report(result["records"], meta)
    print()
    print(report)
    if opts.json:
        common.write_json(opts.json, {"meta": meta, "records": result["records"]})
    if opts.markdown:
        common.write_text(opts.markdown, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
