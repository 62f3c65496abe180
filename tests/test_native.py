"""The compiled CPU kernels (syncsn._native) against the pure-torch implementation.

Every layer kind, dtype, memory layout and mode runs on the kernels and is compared with the
pure-torch implementation (``SYNCSN_NATIVE=0``) in float64 on the same values: outputs, the
input gradient, every parameter gradient and the running statistics. Tolerances (relative to
the largest magnitude of each quantity): 1e-12 for float64, 1e-6 for float32 and for the
float32 results of half-precision input (parameter gradients, running statistics), two
units in the last place for half-precision outputs. Float32 runs are also compared with the
pure-torch float32 run directly. A spy on the kernels proves which path ran.

The multi-rank cases run on the module's 4-rank gloo world, with a rank holding no samples
(which takes the pure-torch path, making the same collectives).
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from dist_world import count_collectives, subgroup

import syncsn
from syncsn import _native
from syncsn import functional as F

pytestmark = pytest.mark.timeout(300)

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
OUTPUT_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
}


@contextmanager
def native_mode(on: bool):
    """Run with the compiled kernels (on) or the pure-torch implementation (off)."""
    before = os.environ.get("SYNCSN_NATIVE")
    os.environ["SYNCSN_NATIVE"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["SYNCSN_NATIVE"]
        else:
            os.environ["SYNCSN_NATIVE"] = before


class Spy:
    """Stands in for the kernels module and counts the calls made to it."""

    def __init__(self, module) -> None:
        self._module = module
        self.calls: Counter = Counter()

    def __getattr__(self, name):
        fn = getattr(self._module, name)

        def call(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return call


@pytest.fixture(scope="module")
def kernels():
    with native_mode(True):
        module = _native.kernels()
    if module is None:
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail("a C++ compiler is installed but the native CPU kernels did not build")
        pytest.skip(
            "the native CPU kernels could not be built on this machine (a warning names the "
            "compiler error); the pure-torch implementation is tested by the rest of the suite"
        )
    return module


@pytest.fixture
def spy(kernels, monkeypatch):
    recorder = Spy(kernels)
    monkeypatch.setattr(_native, "kernels", lambda: recorder if _native.enabled() else None)
    return recorder


# Kernels used whenever they are available, whatever this rank's input: ranks must compute
# bitwise the same running statistics.
SHARED_STEPS = {"merge_samples", "merge_elements", "update_running_"}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


def randomize_(layer: torch.nn.Module, seed: int) -> None:
    """Non-trivial parameters and running statistics, so every term matters. (Sparse layers
    get logits close enough for every scope to keep a non-zero weight: a scope with weight 0
    has a logit gradient of exactly 0, which only rounding noise could be compared with.)"""
    g = torch.Generator().manual_seed(seed)
    sparse = isinstance(layer, syncsn.SparseSwitchNorm2d)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            logits = name in ("mean_weight", "var_weight")
            scale = (0.05 if sparse else 0.5) if logits else 0.3
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=g))
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=g) + 0.5)


def make_input(shape, dtype, layout, seed, mean=0.0):
    """x with per-(n, c) offsets (so the IN, LN and BN scopes differ) and an upstream grad."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=g, dtype=torch.float64)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset + mean).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    return x, dy


def run(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, native: bool, steps: int = 2):
    """``steps`` forward+backward passes of a copy of ``layer``; its results after the last."""
    layer = copy.deepcopy(layer)
    with native_mode(native):
        for _ in range(steps):
            layer.zero_grad()
            xg = x.detach().clone().requires_grad_(True)
            y = layer(xg)
            y.backward(dy)
    out = {"y": y.detach(), "dx": xg.grad}
    out.update({"d" + n: p.grad for n, p in layer.named_parameters()})
    out.update({n: b for n, b in layer.named_buffers() if b.is_floating_point()})
    out.update({n: b for n, b in layer.named_buffers() if not b.is_floating_point()})
    return out


def sparse_sn(c: int) -> torch.nn.Module:
    layer = syncsn.SparseSwitchNorm2d(c)
    syncsn.set_radius(layer, 0.2)
    return layer


def sn_frozen_in_ln(c: int) -> torch.nn.Module:
    """A Sparse SN layer frozen on IN (means) and LN (variances): the two-scope path."""
    layer = syncsn.SparseSwitchNorm2d(c)
    layer.frozen_mean.fill_(0)
    layer.frozen_var.fill_(1)
    return layer


# name: (factory, spatial dims, eval mode uses the Function)
LAYERS = {
    "SwitchNorm2d": (lambda c: syncsn.SwitchNorm2d(c), (5, 7), True),
    "SwitchNorm3d": (lambda c: syncsn.SwitchNorm3d(c), (3, 4, 5), True),
    "SwitchNorm2d-noBN-noaffine": (
        lambda c: syncsn.SwitchNorm2d(c, using_bn=False, affine=False),
        (5, 7),
        True,
    ),
    "SwitchNorm2d-cumulative": (
        lambda c: syncsn.SwitchNorm2d(c, using_moving_average=False),
        (5, 7),
        True,
    ),
    "SparseSwitchNorm2d": (sparse_sn, (5, 7), True),
    "SparseSwitchNorm2d-frozen": (sn_frozen_in_ln, (5, 7), True),
    "SyncBatchNorm-2d": (lambda c: syncsn.SyncBatchNorm(c), (5, 7), False),
    "SyncBatchNorm-3d": (lambda c: syncsn.SyncBatchNorm(c), (3, 4, 5), False),
    "SyncBatchNorm-1d": (lambda c: syncsn.SyncBatchNorm(c), (9,), False),
    "SyncBatchNorm-features": (lambda c: syncsn.SyncBatchNorm(c, momentum=None), (), False),
    "SyncBatchNorm-batch-stats": (
        lambda c: syncsn.SyncBatchNorm(c, affine=False, track_running_stats=False),
        (5, 7),
        True,
    ),
}


def _cases():
    for name, (_, spatial, eval_too) in LAYERS.items():
        for dtype in DTYPES:
            for layout in ("contiguous", "channels_last"):
                if layout == "channels_last" and len(spatial) not in (2, 3):
                    continue
                for training in (True, False) if eval_too else (True,):
                    yield pytest.param(
                        name,
                        dtype,
                        layout,
                        training,
                        id=f"{name}-{str(dtype)[6:]}-{layout}-{'train' if training else 'eval'}",
                    )


@pytest.mark.parametrize("name,dtype,layout,training", list(_cases()))
def test_native_matches_pure_torch(spy, name, dtype, layout, training):
    factory, spatial, _ = LAYERS[name]
    c = 21  # channels-last passes take channels in groups of 16, then 4, then one by one
    layer = factory(c).to(torch.float64 if dtype == torch.float64 else torch.float32)
    randomize_(layer, seed=len(name))
    layer.train(training)
    x, dy = make_input((4, c, *spatial), dtype, layout, seed=3)

    native = run(layer, x, dy, native=True)
    calls = sum(spy.calls.values())
    assert calls > 0, "the layer did not run on the compiled kernels"
    reference = run(copy.deepcopy(layer).double(), x.double(), dy.double(), native=False)
    assert sum(spy.calls.values()) == calls, "SYNCSN_NATIVE=0 still used the kernels"

    assert native["y"].dtype == dtype and native["dx"].dtype == dtype
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert native["y"].is_contiguous(memory_format=fmt)
        assert native["dx"].is_contiguous(memory_format=fmt)
    assert native.keys() == reference.keys()
    for key, value in native.items():
        if not value.is_floating_point():
            assert torch.equal(value, reference[key]), key
            continue
        tol = OUTPUT_TOL[dtype] if key in ("y", "dx") else OUTPUT_TOL[value.dtype]
        err = max_rel_err(value, reference[key])
        assert err <= tol, f"{key}: relative error {err:.2e} > {tol:.0e}"

    if dtype == torch.float32:
        # Also against the pure-torch float32 run itself, within 1e-6 plus that run's own
        # error: it accumulates its reductions in float32, which moves the switch-logit
        # gradients (sums of terms that largely cancel) by up to ~1e-4 relative.
        plain = run(layer, x, dy, native=False)
        for key, value in native.items():
            if value.is_floating_point():
                own = max_rel_err(plain[key], reference[key])
                err = max_rel_err(value, plain[key])
                assert err <= 1e-6 + own, f"{key} vs pure-torch float32: {err:.2e}"


def test_the_kernels_run_each_pass_in_few_calls(spy):
    x, dy = make_input((4, 6, 5, 7), torch.float32, "contiguous", seed=1)
    layer = syncsn.SwitchNorm2d(6)
    run(layer, x, dy, native=True, steps=1)
    assert spy.calls == Counter(
        sn_stats=1,
        merge_samples=1,
        update_running_=1,
        sn_output=1,
        sn_backward_reduce=1,
        sn_backward_input=1,
    )
    spy.calls.clear()
    run(syncsn.SyncBatchNorm(6), x, dy, native=True, steps=1)
    assert spy.calls == Counter(
        bn_stats=1,
        merge_elements=1,
        update_running_=1,
        bn_output=1,
        bn_backward_reduce=1,
        bn_backward_input=1,
    )


@pytest.mark.parametrize("kind", ["sn", "bn"])
def test_large_mean_float32_first_step(spy, kind):
    """Accuracy criterion: mean 1e4, std 1, float32: var_bn and the output within 1e-4."""
    x, dy = make_input((4, 3, 8, 8), torch.float64, "contiguous", seed=5)
    x = x - x.mean() + 1e4
    layer = syncsn.SwitchNorm2d(3) if kind == "sn" else syncsn.SyncBatchNorm(3)
    native = run(layer, x.float(), dy.float(), native=True, steps=1)
    assert spy.calls, "the layer did not run on the compiled kernels"
    reference = run(copy.deepcopy(layer).double(), x, dy, native=False, steps=1)
    momentum = layer.momentum
    var_native = (native["running_var"].double() - (1 - momentum)) / momentum
    var_reference = (reference["running_var"] - (1 - momentum)) / momentum
    assert max_rel_err(var_native, var_reference) <= 1e-4
    for key in ("y", "dx", "dweight", "dbias"):
        assert max_rel_err(native[key], reference[key]) <= 1e-4, key


def test_float16_with_more_than_65504_elements_per_channel(spy):
    x, dy = make_input((2, 2, 260, 260), torch.float64, "contiguous", seed=2)
    x = (x + 4).abs()  # positive: a float16 running sum of this plane would overflow
    for layer in (syncsn.SwitchNorm2d(2), syncsn.SyncBatchNorm(2)):
        native = run(layer, x.half(), dy.half(), native=True, steps=1)
        reference = run(
            copy.deepcopy(layer).double(), x.half().double(), dy.half().double(), False, 1
        )
        for key, value in native.items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), key
                tol = OUTPUT_TOL[torch.float16] if key in ("y", "dx") else 1e-6
                assert max_rel_err(value, reference[key]) <= tol, key
    assert spy.calls


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_planes_split_over_threads_give_the_same_bits(spy, layout):
    """Planes of 12,000 elements: the passes split each sample into blocks of rows, spread
    over threads and combined in a fixed order: the results do not depend on the thread
    count, and match the float64 reference."""
    x, dy = make_input((2, 3, 100, 120), torch.float32, layout, seed=12)
    layer = syncsn.SwitchNorm2d(3)
    randomize_(layer, seed=13)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(layer, x, dy, native=True)
        torch.set_num_threads(2)
        double = run(layer, x, dy, native=True)
    finally:
        torch.set_num_threads(threads)
    reference = run(copy.deepcopy(layer).double(), x.double(), dy.double(), native=False)
    for key, value in single.items():
        assert torch.equal(value, double[key]), key
        if value.is_floating_point():
            assert max_rel_err(value, reference[key]) <= 1e-6, key
    assert spy.calls["sn_stats"] == 4


def test_other_layouts_fall_back_to_pure_torch(spy):
    base, dy = make_input((4, 6, 7, 5), torch.float64, "contiguous", seed=4)
    # Dense, but neither contiguous nor channels-last.
    x, dy = base.transpose(2, 3), dy.transpose(2, 3)
    for layer in (syncsn.SwitchNorm2d(6), syncsn.SyncBatchNorm(6)):
        layer = layer.double()
        out = run(layer, x, dy, native=True)
        reference = run(layer, x.contiguous(), dy.contiguous(), native=False)
        for key, value in out.items():
            if value.is_floating_point():
                assert max_rel_err(value, reference[key]) <= 1e-12, key
    # Only the steps every rank must compute alike (merge, running statistics) used them.
    assert set(spy.calls) <= SHARED_STEPS, spy.calls


def test_gradient_in_another_layout_than_the_input(spy):
    x, dy = make_input((4, 6, 5, 7), torch.float64, "channels_last", seed=6)
    layer = syncsn.SwitchNorm2d(6).double()
    out = run(layer, x, dy.contiguous(), native=True)
    reference = run(layer, x, dy, native=False)
    assert spy.calls["sn_backward_input"] == 2
    for key, value in out.items():
        if value.is_floating_point():
            assert max_rel_err(value, reference[key]) <= 1e-12, key


def test_gradcheck_through_the_kernels(spy):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    for layer in (syncsn.SwitchNorm2d(2).double(), syncsn.SyncBatchNorm(2).double()):
        randomize_(layer, seed=9)
        names = [n for n, _ in layer.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

        def f(x, *ps, layer=layer, names=names):
            return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

        with native_mode(True):
            assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)
    assert spy.calls


def _update_case(kernels, dtype, momentum, count, mean, var, tracked=3):
    runs = []
    for native in (True, False):
        rm = torch.linspace(-1, 1, 5, dtype=dtype)
        rv = torch.linspace(0.5, 2, 5, dtype=dtype)
        nbt = torch.tensor(tracked)
        count_t = torch.tensor(float(count), dtype=torch.float64)
        if native:
            version = rm._version
            kernels.update_running_(rm, rv, nbt, momentum, count_t, mean, var)
            changed = rm._version != version
        else:
            finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
            valid = (count_t > 0) & finite
            F.update_running_stats_(rm, rv, nbt, momentum, mean, var, valid)
            changed = None
        runs.append((rm, rv, nbt, changed))
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_running_matches_pure_torch(kernels, dtype, momentum):
    mean = torch.randn(5, dtype=torch.float64)
    var = torch.rand(5, dtype=torch.float64) + 0.1
    bad = mean.clone()
    bad[2] = float("inf")
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for count, m, expect_change in ((8, mean, True), (0, mean, False), (8, bad, False)):
        (rm, rv, nbt, changed), (rm_ref, rv_ref, nbt_ref, _) = _update_case(
            kernels, dtype, momentum, count, m, var
        )
        assert max_rel_err(rm, rm_ref) <= tol and max_rel_err(rv, rv_ref) <= tol
        assert int(nbt) == int(nbt_ref) == 3 + expect_change
        assert changed == expect_change  # autograd sees the in-place write


def test_non_finite_statistics_leave_running_stats_and_warn_once(spy):
    layer = syncsn.SwitchNorm2d(3)
    x, dy = make_input((2, 3, 4, 4), torch.float32, "contiguous", seed=7)
    x[0, 1, 2, 2] = float("inf")
    before = {n: b.clone() for n, b in layer.named_buffers()}
    with native_mode(True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x)
        layer(x)
    assert spy.calls["update_running_"] == 2
    for name, value in layer.named_buffers():
        assert torch.equal(value, before[name]), name
    assert sum("non-finite" in str(w.message) for w in caught) == 1


def test_switched_off_by_environment(kernels, monkeypatch):
    monkeypatch.setenv("SYNCSN_NATIVE", "0")
    assert _native.kernels() is None
    monkeypatch.setenv("SYNCSN_NATIVE", "1")
    assert _native.kernels() is kernels


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


# ---------------------------------------------------------------------------------------
# Several ranks: the kernels between the collectives.

SIZES = (3, 1, 0, 2)  # samples per rank; rank 2 has none (it takes the pure-torch path)


def _sync_case(rank, kind, dtype, layout, native):
    """Rank r runs its slice through the Sync layer; returns its results and collectives."""
    x_all, dy_all = make_input((sum(SIZES), 5, 4, 6), dtype, layout, seed=21)
    start = sum(SIZES[:rank])
    x, dy = x_all[start : start + SIZES[rank]], dy_all[start : start + SIZES[rank]]
    if kind == "sn":
        layer = syncsn.SyncSwitchNorm2d(5, process_group=subgroup(4))
    else:
        layer = syncsn.SyncBatchNorm(5, process_group=subgroup(4))
    randomize_(layer, seed=22)
    layer = layer.to(torch.float64 if dtype == torch.float64 else torch.float32)
    with native_mode(native):
        spy = Spy(_native.kernels()) if native else None
        original = _native.kernels
        _native.kernels = (lambda: spy) if native else original
        try:
            xg = x.clone().requires_grad_(True)
            holder = {}
            fwd = count_collectives(lambda: holder.setdefault("y", layer(xg)))
            bwd = count_collectives(lambda: holder["y"].backward(dy))
        finally:
            _native.kernels = original
    out = {"y": holder["y"].detach(), "dx": xg.grad}
    out.update({"d" + n: p.grad for n, p in layer.named_parameters()})
    out.update({n: b for n, b in layer.named_buffers()})
    return out, sum(fwd.values()), sum(bwd.values()), dict(spy.calls) if spy else {}


def _local_reference(kind, dtype, layout):
    """The local layer on the concatenated batch, pure torch, float64."""
    x, dy = make_input((sum(SIZES), 5, 4, 6), dtype, layout, seed=21)
    layer = syncsn.SwitchNorm2d(5) if kind == "sn" else torch.nn.BatchNorm2d(5)
    randomize_(layer, seed=22)
    return run(layer.double(), x.double(), dy.double(), native=False, steps=1)


@pytest.mark.parametrize(
    "kind,dtype,layout",
    [
        ("sn", torch.float64, "contiguous"),
        ("bn", torch.float64, "contiguous"),
        ("sn", torch.float32, "channels_last"),
        ("bn", torch.float32, "channels_last"),
    ],
)
def test_sync_layers_on_four_ranks_with_the_kernels(world, kernels, kind, dtype, layout):
    results = world.run(_sync_case, kind, dtype, layout, True)
    reference = _local_reference(kind, dtype, layout)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    starts = [sum(SIZES[:r]) for r in range(4)]
    for rank, (out, fwd, bwd, calls) in enumerate(results):
        assert (fwd, bwd) == (1, 1), f"rank {rank}: {fwd} / {bwd} collectives"
        if SIZES[rank]:
            assert calls.get("sn_stats", 0) + calls.get("bn_stats", 0) == 1, calls
            s = slice(starts[rank], starts[rank] + SIZES[rank])
            for key in ("y", "dx"):
                assert max_rel_err(out[key], reference[key][s]) <= tol, (rank, key)
        else:
            assert set(calls) <= SHARED_STEPS, calls
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert max_rel_err(out[key], reference[key]) <= tol, (rank, key)
            # Bitwise the same on every rank, the one without samples included.
            assert torch.equal(out[key], results[0][0][key]), (rank, key)
    # Parameter gradients: the sum over ranks is the full-batch gradient.
    for key in [k for k in reference if k.startswith("d") and k != "dx"]:
        total = sum(out[key].double() for out, *_ in results)
        assert max_rel_err(total, reference[key]) <= tol, key
    # The pure-torch implementation on the same ranks agrees with the kernels.
    plain = world.run(_sync_case, kind, dtype, layout, False)
    for (out, *_), (ref, *_) in zip(results, plain, strict=True):
        for key, value in out.items():
            if value.is_floating_point() and value.numel():
                assert max_rel_err(value, ref[key]) <= tol * 10, key
