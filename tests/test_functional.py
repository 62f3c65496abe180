"""The pure functions of syncsn.functional against direct float64 computations."""

import pytest
import torch

from syncsn import functional as F


def direct_sums(x, centre, dy):
    dims = tuple(range(2, x.dim()))
    xd, dyd = x.double(), dy.double()
    centred = xd - centre.double().view(centre.shape + (1,) * len(dims))
    return dyd.sum(dims), (dyd * centred).sum(dims)


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_centred_sums(shape, layout, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 5).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    centre = x.float().mean(dim=tuple(range(2, len(shape)))).to(F.acc_dtype(dtype))
    s1, s2c = F.centred_sums(x, centre, dy)
    r1, r2 = direct_sums(x, centre, dy)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    assert s1.dtype == s2c.dtype == torch.float64
    torch.testing.assert_close(s1, r1, rtol=tol, atol=tol * r1.abs().max().item())
    torch.testing.assert_close(s2c, r2, rtol=tol, atol=tol * r2.abs().max().item())


def test_centred_sums_of_mixed_layouts():
    x = torch.randn(2, 3, 4, 5)
    dy = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    centre = x.mean((2, 3))
    for s, r in zip(F.centred_sums(x, centre, dy), direct_sums(x, centre, dy), strict=True):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mean", [0.0, 1e4])
def test_instance_moments_exact_for_large_means(mean):
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64) + mean
    x = x64.float()
    centre, m, m2 = F.instance_moments(x)
    xd = x.double()
    ref_mean = xd.mean((2, 3))
    ref_m2 = ((xd - ref_mean[..., None, None]) ** 2).sum((2, 3))
    assert centre.dtype == torch.float32
    assert (m - ref_mean).abs().max() < 1e-6
    torch.testing.assert_close(m2, ref_m2, rtol=1e-5, atol=0)


def test_instance_moments_do_not_overflow_float32_squares():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64) * 1e20
    centre, m, m2 = F.instance_moments(x.float())
    ref_m2 = ((x.float().double() - x.float().double().mean((2, 3), keepdim=True)) ** 2).sum((2, 3))
    assert torch.isfinite(m2).all()
    torch.testing.assert_close(m2, ref_m2, rtol=1e-6, atol=0)


def _split(t, sizes):
    return list(torch.split(t, sizes))


def test_sample_partials_merge_equals_one_batch():
    """Chan's merge of uneven per-rank partials (with an empty rank) equals the whole batch."""
    g = torch.Generator().manual_seed(2)
    mean_in = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3 + 100
    var_in = torch.rand(7, 5, generator=g, dtype=torch.float64)
    sizes = [3, 0, 4]
    parts = torch.stack(
        [
            F.sample_partials(a, b)
            for a, b in zip(_split(mean_in, sizes), _split(var_in, sizes), strict=True)
        ]
    )
    count, mu, m2 = F.merge_partials(parts)
    assert count.item() == 7
    torch.testing.assert_close(mu, mean_in.mean(0))
    ref = var_in.mean(0) + ((mean_in - mean_in.mean(0)) ** 2).mean(0)
    torch.testing.assert_close(m2 / count, ref)


def test_element_partials_merge_equals_one_batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, 5, 3, generator=g, dtype=torch.float64) * 2 + 50
    parts = []
    for piece in _split(x, [1, 0, 5]):
        _, mean, m2 = F.instance_moments(piece)
        parts.append(F.element_partials(mean, m2, 15))
    count, mu, m2 = F.merge_partials(torch.stack(parts))
    assert count.item() == 6 * 15
    torch.testing.assert_close(mu, x.mean((0, 2, 3)))
    torch.testing.assert_close(m2 / (count - 1), x.var((0, 2, 3)))


def test_switch_norm_eval_equals_the_layer():
    import syncsn

    layer = syncsn.SwitchNorm2d(4).train()
    layer(torch.randn(3, 4, 5, 6) * 2 + 1)
    layer.eval()
    x = torch.randn(2, 4, 5, 6)
    w, v = layer.mixing_weights()
    y = F.switch_norm_eval(
        x, w, v, layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.eps
    )
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_large_mean_output_far_better_than_float32_batchnorm(monkeypatch, backend):
    """The README's figure: mean 1e4, std 1, float32 within 1e-6 of float64 (torch's
    BatchNorm2d is off by ~4e-4 on such input)."""
    import syncsn

    monkeypatch.setenv("SYNCSN_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 8, 32, 32, generator=g, dtype=torch.float64) + 1e4).float()
    for layer in (syncsn.SwitchNorm2d(8), syncsn.SyncBatchNorm(8)):
        y = layer(x).double()
        ref = layer.double()(x.double())  # the same layer in float64
        assert ((y - ref).norm() / ref.norm()).item() < 1e-6, type(layer).__name__


@pytest.mark.parametrize("layer", ["sn", "bn"])
def test_second_derivatives_raise(layer):
    import syncsn

    m = syncsn.SwitchNorm2d(3) if layer == "sn" else syncsn.SyncBatchNorm(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()
