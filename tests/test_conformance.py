"""Every kernel backend against the reference backend, on the same cases.

A backend is tested by adding an entry to :data:`BACKENDS`. Each case runs the backend and
the reference backend (:mod:`syncsn.kernels.reference`, the definition) on the same values:

- the steps of the interface one by one, each on the same inputs (built by the reference
  chain in the case's dtype), the reference in float64 on those values: results within a
  tolerance of the input's precision, with the reference's dtypes, shapes and layouts;
- whole layers (SN 1d/2d/3d, SSN, SyncBatchNorm on 2-5-D input), forward and backward,
  train and eval, selected with ``SYNCSN_BACKEND``, against the same layer on the
  reference backend in float64: outputs, input and parameter gradients, running
  statistics; and a spy proves the backend ran the passes;
- an empty batch, an input of mean 1e4 and std 1 (within 1e-4 of float64), and uneven
  batches over the ranks of a gloo world (one rank without samples), also with ranks on
  different backends, whose running statistics must agree bitwise.

Tolerances are relative to the largest magnitude of the expected tensor: for results in
x's dtype two units in the last place of float16 / bfloat16, 1e-5 for float32 and 1e-12 for
float64; for the float64 / float32 statistics and parameter gradients, 1e-12 from float64
input and 1e-5 otherwise (a float32 or half input is read exactly; what is left is float32
arithmetic on it).

A backend entry with ``small=True`` (one run in an interpreter) gets the small cases only.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from dist_world import count_collectives, subgroup
from torch import Tensor

import syncsn
from syncsn import kernels
from syncsn.kernels import ops
from syncsn.kernels.interface import SNGrads, SparseSwitch
from syncsn.sparsemax import _sparsestmax_unchecked

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class BackendEntry:
    """A backend under test: its ``SYNCSN_BACKEND`` name, whether it gets only the small
    cases, whether it computes float64 itself (else it hands float64 to the reference), and
    the environment variables it needs."""

    name: str
    small: bool = False
    float64: bool = True
    env: dict[str, str] = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        return self.name


BACKENDS = [BackendEntry("torch"), BackendEntry("cpp")]
# The cases run on CPU tensors: the Triton backend takes them in Triton's interpreter
# (tests/conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA), which is slow, so
# it gets the small cases. With CUDA, tests/test_triton.py runs it on the GPU instead.
if not torch.cuda.is_available():
    BACKENDS.append(BackendEntry("triton", small=True, float64=False))

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
REF = kernels.REFERENCE


def tolerance(dtype: torch.dtype, input_dtype: torch.dtype) -> float:
    """Allowed relative error of a result of ``dtype`` computed from ``input_dtype`` input."""
    if dtype == input_dtype and dtype != torch.float64:
        return 2 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
    return 1e-12 if input_dtype == torch.float64 else 1e-5


def rel_err(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-300)).item()


def channels_last(t: Tensor) -> Tensor:
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def layout_of(x: Tensor) -> torch.memory_format:
    """The memory format a result of x's shape must have."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def make_input(shape, dtype, layout, seed, mean=0.0):
    """x with per-(n, c) offsets (so that the IN, LN and BN scopes differ) and a gradient."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=g, dtype=torch.float64)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset + mean).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x, dy = channels_last(x), channels_last(dy)
    return x, dy


# --- cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str
    small: bool

    @property
    def id(self) -> str:
        return f"{'x'.join(map(str, self.shape))}-{str(self.dtype)[6:]}-{self.layout}"


def _cases(shapes: dict[tuple[int, ...], bool]) -> list[Case]:
    out = []
    for shape, small in shapes.items():
        layouts = ["contiguous"] + (["channels_last"] if len(shape) in (4, 5) else [])
        for dtype in DTYPES:
            out += [Case(shape, dtype, layout, small) for layout in layouts]
    return out


# shape: small. Odd sizes; C = 21 takes the channels-last channel groups of 16, then 4, then
# one. Every dtype and layout runs on these.
SN_SHAPES = {(3, 5, 4, 6): True, (4, 6, 7): True, (5, 7): True, (2, 21, 3, 4, 5): False}
BN_SHAPES = {**SN_SHAPES, (6, 5, 1, 1): True, (6, 5, 1): True}
# 40 x 41 pixels of 21 channels: a channels-last sample is split into several blocks of rows.
LARGE = [Case((1, 21, 40, 41), torch.float32, "channels_last", small=False)]
# A 1x1 map: the IN scope's variance over one value is 0. (SwitchNorm1d on one feature, whose
# LN variance is 0 too, is in tests/test_one_pixel.py: there this file's modes without the
# BN scope give an input gradient of exactly 0, which no relative error can measure.)
ONE_VALUE = [
    Case((3, 5, 1, 1), dtype, layout, small=layout == "contiguous")
    for dtype in (torch.float64, torch.float32)
    for layout in ("contiguous", "channels_last")
]


def runs(entry: BackendEntry, case: Case) -> bool:
    """Every case for each backend, the small ones for small backends; the reference in
    float64 is the expectation itself, so it is left out."""
    if entry.small and not case.small:
        return False
    if case.dtype == torch.float64 and not entry.float64:
        return False
    return not (entry.name == "torch" and case.dtype == torch.float64)


def params_for(entries, cases):
    return [
        pytest.param(entry, case, id=f"{entry.name}-{case.id}")
        for entry in entries
        for case in cases
        if runs(entry, case)
    ]


@pytest.fixture
def backend(request, monkeypatch):
    """The backend of the case's entry, selected by SYNCSN_BACKEND."""
    entry: BackendEntry = request.node.callspec.params["entry"]
    for key, value in entry.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SYNCSN_BACKEND", entry.name)
    chosen = kernels.get(entry.name)
    if not chosen.available():
        if entry.name == "cpp" and (shutil.which("c++") or shutil.which("g++")):
            pytest.fail("a C++ compiler is installed but the C++ kernels did not build")
        pytest.skip(f"the {entry.name} backend is not available: {chosen.unavailable_reason()}")
    return chosen


@pytest.fixture
def ran(monkeypatch) -> Counter:
    """Counts which backend ran each full-size pass of the layers."""
    calls: Counter = Counter()
    choose = ops.passes_backend

    def spy(x, *params):
        chosen = choose(x, *params)
        calls[chosen.name] += 1
        return chosen

    monkeypatch.setattr(ops, "passes_backend", spy)
    return calls


# --- the steps ------------------------------------------------------------------------------


def wide(t):
    """The reference's float64 run takes every floating tensor in float64 (layout kept)."""
    if isinstance(t, Tensor) and t.is_floating_point():
        return t.double()
    if isinstance(t, tuple) and hasattr(t, "_fields"):
        return type(t)(*(wide(v) for v in t))
    return t


def check_step(step: str, got, meta, want, x: Tensor) -> None:
    """``got`` against ``want`` (the float64 reference) and ``meta`` (the reference in the
    case's dtype: dtypes, shapes and layouts)."""
    got = got if isinstance(got, tuple) else (got,)
    meta = meta if isinstance(meta, tuple) else (meta,)
    want = want if isinstance(want, tuple) else (want,)
    names = getattr(meta, "_fields", None) or [str(i) for i in range(len(meta))]
    assert len(got) == len(meta), step
    for name, g, m, w in zip(names, got, meta, want, strict=True):
        where = f"{step}.{name}"
        if isinstance(g, tuple):  # a nested named structure
            check_step(where, g, m, w, x)
            continue
        if g is None or m is None:  # an absent optional result (mixed.selection)
            assert g is None and m is None, where
            continue
        if not g.is_floating_point():  # decisions (the SSN selection): exact
            assert torch.equal(g, w), (where, g, w)
            continue
        assert g.dtype == m.dtype and g.shape == m.shape, (where, g.dtype, m.dtype, g.shape)
        if g.shape == x.shape:
            assert g.is_contiguous(memory_format=layout_of(x)), f"{where}: layout"
        if g.numel():
            tol = tolerance(g.dtype, x.dtype)
            err = rel_err(g, w)
            assert err <= tol, f"{where}: relative error {err:.2e} > {tol:.0e}"


def run_step(backend, step: str, **inputs):
    """The step on ``backend`` and on the reference, in the case's dtype and in float64."""
    got = getattr(backend, step)(**inputs)
    meta = getattr(REF, step)(**inputs)
    want = getattr(REF, step)(**{k: wide(v) for k, v in inputs.items()})
    check_step(step, got, meta, want, inputs["x"])
    return meta


def simplex(seed: int, with_bn: bool, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(3, generator=g, dtype=torch.float64) + 0.2
    if not with_bn:
        w[2] = 0
    return (w / w.sum()).to(dtype)


def check_selected(x, dy, stats, mixed, reduced, bn_mean, bn_var, w, v, gamma, beta, ddof,
                   scopes, selected):  # fmt: skip
    """The reference's frozen vectors against the math: the one-hot weights given as
    weights, and a zero gradient for them."""
    one_hot = [torch.zeros_like(w), torch.zeros_like(v)]
    for vector, scope in zip(one_hot, selected, strict=True):
        if scope >= 0:
            vector[scope] = 1
    w1 = one_hot[0] if selected[0] >= 0 else w
    v1 = one_hot[1] if selected[1] >= 0 else v
    y_sel, mixed_sel = REF.sn_output(x, stats, bn_mean, bn_var, w, v, gamma, beta, 1e-5, False,
                                     scopes, selected)  # fmt: skip
    y_hot, mixed_hot = REF.sn_output(x, stats, bn_mean, bn_var, w1, v1, gamma, beta, 1e-5,
                                     False, scopes)  # fmt: skip
    assert torch.equal(y_sel, y_hot) and torch.equal(mixed_sel.var, mixed_hot.var)
    hot = REF.sn_backward_reduce(x, dy, stats, mixed, bn_mean, bn_var, w1, v1, gamma, ddof,
                                 False, scopes)  # fmt: skip
    assert torch.equal(reduced.grad_mean, hot.grad_mean)
    for grad, free, scope in ((reduced.grad_w, hot.grad_w, selected[0]),
                              (reduced.grad_v, hot.grad_v, selected[1])):  # fmt: skip
        assert torch.equal(grad, torch.zeros_like(grad) if scope >= 0 else free)


def check_sparse(x, dy, stats, mixed, reduced, bn_mean, bn_var, w, v, gamma, beta, ddof,
                 scopes, sparse):  # fmt: skip
    """The reference's SSN switch against the math: its output is that of the weights
    sparsestmax gives (one-hot where frozen), and its logit gradients are autograd's through
    sparsestmax of the gradients of those weights."""
    logits = torch.stack([w, v]).double().requires_grad_()
    frozen = torch.stack([sparse.frozen_w, sparse.frozen_v])
    radius = sparse.radius.double()
    weights = _sparsestmax_unchecked(logits, radius)
    one_hot = (torch.arange(w.shape[0]) == frozen[:, None]).double()
    weights = torch.where(frozen[:, None] >= 0, one_hot, weights)
    y_math, _ = REF.sn_output(x, stats, bn_mean, bn_var, *weights.detach(), gamma, beta, 1e-5,
                              False, scopes)  # fmt: skip
    y_sparse, _ = REF.sn_output(x, stats, bn_mean, bn_var, w.double(), v.double(), gamma, beta,
                                1e-5, False, scopes, sparse=wide(sparse))  # fmt: skip
    assert rel_err(y_sparse, y_math) <= 1e-12
    by_weights = REF.sn_backward_reduce(x, dy, stats, mixed, bn_mean, bn_var,
                                        *weights.detach(), gamma, ddof, False, scopes)  # fmt: skip
    upstream = torch.stack([by_weights.grad_w, by_weights.grad_v])
    selection = mixed.selection
    (expected,) = torch.autograd.grad(weights, logits, upstream)
    expected = torch.where(selection[:, None] >= 0, 0, expected)
    got = torch.stack([reduced.grad_w, reduced.grad_v]).double()
    assert rel_err(got, expected) <= tolerance(w.dtype, x.dtype), (got, expected)


@pytest.mark.parametrize("entry,case", params_for(BACKENDS, _cases(SN_SHAPES) + LARGE + ONE_VALUE))
def test_sn_steps(backend, entry, case):
    """Each SN step, in training (batch scope), eval (running statistics; the gradient in
    another layout than x) and without the BN scope or affine parameters."""
    x, dy = make_input(case.shape, case.dtype, case.layout, seed=1)
    c = x.shape[1]
    ddof = 1 if x.dim() == 2 else 0
    pdtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(2)
    weight = (1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64)).to(pdtype)
    bias = (0.3 * torch.randn(c, generator=g, dtype=torch.float64)).to(pdtype)
    running = (torch.randn(c, generator=g, dtype=torch.float64),
               torch.rand(c, generator=g, dtype=torch.float64) + 0.5)  # fmt: skip

    stats, partials = run_step(backend, "sn_stats", x=x, ddof=ddof)
    batch = REF.merge(partials[None], ddof, None, None, None, 0.1, ddof)
    # mode: the layer's scopes (their mask), whether it is affine, the BN scope, the scopes
    # the mean and variance weights are frozen on (a settled SSN layer; -1: not frozen).
    batch_scope = (batch.mean, batch.var)
    modes = {
        "train": (7, True, batch_scope, (-1, -1)),
        "eval": (7, True, running, (-1, -1)),
        "no_bn": (3, False, (None, None), (-1, -1)),  # IN and LN (using_bn=False)
        "ln_bn": (6, True, batch_scope, (-1, -1)),  # LN and BN (SwitchNorm1d)
        "frozen": (7, True, batch_scope, (2, 0)),  # BN for the means, IN for the variances
        "frozen_ln_bn": (6, True, batch_scope, (-1, 0)),  # LN for the variances
    }
    for mode, (scopes, affine, (bn_mean, bn_var), selected) in modes.items():
        # SN's logits in training and without BN, weights on the simplex (as SSN passes
        # them) in eval and when frozen; (K,) over the layer's own scopes.
        logits = mode not in ("eval", "frozen", "frozen_ln_bn")
        own = [k for k in range(3) if scopes >> k & 1]
        w = simplex(3, scopes & 4, pdtype)[own]
        v = simplex(4, scopes & 4, pdtype)[own]
        w, v = w / w.sum(), v / v.sum()
        if logits:
            w, v = w.log(), v.log()
        gamma, beta = (weight, bias) if affine else (None, None)
        _, mixed = run_step(
            backend, "sn_output", x=x, stats=stats, bn_mean=bn_mean, bn_var=bn_var, w=w, v=v,
            weight=gamma, bias=beta, eps=1e-5, logits=logits, scopes=scopes, selected=selected,
        )  # fmt: skip
        grad = dy.contiguous() if mode == "eval" else dy
        reduced = run_step(
            backend, "sn_backward_reduce", x=x, dy=grad, stats=stats, mixed=mixed,
            bn_mean=bn_mean, bn_var=bn_var, w=w, v=v, weight=gamma, ddof=ddof, logits=logits,
            scopes=scopes, selected=selected,
        )  # fmt: skip
        if selected != (-1, -1):
            check_selected(x, dy, stats, mixed, reduced, bn_mean, bn_var, w, v, gamma, beta,
                           ddof, scopes, selected)  # fmt: skip
        synced = bn_mean is not None and mode != "eval"
        # What the layer gives the input step: the reduction's (N, C) terms.
        empty = x.new_empty(0)
        grads = SNGrads(empty, reduced.grad_mean, reduced.grad_var, empty, empty, empty, empty)
        # As if summed over three ranks like this one.
        totals = 3 * reduced.totals if synced else None
        run_step(
            backend, "sn_backward_input", x=x, dy=grad, stats=stats, mixed=mixed, grads=grads,
            bn_mean=bn_mean if synced else None, totals=totals,
            count=batch.count * 3 if synced else None, weight=gamma, ddof=ddof,
        )  # fmt: skip

    # SSN before it settles: sparsestmax of the logits at a radius, one-hot where frozen.
    # mode: the scopes, the radius, the scopes frozen before the call, and the selection after.
    sparse_modes = {
        "sparse": (7, 0.3, (-1, -1), (-1, -1)),  # pushed, not one-hot
        "sparse_ln_bn": (6, 0.9, (-1, 0), (1, 0)),  # the means become one-hot (on BN)
    }
    for mode, (scopes, radius, frozen, after) in sparse_modes.items():
        own = [k for k in range(3) if scopes >> k & 1]
        w = (simplex(5, True, pdtype)[own] * 3).log()
        v = (simplex(6, True, pdtype)[own] * 3).log()
        switch = SparseSwitch(
            torch.tensor(radius, dtype=pdtype), torch.tensor(frozen[0]), torch.tensor(frozen[1]),
            freeze=False,
        )  # fmt: skip
        batch_mean, batch_var = batch_scope
        _, mixed = run_step(
            backend, "sn_output", x=x, stats=stats, bn_mean=batch_mean, bn_var=batch_var, w=w,
            v=v, weight=weight, bias=bias, eps=1e-5, logits=False, scopes=scopes, sparse=switch,
        )  # fmt: skip
        assert mixed.selection.tolist() == list(after), (mode, mixed.selection)
        reduced = run_step(
            backend, "sn_backward_reduce", x=x, dy=dy, stats=stats, mixed=mixed,
            bn_mean=batch_mean, bn_var=batch_var, w=w, v=v, weight=weight, ddof=ddof,
            logits=False, scopes=scopes, radius=switch.radius,
        )  # fmt: skip
        if mode == "sparse":
            assert reduced.grad_w.abs().max() > 0 and reduced.grad_v.abs().max() > 0
        check_sparse(x, dy, stats, mixed, reduced, batch_mean, batch_var, w, v, weight, bias,
                     ddof, scopes, switch)  # fmt: skip
        # In training the backend also writes the selection into the frozen buffers.
        buffers = torch.tensor(frozen[0]), torch.tensor(frozen[1])
        training = switch._replace(frozen_w=buffers[0], frozen_v=buffers[1], freeze=True)
        backend.sn_output(x, stats, batch_mean, batch_var, w, v, weight, bias, 1e-5, False,
                          scopes, sparse=training)  # fmt: skip
        assert [int(b) for b in buffers] == list(after), mode


@pytest.mark.parametrize("entry,case", params_for(BACKENDS, _cases(BN_SHAPES) + LARGE))
def test_bn_steps(backend, entry, case):
    x, dy = make_input(case.shape, case.dtype, case.layout, seed=5)
    c = x.shape[1]
    pdtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(6)
    weight = (1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64)).to(pdtype)
    bias = (0.3 * torch.randn(c, generator=g, dtype=torch.float64)).to(pdtype)

    centre, partials = run_step(backend, "bn_stats", x=x)
    batch = REF.merge(partials[None], 0, None, None, None, 0.1, 1)
    for affine in (True, False):
        gamma, beta = (weight, bias) if affine else (None, None)
        _, saved = run_step(
            backend, "bn_output", x=x, centre=centre, mean=batch.mean, var=batch.var,
            weight=gamma, bias=beta, eps=1e-5,
        )  # fmt: skip
        grad = dy if affine else dy.contiguous()
        totals, *_ = run_step(
            backend, "bn_backward_reduce", x=x, dy=grad, saved=saved, weight=gamma
        )
        # As if summed over three ranks like this one.
        run_step(
            backend, "bn_backward_input", x=x, dy=grad, saved=saved, weight=gamma,
            totals=3 * totals, count=3 * batch.count,
        )  # fmt: skip


# --- whole layers ---------------------------------------------------------------------------


def sparse(c: int) -> torch.nn.Module:
    layer = syncsn.SparseSwitchNorm2d(c)
    syncsn.set_radius(layer, 0.2)
    return layer


def sparse_frozen(c: int) -> torch.nn.Module:
    """Sparse SN frozen on IN (means) and LN (variances): no batch scope."""
    layer = syncsn.SparseSwitchNorm2d(c)
    layer.frozen_mean.fill_(0)
    layer.frozen_var.fill_(1)
    return layer


# name: (factory, spatial dims, whether eval mode runs the layer's Function)
LAYERS = {
    "SwitchNorm1d": (syncsn.SwitchNorm1d, (), True),
    "SwitchNorm2d": (syncsn.SwitchNorm2d, (5, 7), True),
    "SwitchNorm3d": (syncsn.SwitchNorm3d, (3, 4, 5), True),
    "SwitchNorm2d-1x1": (syncsn.SwitchNorm2d, (1, 1), True),
    "SwitchNorm2d-noBN-noaffine": (
        lambda c: syncsn.SwitchNorm2d(c, using_bn=False, affine=False),
        (5, 7),
        True,
    ),
    "SparseSwitchNorm2d": (sparse, (5, 7), True),
    "SparseSwitchNorm2d-frozen": (sparse_frozen, (5, 7), True),
    "SyncBatchNorm-2d": (lambda c: syncsn.SyncBatchNorm(c, momentum=None), (), False),
    "SyncBatchNorm-3d": (syncsn.SyncBatchNorm, (9,), False),
    "SyncBatchNorm-4d": (syncsn.SyncBatchNorm, (5, 7), False),
    "SyncBatchNorm-5d": (syncsn.SyncBatchNorm, (3, 4, 5), False),
    "SyncBatchNorm-1x1": (syncsn.SyncBatchNorm, (1, 1), False),
    "SyncBatchNorm-batch-stats": (
        lambda c: syncsn.SyncBatchNorm(c, affine=False, track_running_stats=False),
        (5, 7),
        True,
    ),
}
# The layers every dtype runs on; the others run float32 and bfloat16.
ALL_DTYPES = {"SwitchNorm2d", "SwitchNorm3d", "SyncBatchNorm-4d", "SyncBatchNorm-5d"}


def randomize_(layer: torch.nn.Module, seed: int) -> None:
    """Non-trivial parameters and running statistics, so every term matters. (Sparse layers
    get logits close enough for every scope to keep a non-zero weight: a scope of weight 0
    has a logit gradient of exactly 0, which only rounding noise could be compared with.)"""
    g = torch.Generator().manual_seed(seed)
    sparse_layer = isinstance(layer, syncsn.SparseSwitchNorm2d)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            logits = name in ("mean_weight", "var_weight")
            scale = (0.05 if sparse_layer else 0.5) if logits else 0.3
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=g))
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=g) + 0.5)


def run_layer(layer, x, dy, steps):
    """``steps`` forward+backward passes of a copy of ``layer``; its results after the last."""
    layer = copy.deepcopy(layer)
    for _ in range(steps):
        layer.zero_grad()
        xg = x.detach().clone().requires_grad_(True)
        y = layer(xg)
        y.backward(dy)
    out = {"y": y.detach(), "dx": xg.grad}
    out.update({"d" + n: p.grad for n, p in layer.named_parameters()})
    out.update(dict(layer.named_buffers()))
    return out


def reference_run(layer, x, dy, steps, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("SYNCSN_BACKEND", "torch")
        return run_layer(copy.deepcopy(layer).double(), x.double(), dy.double(), steps)


def _layer_cases():
    for name, (_, spatial, eval_too) in LAYERS.items():
        dtypes = DTYPES if name in ALL_DTYPES else (torch.float32, torch.bfloat16)
        layouts = ["contiguous"] + (["channels_last"] if len(spatial) in (2, 3) else [])
        for dtype in dtypes:
            for layout in layouts:
                for training in (True, False) if eval_too else (True,):
                    mode = "train" if training else "eval"
                    small = layout == "contiguous" and dtype == torch.float32
                    yield name, Case((4, 21, *spatial), dtype, layout, small), training, mode


LAYER_PARAMS = [
    pytest.param(entry, name, case, training, id=f"{entry.name}-{name}-{case.id}-{mode}")
    for entry in BACKENDS
    for name, case, training, mode in _layer_cases()
    if (case.small or not entry.small)
    and not (entry.name == "torch" and case.dtype == torch.float64)
]


@pytest.mark.parametrize("entry,name,case,training", LAYER_PARAMS)
def test_layers(backend, ran, monkeypatch, entry, name, case, training):
    factory, _, _ = LAYERS[name]
    layer = factory(case.shape[1]).to(
        torch.float64 if case.dtype == torch.float64 else torch.float32
    )
    randomize_(layer, seed=len(name))
    layer.train(training)
    x, dy = make_input(case.shape, case.dtype, case.layout, seed=3)
    got = run_layer(layer, x, dy, steps=2)
    assert ran and set(ran) == {backend.name}, f"the passes ran on {dict(ran)}"
    want = reference_run(layer, x, dy, 2, monkeypatch)

    assert got.keys() == want.keys()
    assert got["y"].dtype == got["dx"].dtype == case.dtype
    for key in ("y", "dx"):
        assert got[key].is_contiguous(memory_format=layout_of(x)), f"{key}: layout"
    for key, value in got.items():
        if not value.is_floating_point():
            assert torch.equal(value, want[key]), key
            continue
        tol = tolerance(value.dtype, case.dtype)
        err = rel_err(value, want[key])
        assert err <= tol, f"{key}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("entry", BACKENDS, ids=str)
@pytest.mark.parametrize("kind", ["sn", "bn"])
def test_empty_batch(backend, monkeypatch, entry, kind):
    """An empty batch: empty output and input gradient, zero parameter gradients, running
    statistics unchanged, nothing that is not finite."""
    layer = syncsn.SwitchNorm2d(5) if kind == "sn" else syncsn.SyncBatchNorm(5)
    randomize_(layer, seed=7)
    x, dy = make_input((0, 5, 4, 6), torch.float32, "contiguous", seed=8)
    before = {n: b.clone() for n, b in layer.named_buffers()}
    got = run_layer(layer, x, dy, steps=1)
    assert got["y"].shape == got["dx"].shape == x.shape
    for name, value in before.items():
        assert torch.equal(got[name], value), name
    for key in ("dweight", "dbias"):
        assert torch.equal(got[key], torch.zeros_like(got[key])), key
    assert all(torch.isfinite(v).all() for v in got.values() if v.is_floating_point())


@pytest.mark.parametrize("entry", BACKENDS, ids=str)
@pytest.mark.parametrize("kind", ["sn", "bn"])
def test_large_mean_float32(backend, ran, monkeypatch, entry, kind):
    """Mean 1e4, std 1, float32, first training step: the batch variance (from the running
    variance), the output and the gradients within 1e-4 of float64."""
    x, dy = make_input((4, 3, 8, 8), torch.float64, "contiguous", seed=9)
    x = x - x.mean() + 1e4
    layer = syncsn.SwitchNorm2d(3) if kind == "sn" else syncsn.SyncBatchNorm(3)
    got = run_layer(layer, x.float(), dy.float(), steps=1)
    assert set(ran) == {backend.name}, dict(ran)
    want = reference_run(layer, x, dy, 1, monkeypatch)
    momentum = layer.momentum
    batch_var = {k: (r["running_var"].double() - (1 - momentum)) / momentum
                 for k, r in (("got", got), ("want", want))}  # fmt: skip
    assert rel_err(batch_var["got"], batch_var["want"]) <= 1e-4
    for key in ("y", "dx", "dweight", "dbias"):
        assert rel_err(got[key], want[key]) <= 1e-4, key


# --- several ranks --------------------------------------------------------------------------

SIZES = (3, 1, 0, 2)  # samples per rank: uneven, rank 2 has none
SYNC_KINDS = {"sn": ("channels_last", (5, 6)), "bn": ("contiguous", (4, 5))}


def _sync_case(rank, names, kind):
    """Rank r runs its slice of the global batch through the Sync layer on backend
    names[r]; returns its results and its collective counts."""
    layout, spatial = SYNC_KINDS[kind]
    x_all, dy_all = make_input((sum(SIZES), 6, *spatial), torch.float32, layout, seed=21)
    start = sum(SIZES[:rank])
    x, dy = x_all[start : start + SIZES[rank]], dy_all[start : start + SIZES[rank]]
    group = subgroup(4)
    if kind == "sn":
        layer = syncsn.SyncSwitchNorm2d(6, process_group=group)
    else:
        layer = syncsn.SyncBatchNorm(6, process_group=group)
    randomize_(layer, seed=22)
    saved = os.environ.get("SYNCSN_BACKEND")
    os.environ["SYNCSN_BACKEND"] = names[rank]
    try:
        xg = x.clone().requires_grad_(True)
        holder = {}
        fwd = count_collectives(lambda: holder.setdefault("y", layer(xg)))
        bwd = count_collectives(lambda: holder["y"].backward(dy))
    finally:
        if saved is None:
            del os.environ["SYNCSN_BACKEND"]
        else:
            os.environ["SYNCSN_BACKEND"] = saved
    out = {"y": holder["y"].detach(), "dx": xg.grad}
    out.update({"d" + n: p.grad for n, p in layer.named_parameters()})
    out.update(dict(layer.named_buffers()))
    return out, sum(fwd.values()), sum(bwd.values())


def _check_against_local(results, kind, monkeypatch):
    """The ranks' results against the local layer on the concatenated batch (float64)."""
    layout, spatial = SYNC_KINDS[kind]
    x, dy = make_input((sum(SIZES), 6, *spatial), torch.float32, layout, seed=21)
    local = syncsn.SwitchNorm2d(6) if kind == "sn" else torch.nn.BatchNorm2d(6)
    randomize_(local, seed=22)
    want = reference_run(local, x, dy, 1, monkeypatch)
    tol = 1e-5
    for rank, (out, fwd, bwd) in enumerate(results):
        assert (fwd, bwd) == (1, 1), f"rank {rank}: {fwd} / {bwd} collectives"
        s = slice(sum(SIZES[:rank]), sum(SIZES[: rank + 1]))
        for key in ("y", "dx"):
            assert out[key].shape == want[key][s].shape, (rank, key)
            if SIZES[rank]:
                assert rel_err(out[key], want[key][s]) <= tol, (rank, key)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert rel_err(out[key], want[key]) <= tol, (rank, key)
            # Bitwise the same on every rank, the one without samples included.
            assert torch.equal(out[key], results[0][0][key]), (rank, key)
    for key in [k for k in want if k.startswith("d") and k != "dx"]:
        total = sum(out[key].double() for out, *_ in results)
        assert rel_err(total, want[key]) <= tol, key


@pytest.mark.parametrize("entry", BACKENDS, ids=str)
def test_uneven_ranks(world, backend, monkeypatch, entry):
    """Sync SN and SyncBatchNorm on 4 ranks holding 3, 1, 0 and 2 samples equal the local
    layer on the whole batch; one collective each way."""
    for kind in SYNC_KINDS:
        results = world.run(_sync_case, [entry.name] * 4, kind)
        _check_against_local(results, kind, monkeypatch)


def test_ranks_on_different_backends_agree(world, monkeypatch):
    """Ranks may run their passes on different backends: the merge and the running
    statistics are computed alike from the gathered partials, so they agree bitwise."""
    names = [entry.name for entry in BACKENDS if not entry.small and not entry.env]
    if len(names) < 2 or not all(kernels.get(n).available() for n in names):
        pytest.skip(f"needs two available backends that run on this process, got {names}")
    for kind in SYNC_KINDS:
        results = world.run(_sync_case, [names[r % len(names)] for r in range(4)], kind)
        _check_against_local(results, kind, monkeypatch)


def test_every_backend_name_is_known():
    assert {entry.name for entry in BACKENDS} <= set(kernels.NAMES)
