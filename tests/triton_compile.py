"""Compile the Triton backend's kernels for a GPU without one: the check CI can make that
the kernels pass Triton's compiler (type rules, control flow) and ptxas, which the
interpreter does not enforce.

Run in a process where ``TRITON_INTERPRET`` is not set (``triton.jit`` then makes real JIT
functions). Each backend step is called on small CPU tensors with the kernels replaced by
recorders; every recorded launch is compiled with ``triton.compile`` for the target (the
signature built from the arguments as the launcher would, a 1 turning into a constant where
Triton specialises it).

    python tests/triton_compile.py            # sm_90 (H100/H200)
    python tests/triton_compile.py --arch 80  # A100
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
    raise SystemExit("triton_compile.py: unset TRITON_INTERPRET (it compiles real kernels)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from syncsn.kernels import triton as backend_module  # noqa: E402
from syncsn.kernels import triton_kernels as K  # noqa: E402
from syncsn.kernels.interface import BNSaved, SNGrads, SNMixed, SNStats, SparseSwitch  # noqa: E402

_TYPES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}
KERNELS = [
    "stats_kernel",
    "merge_kernel",
    "sn_output_kernel",
    "sn_reduce_kernel",
    "sn_input_kernel",
    "bn_output_kernel",
    "bn_reduce_kernel",
    "bn_input_kernel",
]


class Recorder:
    """Stands in for a JIT function: records each launch's arguments."""

    def __init__(self, name: str, fn, launches: list) -> None:
        self.name, self.fn, self.launches = name, fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, self.fn, args, kwargs))

        return launch


def _signature(fn, args, kwargs):
    names = fn.arg_names
    params = {p.name: p for p in fn.params}
    values = dict(zip(names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k in params})
    unspecialised = {names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    signature, constants = {}, {}
    for name in names:
        value = values[name]
        if params[name].is_constexpr:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and name not in unspecialised:
                signature[name], constants[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: unexpected argument {value!r}")
    return signature, constants


def record_launches(cases) -> list:
    """Every step of the backend on ``cases`` (shape, dtype, memory format), on meta tensors
    (shapes only, nothing computed), with the kernels recorded."""
    launches: list = []
    originals = {name: getattr(K, name) for name in KERNELS}
    for name, fn in originals.items():
        setattr(K, name, Recorder(name, fn, launches))
    try:
        tb = backend_module.TritonBackend()
        for case in cases:
            _exercise(tb, *case)
    finally:
        for name, fn in originals.items():
            setattr(K, name, fn)
    return launches


def _exercise(tb, shape, dtype, fmt) -> None:
    meta = {"device": "meta"}
    f32, f64 = {"dtype": torch.float32, **meta}, {"dtype": torch.float64, **meta}
    x = torch.empty(shape, dtype=dtype, **meta).contiguous(memory_format=fmt)
    dy = torch.empty_like(x)
    n, c = shape[:2]
    ddof = 1 if len(shape) == 2 else 0
    nc = [torch.empty(n, c, **f64) for _ in range(8)]
    stats = SNStats(
        torch.empty(n, c, **f32), nc[0], nc[1], torch.empty(n, **f64), torch.empty(n, **f64)
    )
    mixed = SNMixed(nc[2], nc[3], nc[4])
    grads = SNGrads(torch.empty(2 * c, **f64), nc[5], nc[6], *(torch.empty(0, **meta),) * 4)
    partials = torch.empty(1, 1 + 2 * c, **f64)
    count, totals = torch.empty((), **f64), torch.empty(2 * c, **f64)
    mean_c, var_c = torch.empty(c, **f64), torch.empty(c, **f64)
    w = torch.empty(3, **f32)
    weight, bias = torch.empty(c, **f32), torch.empty(c, **f32)
    tb.sn_stats(x, ddof)
    tb.bn_stats(x)
    merges = [(False, 0.1, torch.float32), (True, 0.1, torch.float32), (True, None, torch.float32)]
    merges += [(True, 0.1, torch.bfloat16), (True, 0.1, torch.float16)]  # half buffers
    for tracked, momentum, buffers in merges:
        rm, rv = torch.empty(c, dtype=buffers, **meta), torch.empty(c, dtype=buffers, **meta)
        nbt = torch.empty((), dtype=torch.int64, **meta)
        tb.merge(
            partials, ddof, rm if tracked else None, rv if tracked else None,
            nbt if tracked else None, momentum, ddof,
        )  # fmt: skip
    for bn, gamma in ((True, weight), (False, None)):
        bn_mean, bn_var = (mean_c, var_c) if bn else (None, None)
        b = bias if gamma is not None else None
        # Two scopes first (the variant "quick" compiles): LN and BN (SwitchNorm1d), IN and
        # LN (no BN scope).
        scopes = 6 if bn else 3
        tb.sn_output(x, stats, bn_mean, bn_var, w[:2], w[:2], gamma, b, 1e-5, True, scopes)
        tb.sn_backward_reduce(
            x, dy, stats, mixed, bn_mean, bn_var, w[:2], w[:2], gamma, ddof, True, scopes
        )
        # A settled SSN layer: both vectors frozen.
        tb.sn_output(x, stats, bn_mean, bn_var, w, w, gamma, b, 1e-5, False, 7, (2, 0))
        tb.sn_backward_reduce(
            x, dy, stats, mixed, bn_mean, bn_var, w, w, gamma, ddof, False, 7, (2, 0)
        )
        # An SSN layer before it settles: sparsestmax and the freezing in the kernels.
        radius = torch.empty((), **f32)
        frozen = torch.empty((), dtype=torch.int64, **meta)
        sparse = SparseSwitch(radius, frozen, frozen, freeze=True)
        _, swept = tb.sn_output(
            x, stats, bn_mean, bn_var, w, w, gamma, b, 1e-5, False, 7, (-1, -1), sparse
        )
        tb.sn_backward_reduce(
            x, dy, stats, mixed._replace(selection=swept.selection), bn_mean, bn_var, w, w,
            gamma, ddof, False, 7, (-1, -1), radius,
        )  # fmt: skip
        for logits in (False, True):
            tb.sn_output(x, stats, bn_mean, bn_var, w, w, gamma, b, 1e-5, logits)
            tb.sn_backward_reduce(x, dy, stats, mixed, bn_mean, bn_var, w, w, gamma, ddof, logits)
        t, k = (totals, count) if bn else (None, None)
        tb.sn_backward_input(x, dy, stats, mixed, grads, bn_mean, t, k, gamma, ddof)
        saved = BNSaved(torch.empty(c, **f32), mean_c, var_c)
        tb.bn_output(x, stats.centre, mean_c, var_c, gamma, b, 1e-5)
        tb.bn_backward_reduce(x, dy, saved, gamma)
        tb.bn_backward_input(x, dy, saved, gamma, totals, count)


CL, CL3, CONTIG = torch.channels_last, torch.channels_last_3d, torch.contiguous_format
SMALL = [
    ((2, 5, 6, 7), torch.float32, CONTIG),
    ((2, 5, 6, 7), torch.bfloat16, CL),
    ((3, 4, 2, 3, 2), torch.float16, CL3),
    ((4, 6), torch.float32, CONTIG),
    ((1, 1, 9), torch.float32, CONTIG),
]
GPU_SHAPES = [
    (shape, dtype, fmt)
    for shape in ((8, 64, 56, 56), (2, 256, 200, 304), (2, 1024, 50, 76))
    for dtype in (torch.float32, torch.bfloat16)
    for fmt in (CONTIG, CL)
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    p.add_argument(
        "--cases",
        choices=("quick", "small", "gpu"),
        default="small",
        help="quick: one variant of each kernel (two of SN's); small: test shapes; gpu: "
        "benchmark shapes cut for a 132-multiprocessor device",
    )
    opts = p.parse_args(argv)
    if opts.cases == "gpu":
        backend_module.TUNING.programs = 4 * 132
    launches = record_launches(GPU_SHAPES if opts.cases == "gpu" else SMALL)
    variants = {}
    for name, fn, args, kwargs in launches:
        signature, constants = _signature(fn, args, kwargs)
        key = (name, tuple(sorted(signature.items())), tuple(sorted(map(str, constants.items()))))
        if opts.cases == "quick":
            # One variant of each kernel, and SN's with frozen (one-hot) switch vectors and
            # with SSN's sparsestmax.
            key = (name, constants.get("SELECT_W", -1) >= 0, bool(constants.get("SPARSE")))
        variants.setdefault(key, (name, fn, signature, constants, kwargs.get("num_warps", 4)))
    target = GPUTarget("cuda", opts.arch, 32)
    t0 = time.perf_counter()
    failures = 0
    for i, (name, fn, signature, constants, warps) in enumerate(variants.values(), 1):
        try:
            src = ASTSource(fn=fn, signature=signature, constexprs=constants)
            options = {"num_warps": warps, "enable_fp_fusion": True}
            triton.compile(src, target=target, options=options)
            status = "ok"
        except Exception as error:  # noqa: BLE001 - report every failing variant
            failures += 1
            status = f"FAILED: {type(error).__name__}: {error}"
        print(f"[{i}/{len(variants)} {time.perf_counter() - t0:.0f}s] {name}: {status}", flush=True)
    print(f"{len(variants) - failures}/{len(variants)} kernel variants compiled for sm_{opts.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
