"""Running statistics: half-precision buffers, extreme ranges, agreement across backends.

The merge and the running update are one implementation for every rank of a device type
(:func:`syncsn.kernels.shared_backend`), computed in float64 and cast to the buffers' dtype
once, so half-precision buffers hold what torch's BatchNorm holds and statistics that do not
fit the buffers are not folded, with one warning, whatever backend runs the passes.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from dist_world import subgroup

import syncsn

BACKENDS = ["torch", "cpp"]

LAYERS = {
    "SyncBatchNorm": syncsn.SyncBatchNorm,
    "SwitchNorm2d": syncsn.SwitchNorm2d,
    "SparseSwitchNorm2d": syncsn.SparseSwitchNorm2d,
}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SYNCSN_BACKEND", request.param)
    return request.param


def _input(shape, scale: float, seed: int = 0, dtype=torch.float32, shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_buffers_hold_what_torch_holds(backend, dtype):
    # Variance 1.6e5 is beyond float16's range (65504) but the folded value is not.
    x = _input((8, 3, 16, 16), 400.0, dtype=dtype)
    torch_bn = torch.nn.BatchNorm2d(3).to(dtype)
    torch_bn(x)
    ours = syncsn.SyncBatchNorm(3).to(dtype)
    ours(x)
    torch.testing.assert_close(ours.running_var, torch_bn.running_var, rtol=1e-2, atol=0)
    torch.testing.assert_close(ours.running_mean, torch_bn.running_mean, rtol=1e-2, atol=1e-1)
    # Switchable Normalization folds its BN scope the same way: compare with float32 buffers.
    sn, sn32 = syncsn.SwitchNorm2d(3).to(dtype), syncsn.SwitchNorm2d(3)
    sn(x)
    sn32(x.float())
    torch.testing.assert_close(sn.running_var, sn32.running_var.to(dtype), rtol=1e-2, atol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_statistics_beyond_the_buffers_dtype_are_not_folded(backend, name):
    layer = LAYERS[name](3)
    before = [b.clone() for b in layer.buffers()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(_input((4, 3, 8, 8), 1e30))
        layer(_input((4, 3, 8, 8), 1e30, seed=1))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "would overflow their dtype" in messages[0]
    assert torch.isfinite(y).all()
    for b, b0 in zip(layer.buffers(), before, strict=True):
        torch.testing.assert_close(b, b0, rtol=0, atol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_float32_input_of_huge_spread(backend, name):
    """Squares of float32 values above 1.8e19 overflow float32: sums are taken in float64."""
    x64 = _input((4, 3, 8, 8), 5e18, dtype=torch.float64, shift=3e18)
    layer = LAYERS[name](3)
    reference = LAYERS[name](3).double()
    reference.load_state_dict(layer.state_dict())
    y = layer(x64.float())
    y64 = reference(x64)
    assert torch.isfinite(y).all()
    assert ((y.double() - y64).norm() / y64.norm()).item() < 1e-6


def test_non_finite_warning_names_the_cause(backend):
    layer = syncsn.SwitchNorm2d(3)
    x = _input((2, 3, 4, 4), 1.0)
    x[0, 1, 0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        layer(x)
    assert int(layer.num_batches_tracked) == 0


# --- ranks on different backends ----------------------------------------------------------


def _steps_on_mixed_backends(rank, name):
    os.environ["SYNCSN_BACKEND"] = BACKENDS[rank % 2]
    try:
        torch.manual_seed(0)
        group = subgroup(2)
        if rank >= 2:
            return None
        sync_layer = syncsn.SyncBatchNorm if name == "SyncBatchNorm" else syncsn.SyncSwitchNorm2d
        layer = sync_layer(8, process_group=group)
        for step in range(5):
            x = _input((3 + rank, 8, 6, 5), 3.0, seed=10 * step + rank, shift=1.5)
            layer(x).square().sum().backward()
        return [b.clone() for b in layer.buffers()]
    finally:
        del os.environ["SYNCSN_BACKEND"]


@pytest.mark.parametrize("name", ["SyncBatchNorm", "SyncSwitchNorm2d"])
def test_ranks_on_different_backends_stay_identical(world, name):
    """One rank on the C++ kernels, one on the reference: the same bits after 5 steps."""
    results = world.run(_steps_on_mixed_backends, name)
    for a, b in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
