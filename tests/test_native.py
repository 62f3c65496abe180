"""The C++ CPU kernels (syncsn._native, the ``cpp`` backend): what the conformance suite
(tests/test_conformance.py, every step and layer against the reference backend) does not
cover: how the kernels are built, loaded and switched off; that a layer's pass is one call
each; results that do not depend on the thread count; gradcheck through them; float16
planes too long for a float16 sum; and the errors the operators give for bad arguments.

A spy on the compiled functions proves which path ran.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from collections import Counter

import pytest
import torch

import syncsn
from syncsn import _native, kernels
from syncsn.kernels import cpp as cpp_backend

pytestmark = pytest.mark.timeout(300)

STEPS = ("sn_stats", "sn_output", "sn_backward_reduce", "sn_backward_input")
BN_STEPS = ("bn_stats", "bn_output", "bn_backward_reduce", "bn_backward_input")


class Spy:
    """Stands in for the operators' namespace and counts the calls made to it."""

    def __init__(self, namespace) -> None:
        self._namespace = namespace
        self.calls: Counter = Counter()

    def __getattr__(self, name):
        op = getattr(self._namespace, name)

        def call(*args, **kwargs):
            self.calls[name] += 1
            return op(*args, **kwargs)

        return call


@pytest.fixture(scope="module")
def ops():
    namespace = _native.kernels()
    if namespace is None:
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail("a C++ compiler is installed but the C++ kernels did not build")
        pytest.skip(
            "the C++ kernels could not be built on this machine (a warning names the "
            "compiler error); the reference backend is tested by the rest of the suite"
        )
    return namespace


@pytest.fixture
def spy(ops, monkeypatch):
    """The kernels, counted, selected with SYNCSN_BACKEND=cpp."""
    recorder = Spy(ops)
    monkeypatch.setattr(cpp_backend, "_LIB", recorder)
    monkeypatch.setenv("SYNCSN_BACKEND", "cpp")
    return recorder


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


def make_input(shape, dtype, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=g, dtype=torch.float64)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x, dy = (
            x.contiguous(memory_format=torch.channels_last),
            dy.contiguous(memory_format=torch.channels_last),
        )
    return x, dy


def run(layer, x, dy, backend, steps=1):
    """``steps`` forward+backward passes of a copy of ``layer`` on ``backend``."""
    layer = copy.deepcopy(layer)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SYNCSN_BACKEND", backend)
        for _ in range(steps):
            layer.zero_grad()
            xg = x.detach().clone().requires_grad_(True)
            y = layer(xg)
            y.backward(dy)
    out = {"y": y.detach(), "dx": xg.grad}
    out.update({"d" + n: p.grad for n, p in layer.named_parameters()})
    out.update({n: b for n, b in layer.named_buffers()})
    return out


def test_each_step_is_one_call(spy):
    """A layer's forward+backward is one operator call per step and one for the merge (the
    small math, SN's softmax included, is fused into them)."""
    x, dy = make_input((4, 6, 5, 7), torch.float32, seed=1)
    run(syncsn.SwitchNorm2d(6), x, dy, "cpp")
    assert spy.calls == Counter(STEPS + ("merge",))
    spy.calls.clear()
    run(syncsn.SyncBatchNorm(6), x, dy, "cpp")
    assert spy.calls == Counter(BN_STEPS + ("merge",))
    spy.calls.clear()
    run(syncsn.SwitchNorm1d(6), x[:, :, 0, 0].contiguous(), dy[:, :, 0, 0].contiguous(), "cpp")
    assert spy.calls == Counter(STEPS + ("merge",))


def test_operators_take_named_arguments(ops):
    """The registered operators run the module's functions, and their schemas name the
    arguments as the interface does; calls by name work."""
    x, _ = make_input((3, 4, 5), torch.float64, seed=2)
    operators = torch.ops.syncsn_cpp
    stats = operators.sn_stats(x=x, ddof=0)
    expected = kernels.REFERENCE.sn_stats(x, 0)[0]
    assert max_rel_err(stats[1], expected.mean) <= 1e-12
    for got, want in zip(stats, ops.sn_stats(x, 0), strict=True):
        assert torch.equal(got, want)
    schema = operators.sn_backward_input.default._schema
    names = [a.name for a in schema.arguments]
    assert names[:4] == ["x", "dy", "centre", "mean"] and names[-1] == "ddof"


def test_bad_arguments_give_clear_errors(ops):
    x, _ = make_input((3, 4, 5, 6), torch.float32, seed=3)
    stats = ops.sn_stats(x, 0)
    w = torch.full((3,), 1 / 3)
    with pytest.raises(RuntimeError, match="bn_mean must have 4 elements, got shape \\[5\\]"):
        ops.sn_output(
            x, *stats[:5], torch.zeros(5, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
            w, w, None, None, 1e-5, False,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="expected a contiguous or channels-last tensor"):
        ops.bn_stats(x.transpose(2, 3))


def test_other_layouts_run_on_the_reference_backend(spy):
    """Dense, but neither contiguous nor channels-last: the reference backend runs it."""
    base, dy = make_input((4, 6, 7, 5), torch.float64, seed=4)
    x, dy = base.transpose(2, 3), dy.transpose(2, 3)
    for layer in (syncsn.SwitchNorm2d(6).double(), syncsn.SyncBatchNorm(6).double()):
        out = run(layer, x, dy, "cpp")
        reference = run(layer, x.contiguous(), dy.contiguous(), "torch")
        for key, value in out.items():
            if value.is_floating_point():
                assert max_rel_err(value, reference[key]) <= 1e-12, key
    assert set(spy.calls) == {"merge"}, spy.calls  # the shared merge, whatever the layout


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_planes_split_over_threads_give_the_same_bits(spy, layout):
    """Planes of 12,000 elements: the passes split each sample into blocks of rows, spread
    over threads and combined in a fixed order: the results do not depend on the thread
    count, and match the float64 reference."""
    x, dy = make_input((2, 3, 100, 120), torch.float32, layout, seed=12)
    layer = syncsn.SwitchNorm2d(3)
    with torch.no_grad():
        layer.weight.add_(0.3)
        layer.mean_weight.copy_(torch.tensor([0.2, -0.4, 0.5]))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(layer, x, dy, "cpp", steps=2)
        torch.set_num_threads(2)
        double = run(layer, x, dy, "cpp", steps=2)
    finally:
        torch.set_num_threads(threads)
    reference = run(copy.deepcopy(layer).double(), x.double(), dy.double(), "torch", steps=2)
    for key, value in single.items():
        assert torch.equal(value, double[key]), key
        if value.is_floating_point():
            assert max_rel_err(value, reference[key]) <= 1e-6, key
    assert spy.calls["sn_stats"] == 4


def test_gradcheck_through_the_kernels(spy):
    g = torch.Generator().manual_seed(8)
    cases = [
        (syncsn.SwitchNorm2d(2), (3, 2, 3, 3)),
        (syncsn.SwitchNorm1d(3), (4, 3)),
        (syncsn.SyncBatchNorm(2), (3, 2, 3, 3)),
    ]
    for layer, shape in cases:
        layer = layer.double()
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        x = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_(True)
        names = [n for n, _ in layer.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

        def f(x, *ps, layer=layer, names=names):
            return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

        assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)
    assert set(spy.calls) == set(STEPS) | set(BN_STEPS) | {"merge"}, spy.calls


def test_float16_with_more_than_65504_elements_per_channel(spy):
    x, dy = make_input((2, 2, 260, 260), torch.float64, seed=2)
    x = (x + 4).abs()  # positive: a float16 running sum of this plane would overflow
    for layer in (syncsn.SwitchNorm2d(2), syncsn.SyncBatchNorm(2)):
        native = run(layer, x.half(), dy.half(), "cpp")
        reference = run(
            copy.deepcopy(layer).double(), x.half().double(), dy.half().double(), "torch"
        )
        for key, value in native.items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), key
                tol = 2 * torch.finfo(torch.float16).eps if key in ("y", "dx") else 1e-6
                assert max_rel_err(value, reference[key]) <= tol, key
    assert spy.calls["sn_stats"] == spy.calls["bn_stats"] == 1


def test_switched_off_by_environment(ops, monkeypatch):
    monkeypatch.setenv("SYNCSN_NATIVE", "0")
    assert _native.kernels() is None
    assert kernels.passes_backend(torch.ones(2, 3, 4)) is kernels.REFERENCE
    monkeypatch.setenv("SYNCSN_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="SYNCSN_BACKEND=cpp: .*SYNCSN_NATIVE=0"):
        kernels.passes_backend(torch.ones(2, 3, 4))
    monkeypatch.setenv("SYNCSN_NATIVE", "1")
    assert _native.kernels() is ops
    assert kernels.passes_backend(torch.ones(2, 3, 4)).name == "cpp"


@pytest.mark.timeout(240)
def test_a_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error this source does not compile\n")
    monkeypatch.setenv("SYNCSN_EXTENSION_DIR", str(tmp_path / "build"))
    loader = _native.Loader(sources=[broken], name="syncsn_broken_test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loader.get() is None
        assert loader.get() is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "pure-torch" in messages[0], messages


@pytest.mark.parametrize("world", [1, 2, 3, 4, 16])
def test_merge_gives_the_reference_bits(ops, world):
    """The C++ merge is the shared CPU merge: bit for bit the reference's (which every rank
    without the kernels runs) over the world sizes where torch sums ranks in order, and
    within 2e-15 beyond; running buffers of every dtype, both momentum modes, batches too
    small or non-finite."""
    g = torch.Generator().manual_seed(world)
    cpp, ref = kernels.get("cpp"), kernels.REFERENCE
    for c, buffers, momentum, ddof, scale in [
        (64, torch.float32, 0.1, 0, 1e4),
        (3, torch.float16, 0.1, 1, 1.0),
        (64, torch.bfloat16, None, 0, 1.0),
        (5, torch.float64, None, 1, 1e30),
        (64, torch.float16, 0.1, 0, 1e6),  # folds that overflow float16
    ]:
        n = torch.randint(0, 4, (world,), generator=g).double()
        mean = torch.randn(world, c, generator=g, dtype=torch.float64) * scale + scale
        m2 = torch.rand(world, c, generator=g, dtype=torch.float64) * scale * n[:, None]
        gathered = torch.cat([n[:, None], mean * (n[:, None] > 0), m2 * (n[:, None] > 0)], 1)
        if c == 5:
            gathered[0, 1] = float("nan")
        running = (torch.randn(c, generator=g) * scale).to(buffers), torch.rand(c).to(buffers)
        # A layer that does not synchronize passes its one row of partials as it is.
        inputs = [gathered, gathered[0]] if world == 1 else [gathered]
        results = []
        for backend, parts in [(ref, gathered)] + [(cpp, parts) for parts in inputs]:
            rm, rv, nbt = running[0].clone(), running[1].clone(), torch.tensor(3)
            out = backend.merge(parts, ddof, rm, rv, nbt, momentum, 1)
            results.append((*out, rm, rv, nbt))
        names = ("count", "mean", "var", "flags", "rm", "rv", "nbt")
        pairs = [
            (name, got, want)
            for other in results[1:]
            for name, got, want in zip(names, other, results[0], strict=True)
        ]
        for name, got, want in pairs:
            assert got.dtype == want.dtype and got.shape == want.shape, name
            if world <= 4:
                bits = got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
                assert torch.equal(*bits), name
            else:
                a, b = got.double(), want.double()
                assert torch.allclose(a, b, rtol=2e-15, atol=0, equal_nan=True), name
