"""The Triton backend (``syncsn.kernels.triton``) against the reference backend.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports Triton (run this file alone the same way, or
set the variable yourself). On a machine with CUDA the same cases run on the GPU.

Every step gets the same inputs on both backends (the reference's results of the steps
before it), so a mismatch points at one kernel. Shapes are small and odd, because the
interpreter is slow; one test cuts small inputs into many programs so that the chunked,
multi-group and multi-sample paths of the kernels run too.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sync import (
    TOL,
    rel_err,
)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import syncsn
from syncsn import kernels
from syncsn.kernels import ops as ops_module
from syncsn.kernels import triton as triton_backend
from syncsn.kernels import triton_kernels as K
from syncsn.kernels.interface import Flags
from syncsn.kernels.reference import ReferenceBackend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T = triton_backend.TritonBackend()
R = ReferenceBackend()
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CONTIG, CL, CL3 = torch.contiguous_format, torch.channels_last, torch.channels_last_3d
STAT_TOL = 1e-5  # float32 sums of well-conditioned data, combined in float64

pytestmark = pytest.mark.skipif(
    not T.available(), reason=f"the Triton backend cannot run here: {T.unavailable_reason()}"
)


def out_tol(dtype: torch.dtype) -> float:
    """Outputs in x's dtype: float32 within the float32 tolerance; float16 / bfloat16
    within one rounding (the kernels and the reference may round a tie differently)."""
    return TOL[F32] if dtype == F32 else torch.finfo(dtype).eps


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    got, want = got.cpu(), want.cpu()
    if want.is_floating_point():
        assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN where the reference has none"
        got, want = got.nan_to_num(0.0), want.nan_to_num(0.0)
    if want.numel():
        err = rel_err(got, want)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def check_all(prefix: str, got, want, tol: float) -> None:
    for field, a, b in zip(want._fields, got, want, strict=True):
        if a is None or b is None:  # an absent optional result (mixed.selection)
            assert a is None and b is None, f"{prefix}.{field}"
            continue
        check(f"{prefix}.{field}", a, b, tol)


def make_x(shape, dtype, fmt, seed=0, mean=0.0, spread=2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Per-(n, c) offsets make the IN, LN and BN scopes differ.
    offsets = torch.randn(*shape[:2], *([1] * (len(shape) - 2)), generator=g)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * spread + offsets + mean
    return x.to(device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)


def layout_of(t: torch.Tensor) -> str:
    if t.dim() == 4 and t.is_contiguous(memory_format=CL) and not t.is_contiguous():
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=CL3) and not t.is_contiguous():
        return "channels_last_3d"
    return "contiguous" if t.is_contiguous() else "strided"


# --- each step against the reference ---------------------------------------------------------


def sn_steps(
    x: torch.Tensor,
    ddof: int,
    affine: bool,
    has_bn: bool,
    seed: int = 1,
    logits_given: bool = True,
) -> None:
    """All SN steps of a training call, each compared with the reference's: with the
    layer's logits (SN) or with weights on the simplex (SSN)."""
    g = torch.Generator().manual_seed(seed)
    c = x.shape[1]
    dy = (
        torch.randn(x.shape, generator=g)
        .to(DEVICE, x.dtype)
        .contiguous(memory_format=CL if layout_of(x) == "channels_last" else CONTIG)
    )
    if x.dim() == 5 and layout_of(x) == "channels_last_3d":
        dy = dy.contiguous(memory_format=CL3)
    weight = (torch.rand(c, generator=g) + 0.5).to(DEVICE) if affine else None
    bias = torch.randn(c, generator=g).to(DEVICE) if affine else None
    logits = torch.randn(3, generator=g).to(DEVICE)
    if not has_bn:
        logits[2] = -float("inf")
    w, v = logits, logits.flip(0).roll(1)
    if not logits_given:
        w, v = torch.softmax(w, 0), torch.softmax(v, 0)

    stats, partials = R.sn_stats(x, ddof)
    got_stats, got_partials = T.sn_stats(x, ddof)
    check_all("sn_stats", got_stats, stats, STAT_TOL)
    check("partials", got_partials, partials, STAT_TOL)

    batch = R.merge(partials[None], ddof, None, None, None, 0.1, ddof)
    bn_mean, bn_var = (batch.mean, batch.var) if has_bn else (None, None)
    args = (x, stats, bn_mean, bn_var, w, v, weight, bias, 1e-5, logits_given)
    y, mixed = R.sn_output(*args)
    got_y, got_mixed = T.sn_output(*args)
    check("y", got_y, y, out_tol(x.dtype))
    assert layout_of(got_y) == layout_of(x)
    check_all("mixed", got_mixed, mixed, STAT_TOL)

    args = (x, dy, stats, mixed, bn_mean, bn_var, w, v, weight, ddof, logits_given)
    grads = R.sn_backward_reduce(*args)
    got = T.sn_backward_reduce(*args)
    check_all("sn_backward_reduce", got, grads, STAT_TOL)

    totals, count = (grads.totals, batch.count) if has_bn else (None, None)
    args = (x, dy, stats, mixed, grads, bn_mean, totals, count, weight, ddof)
    dx = R.sn_backward_input(*args)
    got_dx = T.sn_backward_input(*args)
    check("dx", got_dx, dx, out_tol(x.dtype))
    assert layout_of(got_dx) == layout_of(x)


def bn_steps(x: torch.Tensor, affine: bool, seed: int = 1) -> None:
    """All BN steps of a training call, each compared with the reference's."""
    g = torch.Generator().manual_seed(seed)
    c = x.shape[1]
    dy = torch.randn(x.shape, generator=g).to(DEVICE, x.dtype)
    weight = (torch.rand(c, generator=g) + 0.5).to(DEVICE) if affine else None
    bias = torch.randn(c, generator=g).to(DEVICE) if affine else None

    centre, partials = R.bn_stats(x)
    got_centre, got_partials = T.bn_stats(x)
    check("bn centre", got_centre, centre, STAT_TOL)
    check("bn partials", got_partials, partials, STAT_TOL)

    batch = R.merge(partials[None], 0, None, None, None, 0.1, 1)
    y, saved = R.bn_output(x, centre, batch.mean, batch.var, weight, bias, 1e-5)
    got_y, got_saved = T.bn_output(x, centre, batch.mean, batch.var, weight, bias, 1e-5)
    check("bn y", got_y, y, out_tol(x.dtype))
    assert layout_of(got_y) == layout_of(x)
    check_all("bn saved", got_saved, saved, STAT_TOL)

    reduced = R.bn_backward_reduce(x, dy, saved, weight)
    got_reduced = T.bn_backward_reduce(x, dy, saved, weight)
    for name, a, b in zip(("totals", "dweight", "dbias"), got_reduced, reduced, strict=True):
        check(f"bn {name}", a, b, STAT_TOL)

    dx = R.bn_backward_input(x, dy, saved, weight, reduced[0], batch.count)
    got_dx = T.bn_backward_input(x, dy, saved, weight, reduced[0], batch.count)
    check("bn dx", got_dx, dx, out_tol(x.dtype))


# The conformance suite (tests/test_conformance.py) runs every step on small 4-D cases of
# every dtype and layout, on CPU tensors; these are the shapes it leaves to this file. On a
# GPU (where the suite cannot reach this backend) a grid of dtypes and layouts is added.
SN_CASES = {
    "2d-f16-cl-two-channel-blocks": ((2, 40, 3, 5), F16, CL, 0),
    "3d-f16-cl": ((2, 3, 3, 4, 5), F16, CL3, 0),
    "3d-bf16": ((2, 3, 2, 3, 4), BF16, CONTIG, 0),
    "one-sample": ((1, 3, 4, 4), F32, CONTIG, 0),
}
GPU_GRID = {
    f"grid-{str(dtype)[6:]}-{name}": ((3, 5, 4, 6), dtype, fmt, 0)
    for dtype in (F32, F16, BF16)
    for name, fmt in (("contiguous", CONTIG), ("cl", CL))
} | {"grid-1d": ((5, 7), F32, CONTIG, 1), "grid-3d-input": ((4, 6, 7), BF16, CONTIG, 0)}
if DEVICE.type == "cuda":
    SN_CASES.update(GPU_GRID)


@pytest.mark.parametrize("case", SN_CASES)
def test_sn_steps_match_reference(case):
    shape, dtype, fmt, ddof = SN_CASES[case]
    x = make_x(shape, dtype, fmt, seed=len(case))
    # SN passes logits, SSN weights on the simplex: both are the kernels' inputs.
    sn_steps(x, ddof, affine=True, has_bn=True, logits_given=len(case) % 2 == 0)


BN_CASES = {
    "5d-f32-cl": ((2, 3, 2, 3, 4), F32, CL3),
    "4d-bf16-cl-two-channel-blocks": ((2, 37, 2, 3), BF16, CL),
    "one-sample": ((1, 2, 3, 3), F32, CONTIG),
}


@pytest.mark.parametrize("case", BN_CASES)
def test_bn_steps_match_reference(case):
    shape, dtype, fmt = BN_CASES[case]
    bn_steps(make_x(shape, dtype, fmt, seed=len(case)), affine=case != "one-sample")


LAYERS = {
    "SwitchNorm2d-bf16-cl": (lambda: syncsn.SwitchNorm2d(4), (3, 4, 5, 6), BF16, CL),
    "SyncBatchNorm-5d-cl": (lambda: syncsn.SyncBatchNorm(3), (2, 3, 2, 3, 4), F32, CL3),
}


def _layer_run(make, shape, dtype, fmt, backend, monkeypatch):
    monkeypatch.setenv("SYNCSN_BACKEND", backend)
    layer = make().to(DEVICE)
    with torch.no_grad():
        for i, p in enumerate(layer.parameters()):
            p.copy_(torch.linspace(0.5, 1.5, p.numel()).roll(i).view_as(p))
    out = {}
    for step in range(2):
        x = make_x(shape, dtype, fmt, seed=step).requires_grad_()
        y = layer(x)
        (y.float() * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
        out[f"y{step}"], out[f"dx{step}"] = y.detach(), x.grad
    out.update({f"d{k}": p.grad.clone() for k, p in layer.named_parameters()})
    out.update({k: b.clone() for k, b in layer.named_buffers()})
    layer.eval()
    with torch.no_grad():
        out["eval"] = layer(make_x(shape, dtype, fmt, seed=9))
    return out


@pytest.mark.parametrize("name", LAYERS)
def test_layer_on_triton_equals_layer_on_reference(name, monkeypatch):
    """Whole layers in a dtype and layout the conformance suite runs only at step level."""
    make, shape, dtype, fmt = LAYERS[name]
    got = _layer_run(make, shape, dtype, fmt, "triton", monkeypatch)
    want = _layer_run(make, shape, dtype, fmt, "torch", monkeypatch)
    for key in want:
        if not want[key].is_floating_point():
            assert torch.equal(got[key], want[key]), key
        else:
            # Outputs in x's dtype may differ by a rounding, and so may what follows from them.
            tol = out_tol(dtype) if want[key].dtype == dtype else STAT_TOL
            check(key, got[key], want[key], 4 * tol if dtype != F32 else tol)


MANY_PROGRAMS = {
    # (shape, layout, program target): chunks of the spatial axis and several groups ...
    "chunks-groups": ((2, 6, 8, 9), CONTIG, 16),  # chunks end in a partial tile
    "chunks-cl": ((2, 9, 4, 8), CL, 8),
    # ... and several samples per program, the last run of samples shorter.
    "rows": ((5, 3, 2, 2), CONTIG, 1),
    "rows-NC": ((9, 13), CONTIG, 1),
}


@pytest.mark.parametrize("case", MANY_PROGRAMS)
def test_many_programs_per_sample_and_channel_group(case, monkeypatch):
    """Tiny tiles cut small inputs the way large ones are cut: the finalize paths."""
    shape, fmt, target = MANY_PROGRAMS[case]
    tuning = triton_backend.Tuning(tile=16, programs=target, group=4)
    monkeypatch.setattr(triton_backend, "TUNING", tuning)
    x = make_x(shape, F32, fmt, seed=3)
    plan = T._plan(x)[0]
    if case.startswith("chunks"):
        assert plan.chunks > 1 and (plan.num_groups > 1 or fmt == CL), plan
    else:
        assert plan.rows > 1 and plan.num_rb > 1 and shape[0] % plan.rows, plan
    sn_steps(x, 1 if x.dim() == 2 else 0, affine=True, has_bn=True)
    bn_steps(x, affine=True)


# --- the merge ----------------------------------------------------------------------------------


def _partials(counts, c, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in counts:
        mean = torch.randn(c, generator=g, dtype=torch.float64) * scale
        m2 = torch.rand(c, generator=g, dtype=torch.float64) * n * scale**2
        row = torch.cat([torch.tensor([float(n)], dtype=torch.float64), mean, m2])
        rows.append(row if n else torch.zeros_like(row))
    return torch.stack(rows).to(DEVICE)


MERGES = {
    "uneven-with-empty-rank": dict(counts=[3, 0, 5], tracked=True, momentum=0.1),
    "untracked": dict(counts=[2, 7], tracked=False, momentum=0.1),
    "cumulative-average": dict(counts=[4, 1, 2], tracked=True, momentum=None, nbt=3),
    "too-few": dict(counts=[1, 0], tracked=True, momentum=0.1),
    "empty-global-batch": dict(counts=[0, 0, 0], tracked=True, momentum=0.1),
    "non-finite": dict(counts=[2, 3], tracked=True, momentum=0.1, poison=True),
    "float16-overflow": dict(counts=[2, 3], tracked=True, momentum=0.5, scale=1e3, half=True),
    "many-channels-and-ranks": dict(counts=list(range(20)), tracked=True, momentum=0.1, c=300),
}


# The interpreter's float16 cast of an overflowing value warns where the GPU just rounds.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("case", MERGES)
@pytest.mark.parametrize("ddof", [0, 1])
def test_merge_matches_reference(case, ddof):
    spec = MERGES[case]
    c = spec.get("c", 5)
    gathered = _partials(spec["counts"], c, seed=len(case), scale=spec.get("scale", 1.0))
    if spec.get("poison"):
        gathered[1, 2] = float("nan")
    dtype = F16 if spec.get("half") else F32
    results, buffers = [], []
    for backend in (T, R):
        rm = torch.linspace(-1, 1, c, device=DEVICE).to(dtype) if spec["tracked"] else None
        rv = torch.linspace(1, 2, c, device=DEVICE).to(dtype) if spec["tracked"] else None
        nbt = torch.tensor(spec.get("nbt", 0), device=DEVICE) if spec["tracked"] else None
        results.append(backend.merge(gathered, ddof, rm, rv, nbt, spec["momentum"], 1 - ddof))
        buffers.append((rm, rv, nbt))
    got, want = results
    assert got.flags.dtype == torch.int32 and got.flags.item() == want.flags.item()
    assert got.count.item() == want.count.item()
    # The merge is float64 throughout; only the summation order differs.
    check("mean", got.mean, want.mean, 1e-12)
    check("var", got.var, want.var, 1e-12)
    if spec["tracked"]:
        for name, a, b in zip(("running_mean", "running_var", "nbt"), *buffers, strict=True):
            check(name, a, b, 1e-6 if dtype == F32 else 1e-3)
    expected_flag = {
        "too-few": Flags.TOO_FEW,
        "non-finite": Flags.NONFINITE,
        "float16-overflow": Flags.OVERFLOW,
    }.get(case, 0)
    assert want.flags.item() == expected_flag, "the case does not test what it says"


# --- accuracy criteria --------------------------------------------------------------------------


def test_float16_with_more_than_65504_elements_per_channel():
    x = make_x((1, 2, 260, 260), F16, CONTIG, seed=2, mean=3.0, spread=30.0)
    stats, partials = T.sn_stats(x, 0)
    ref_stats, ref_partials = R.sn_stats(x, 0)
    assert all(torch.isfinite(t).all() for t in (*stats, partials))
    check_all("sn_stats", stats, ref_stats, STAT_TOL)
    check("partials", partials, ref_partials, STAT_TOL)


def test_selection(monkeypatch):
    x = torch.randn(2, 3, 4, device=DEVICE)
    assert T.covers(x) and T.covers(x, torch.ones(3, device=DEVICE))
    assert not T.covers(x.double())
    assert not T.covers(x, torch.ones(3, dtype=torch.int64, device=DEVICE))
    rows_skipped = torch.randn(2, 3, 4, 6, device=DEVICE)[:, :, ::2]  # H and W: no one stride
    assert not T.covers(rows_skipped)
    assert T.covers(torch.randn(2, 3, 4, 6, device=DEVICE)[:, :, :, ::2])
    monkeypatch.setenv("SYNCSN_BACKEND", "triton")
    assert kernels.passes_backend(x).name == "triton"
    assert kernels.passes_backend(x.double()) is kernels.REFERENCE
    if DEVICE.type == "cpu":
        monkeypatch.setenv("SYNCSN_BACKEND", "auto")
        assert kernels.passes_backend(x).name != "triton"  # auto: never on CPU tensors
    else:
        monkeypatch.setenv("SYNCSN_BACKEND", "auto")
        assert kernels.passes_backend(x).name == "triton"
        assert kernels.shared_backend("cuda").name == "triton"


# --- launches: 3 kernels forward, 2 backward, nothing but allocations around them ----------


_ALLOCATIONS = {
    "aten::empty.memory_format",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
}


class OpLog(TorchDispatchMode):
    """Records the aten ops dispatched while it is active."""

    def __init__(self, into: list[str]) -> None:
        super().__init__()
        self.into = into

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.into.append(func.name())
        return func(*args, **(kwargs or {}))


STEPS = (
    "merge", "sn_stats", "sn_output", "sn_backward_reduce", "sn_backward_input", "bn_stats",
    "bn_output", "bn_backward_reduce", "bn_backward_input",
)  # fmt: skip


@contextlib.contextmanager
def step_ops(monkeypatch):
    """The aten ops each step of the Triton backend runs (the custom op that calls a step
    has already left any outer dispatch mode, so the log is entered inside the step)."""
    ops: dict[str, list[str]] = {}
    cls = triton_backend.TritonBackend

    def logged(name: str):
        step = getattr(cls, name)

        def run(self, *args, **kwargs):
            with OpLog(ops.setdefault(name, [])):
                return step(self, *args, **kwargs)

        return run

    for name in STEPS:
        monkeypatch.setattr(cls, name, logged(name))
    yield ops


@contextlib.contextmanager
def launches():
    """Count the launches of the backend's kernels; their own bookkeeping (the
    interpreter's copies) is hidden from any dispatch mode."""
    names: list[str] = []
    cls = type(K.stats_kernel)
    original = cls.run

    def run(self, *args, **kwargs):
        names.append(self.__name__)
        with _disable_current_modes():
            return original(self, *args, **kwargs)

    cls.run = run
    try:
        yield names
    finally:
        cls.run = original


def _sparse2d(c):
    from syncsn.sparse_switchnorm import SparseSwitchNorm2d

    return SparseSwitchNorm2d(c)


COUNTED = {
    "SwitchNorm2d": (lambda: syncsn.SwitchNorm2d(3), (2, 3, 4, 4)),
    "SwitchNorm1d": (lambda: syncsn.SwitchNorm1d(3), (4, 3)),
    "SparseSwitchNorm2d": (lambda: _sparse2d(3), (2, 3, 4, 4)),
    "SyncBatchNorm": (lambda: syncsn.SyncBatchNorm(3), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("name", COUNTED)
def test_three_launches_forward_two_backward(name, monkeypatch):
    monkeypatch.setenv("SYNCSN_BACKEND", "triton")
    # On CPU the merge is the reference's (shared_backend("cpu")); on CUDA it is Triton's.
    monkeypatch.setattr(ops_module, "shared_backend", lambda device_type: kernels.get("triton"))
    make, shape = COUNTED[name]
    layer = make().to(DEVICE)
    x = make_x(shape, F32, CONTIG).requires_grad_()
    layer(x).sum().backward()  # first call: counters and compilation
    with step_ops(monkeypatch) as ops, launches() as names:
        y = layer(x)
        forward = list(names)
        y.sum().backward()
        backward = names[len(forward) :]
    if name == "SyncBatchNorm":
        assert forward == ["stats_kernel", "merge_kernel", "bn_output_kernel"], forward
        assert backward == ["bn_reduce_kernel", "bn_input_kernel"], backward
    else:
        assert forward == ["stats_kernel", "merge_kernel", "sn_output_kernel"], forward
        assert backward == ["sn_reduce_kernel", "sn_input_kernel"], backward
    assert len(ops) == 5, sorted(ops)  # every step ran on this backend
    for step, inner in ops.items():
        assert inner, f"{step}: the log saw nothing (its outputs are allocations)"
        assert set(inner) <= _ALLOCATIONS, (step, sorted(set(inner) - _ALLOCATIONS))


# What a whole layer call launches in eager mode, as a GPU would see it: the Triton kernels
# and every aten op that computes (not allocations, views or no-op conversions), found with
# the profiler, which leaves the layers on their eager path (a dispatch mode would not).
_NO_KERNEL = _ALLOCATIONS | {
    "aten::empty", "aten::view", "aten::unsqueeze", "aten::select", "aten::detach",
    "aten::as_strided", "aten::expand", "aten::alias", "aten::squeeze", "aten::reshape",
    "aten::_reshape_alias", "aten::slice", "aten::resolve_conj", "aten::resolve_neg",
}  # fmt: skip
_MAYBE_COPIES = {"aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone"}


def _device_work(events) -> list[str]:
    """The kernels a list of profiler events (and their children) would launch."""
    found: list[str] = []
    for event in events:
        if event.name.startswith("triton:"):
            found.append(event.name.removeprefix("triton:"))
        elif event.name.startswith("aten::"):
            inner = _device_work(event.cpu_children)
            if event.name in _NO_KERNEL or (event.name in _MAYBE_COPIES and not inner):
                continue
            found.append(event.name)
        else:  # the autograd Function, the engine's nodes: look inside
            found.extend(_device_work(event.cpu_children))
    return found


def _frozen_sparse2d(mean: list[float], var: list[float]):
    """An SSN layer whose weights become one-hot in its first training call (radius 1,
    untied logits): on CPU the host knows at once, and the layer is settled from then on."""

    def make():
        layer = _sparse2d(3)
        with torch.no_grad():
            layer.mean_weight.copy_(torch.tensor(mean))
            layer.var_weight.copy_(torch.tensor(var))
        syncsn.set_radius(layer, 1.0)
        return layer

    return make


def _sparse_at(make, radius: float):
    """An SSN layer before it settles: sparsestmax at ``radius``, untied logits."""

    def build():
        layer = make()
        with torch.no_grad():
            k = len(layer.scopes)
            layer.mean_weight.copy_(torch.tensor([0.3, 0.1, -0.2][:k]))
            layer.var_weight.copy_(torch.tensor([0.0, 0.5, 0.45][:k]))
        syncsn.set_radius(layer, radius)
        return layer

    return build


WHOLE_CALL = {
    "SwitchNorm2d": (lambda: syncsn.SwitchNorm2d(3), (2, 3, 4, 4)),
    "SwitchNorm3d": (lambda: syncsn.SwitchNorm3d(3), (2, 3, 2, 3, 2)),
    # Two scopes (LN, BN; IN, LN): the kernels put the missing one in.
    "SwitchNorm1d": (lambda: syncsn.SwitchNorm1d(3), (4, 3)),
    "SwitchNorm2d-no-bn": (lambda: syncsn.SwitchNorm2d(3, using_bn=False), (2, 3, 4, 4)),
    "SyncSwitchNorm2d": (lambda: syncsn.SyncSwitchNorm2d(3), (2, 3, 4, 4)),
    "SyncBatchNorm": (lambda: syncsn.SyncBatchNorm(3), (2, 3, 4, 4)),
    # Settled SSN: the kernels use the frozen scopes' one-hot weights. Frozen on (BN, IN),
    # and on (IN, LN), which leaves no batch scope.
    # SSN before it settles: sparsestmax, its gradient and the freezing in the kernels.
    "SparseSwitchNorm2d": (_sparse_at(lambda: _sparse2d(3), 0.3), (2, 3, 4, 4)),
    # (A small radius: with two scopes a pushed point has a zero Jacobian.)
    "SparseSwitchNorm1d": (_sparse_at(lambda: syncsn.SparseSwitchNorm1d(3), 0.05), (4, 3)),
    "SyncSparseSwitchNorm2d": (
        _sparse_at(lambda: syncsn.SyncSparseSwitchNorm2d(3), 0.3),
        (2, 3, 4, 4),
    ),
    "SparseSwitchNorm2d-frozen": (
        _frozen_sparse2d([0.0, 0.1, 0.4], [0.4, 0.1, 0.05]),
        (2, 3, 4, 4),
    ),
    "SparseSwitchNorm2d-frozen-no-bn": (
        _frozen_sparse2d([0.4, 0.1, 0.05], [0.0, 0.4, 0.05]),
        (2, 3, 4, 4),
    ),
}


@pytest.mark.parametrize("name", WHOLE_CALL)
def test_whole_layer_call_is_at_most_three_launches_each_way(name, monkeypatch):
    """Forward and backward of a training call, everything the layer runs: at most three
    kernels each (SN's softmax and its gradient are in the output and reduction kernels)."""
    monkeypatch.setenv("SYNCSN_BACKEND", "triton")
    monkeypatch.setattr(ops_module, "shared_backend", lambda device_type: kernels.get("triton"))
    cls = type(K.stats_kernel)
    original = cls.run

    def run(self, *args, **kwargs):
        with torch.profiler.record_function("triton:" + self.__name__):
            return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    make, shape = WHOLE_CALL[name]
    layer = make().to(DEVICE)
    x = make_x(shape, F32, CONTIG).requires_grad_()
    dy = torch.randn_like(x)
    layer(x).backward(dy)  # first call: counters and compilation
    if "frozen" in name:
        assert layer._reads().settled is not None, layer.frozen_scopes
    elif "Sparse" in name:
        assert layer.frozen_scopes == (None, None)
        assert layer.mean_weight.grad.abs().max() > 0  # the weights' gradient is not zero
    work = {}
    for phase in ("forward", "backward"):
        layer.zero_grad(set_to_none=True)  # as an optimizer does: no accumulation kernels
        x.grad = None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            if phase == "forward":
                y = layer(x)
            else:
                y.backward(dy)
        work[phase] = _device_work([e for e in prof.events() if e.cpu_parent is None])
    prefix = "bn" if name == "SyncBatchNorm" else "sn"
    merge = [] if name.endswith("no-bn") else ["merge_kernel"]  # no batch scope to merge
    assert work["forward"] == ["stats_kernel", *merge, f"{prefix}_output_kernel"], work
    assert work["backward"] == [f"{prefix}_reduce_kernel", f"{prefix}_input_kernel"], work


def test_compiled_layer_runs_the_triton_kernels(monkeypatch):
    """Under torch.compile the custom ops stay calls that pick the backend at run time: a
    compiled SwitchNorm2d runs the Triton kernels and matches the eager layer."""
    monkeypatch.setenv("SYNCSN_BACKEND", "triton")
    torch.manual_seed(0)
    layer, eager = syncsn.SwitchNorm2d(4).to(DEVICE), syncsn.SwitchNorm2d(4).to(DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = make_x((2, 4, 5, 6), F32, CONTIG).requires_grad_()
    x_eager = x.detach().clone().requires_grad_()
    with launches() as names:
        y = compiled(x)
        y.sum().backward()
    assert {"stats_kernel", "sn_output_kernel", "sn_reduce_kernel", "sn_input_kernel"} <= set(
        names
    ), names
    y_eager = eager(x_eager)
    y_eager.sum().backward()
    check("y", y, y_eager.detach(), TOL[F32])
    check("dx", x.grad, x_eager.grad, TOL[F32])
    check("running_var", layer.running_var, eager.running_var, TOL[F32])


# --- the compiler ---------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_kernels_compile_for_sm90():
    """One variant of each kernel through Triton's compiler and ptxas for sm_90 (H100/H200):
    the interpreter does not enforce the compiler's type and control-flow rules."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, str(here / "triton_compile.py"), "--cases", "quick"],
        env={**env, "PYTHONPATH": str(here.parent)},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "12/12 kernel variants compiled" in proc.stdout, proc.stdout[-2000:]
