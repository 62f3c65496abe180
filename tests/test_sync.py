"""Synchronized layers on 1 to 4 gloo ranks against the local layer on the concatenated batch,
torch's BatchNorm on the union, and a float64 transcription of the SN equations.

Each case runs on every rank of one 4-rank world; ranks beyond the case's world size idle.
"""

from __future__ import annotations

import pytest
import torch
from dist_world import count_collectives, subgroup

import syncsn

pytestmark = pytest.mark.timeout(300)

SN_SYNC = {1: syncsn.SyncSwitchNorm1d, 2: syncsn.SyncSwitchNorm2d, 3: syncsn.SyncSwitchNorm3d}
SN_LOCAL = {1: syncsn.SwitchNorm1d, 2: syncsn.SwitchNorm2d, 3: syncsn.SwitchNorm3d}
BN_TORCH = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def randomize_(layer: torch.nn.Module, seed: int) -> None:
    """Non-trivial parameters, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "weight":
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def make_batch(sizes, spatial, channels, dtype, seed, mean=0.0):
    """Per-rank inputs and upstream gradients: sizes[r] samples of shape (C, *spatial[r])."""
    g = torch.Generator().manual_seed(seed)
    xs, gs = [], []
    for n, s in zip(sizes, spatial, strict=True):
        shape = (n, channels, *s)
        # A per-sample, per-channel offset makes the IN, LN and BN scopes all differ.
        offset = torch.randn(n, channels, *([1] * len(s)), generator=g, dtype=torch.float64)
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset + mean
        xs.append(x.to(dtype))
        gs.append(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
    return xs, gs


def layer_results(layer, x, g):
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * g).sum().backward()
    out = {"y": y.detach(), "dx": x.grad}
    for name, p in layer.named_parameters():
        out["d" + name] = p.grad.clone()
    for name, b in layer.named_buffers():
        out[name] = b.clone()
    return out


def _run_layer(rank, k, factory, xs, gs, seed, steps=1):
    """Rank r of the first k: build the layer, run ``steps`` training steps on its slice."""
    if rank >= k:
        return None
    layer = factory(subgroup(k)).to(xs[0].dtype)
    randomize_(layer, seed)
    out = None
    for _ in range(steps):
        layer.zero_grad()
        out = layer_results(layer, xs[rank], gs[rank])
    return out


def _sync_sn(group, dim, **kw):
    return SN_SYNC[dim](3, process_group=group, **kw)


def _sync_bn(group):
    return syncsn.SyncBatchNorm(3, process_group=group)


def compare_to_concatenated(results, local_layer, xs, gs, dtype, steps=1):
    """The contract: outputs and input gradients are the concatenated-batch ones, sliced;
    parameter gradients sum to the full-batch gradient; running stats equal on all ranks."""
    tol = TOL[dtype]
    for _ in range(steps):
        local_layer.zero_grad()
        ref = layer_results(local_layer, torch.cat(xs), torch.cat(gs))
    worst = 0.0
    offsets = [0]
    for x in xs:
        offsets.append(offsets[-1] + x.shape[0])
    for r, res in enumerate(results):
        lo, hi = offsets[r], offsets[r + 1]
        if hi > lo:
            for key in ("y", "dx"):
                err = rel_err(res[key], ref[key][lo:hi])
                assert err <= tol, (key, r, err)
                worst = max(worst, err)
        else:
            assert res["y"].shape[0] == 0 and torch.isfinite(res["y"]).all()
    for key in ref:
        if key.startswith("d") and key != "dx":
            total = sum(res[key] for res in results)
            err = rel_err(total, ref[key])
            assert err <= tol, (key, err)
            worst = max(worst, err)
        elif key not in ("y", "dx"):
            for res in results:
                assert torch.equal(res[key], results[0][key]), key  # identical on every rank
            if key != "num_batches_tracked":
                err = rel_err(results[0][key], ref[key])
                assert err <= tol, (key, err)
            else:
                assert torch.equal(results[0][key], ref[key])
    return worst


SPLITS = {2: [3, 2], 3: [2, 0, 3], 4: [1, 3, 0, 2]}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_sync_switchnorm_equals_local_on_concatenated_batch(world, dim, k, dtype):
    sizes = SPLITS[k]
    spatial = {1: (), 2: (4, 5), 3: (2, 3, 4)}[dim]
    xs, gs = make_batch(sizes, [spatial] * k, 3, dtype, seed=10 * dim + k)
    factory = _SyncSN(dim)
    results = world.run(_run_layer, k, factory, xs, gs, 7, 2)[:k]
    local = SN_LOCAL[dim](3).to(dtype)
    randomize_(local, 7)
    compare_to_concatenated(results, local, xs, gs, dtype, steps=2)


class _SyncSN:
    """Picklable layer factory."""

    def __init__(self, dim, **kw):
        self.dim, self.kw = dim, kw

    def __call__(self, group):
        return _sync_sn(group, self.dim, **self.kw)


class _SyncBN:
    def __call__(self, group):
        return _sync_bn(group)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("spatial", [(), (5,), (4, 5), (2, 3, 4)])
def test_sync_batchnorm_equals_torch_batchnorm_on_union(world, spatial, k, dtype):
    xs, gs = make_batch(SPLITS[k], [spatial] * k, 3, dtype, seed=len(spatial) + k)
    results = world.run(_run_layer, k, _SyncBN(), xs, gs, 3, 2)[:k]
    torch_bn = BN_TORCH[max(len(spatial), 1)](3).to(dtype)
    randomize_(torch_bn, 3)
    compare_to_concatenated(results, torch_bn, xs, gs, dtype, steps=2)


# -- different spatial sizes per rank: against a float64 transcription of the SN equations ---


def reference_switchnorm(samples, weight, bias, mean_logits, var_logits, eps):
    """SN over a list of (C, *S) samples of possibly different sizes; plain autograd ops."""
    a = torch.stack([s.reshape(s.shape[0], -1).mean(1) for s in samples])
    b = torch.stack([s.reshape(s.shape[0], -1).var(1, unbiased=True) for s in samples])
    mu_ln, var_ln = a.mean(1, keepdim=True), b.mean(1, keepdim=True)
    var_ln = var_ln + ((a - mu_ln) ** 2).mean(1, keepdim=True)
    mu_bn = a.mean(0, keepdim=True)
    var_bn = b.mean(0, keepdim=True) + ((a - mu_bn) ** 2).mean(0, keepdim=True)
    w, v = torch.softmax(mean_logits, 0), torch.softmax(var_logits, 0)
    mu = w[0] * a + w[1] * mu_ln + w[2] * mu_bn
    var = v[0] * b + v[1] * var_ln + v[2] * var_bn
    outs = []
    for n, s in enumerate(samples):
        shape = (-1,) + (1,) * (s.dim() - 1)
        y = (s - mu[n].view(shape)) / (var[n].view(shape) + eps).sqrt()
        outs.append(y * weight.view(shape) + bias.view(shape))
    return outs, mu_bn.squeeze(0), var_bn.squeeze(0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sync_switchnorm_with_different_spatial_sizes_per_rank(world, dtype):
    spatial = [(4, 6), (3, 3), (5, 2), (2, 7)]
    sizes = [2, 1, 0, 3]
    xs, gs = make_batch(sizes, spatial, 3, dtype, seed=5)
    results = world.run(_run_layer, 4, _SyncSN(2), xs, gs, 11)

    ref_layer = SN_LOCAL[2](3).double()
    randomize_(ref_layer, 11)
    params = [ref_layer.weight, ref_layer.bias, ref_layer.mean_weight, ref_layer.var_weight]
    samples = [s.double().requires_grad_() for x in xs for s in x]
    outs, mu_bn, var_bn = reference_switchnorm(samples, *params, ref_layer.eps)
    grads_up = [g.double() for gr in gs for g in gr]
    loss = sum((o * g).sum() for o, g in zip(outs, grads_up, strict=True))
    dparams = torch.autograd.grad(loss, params + samples)
    tol = TOL[dtype]
    i = 0
    for r, res in enumerate(results):
        for j in range(sizes[r]):
            assert rel_err(res["y"][j], outs[i]) <= tol
            assert rel_err(res["dx"][j], dparams[4 + i]) <= tol
            i += 1
    for name, ref in zip(
        ["dweight", "dbias", "dmean_weight", "dvar_weight"], dparams[:4], strict=True
    ):
        assert rel_err(sum(res[name] for res in results), ref) <= tol, name
    momentum = 0.1
    assert rel_err(results[0]["running_mean"], momentum * mu_bn.detach()) <= tol
    assert rel_err(results[0]["running_var"], 1 - momentum + momentum * var_bn.detach()) <= tol


# -- exactly one collective each way ---------------------------------------------------------


def _count_case(rank, k, kind, training):
    if rank >= k:
        return None
    group = subgroup(k)
    layer = {
        "sn1d": lambda: syncsn.SyncSwitchNorm1d(4, process_group=group),
        "sn2d": lambda: syncsn.SyncSwitchNorm2d(4, process_group=group),
        "sn3d": lambda: syncsn.SyncSwitchNorm3d(4, process_group=group),
        "bn": lambda: syncsn.SyncBatchNorm(4, process_group=group),
    }[kind]()
    layer.train(training)
    shape = {"sn1d": (3, 4), "sn3d": (2, 4, 2, 3, 3)}.get(kind, (2, 4, 5, 5))
    x = torch.randn(shape, requires_grad=True)
    holder = {}

    def forward():
        holder["y"] = layer(x)

    fwd = count_collectives(forward)
    bwd = count_collectives(lambda: holder["y"].sum().backward())
    return dict(fwd), dict(bwd)


@pytest.mark.parametrize("kind", ["sn1d", "sn2d", "sn3d", "bn"])
def test_one_collective_each_way_in_training(world, kind):
    for fwd, bwd in world.run(_count_case, 2, kind, True)[:2]:
        assert fwd == {"gloo:all_gather": 1}, fwd
        assert bwd == {"gloo:all_reduce": 1}, bwd


@pytest.mark.parametrize("kind", ["sn2d", "bn"])
def test_no_collective_in_eval_or_in_a_group_of_one(world, kind):
    for fwd, bwd in world.run(_count_case, 2, kind, False)[:2]:
        assert fwd == {} and bwd == {}, (fwd, bwd)
    fwd, bwd = world.run(_count_case, 1, kind, True)[0]
    assert fwd == {} and bwd == {}, (fwd, bwd)


def test_no_collective_without_a_process_group():
    # This process never initializes torch.distributed: any collective would raise here.
    assert not torch.distributed.is_initialized()
    x = torch.randn(2, 4, 3, 3)
    results = []
    for layer in (syncsn.SyncSwitchNorm2d(4), syncsn.SwitchNorm2d(4)):
        xr = x.clone().requires_grad_()
        y = layer(xr)
        y.square().sum().backward()
        results.append((y.detach(), xr.grad, layer.mean_weight.grad, layer.running_var))
    for sync_value, local_value in zip(*results, strict=True):
        assert torch.equal(sync_value, local_value)


# -- numerics --------------------------------------------------------------------------------


def _large_mean_case(rank, k, xs):
    if rank >= k:
        return None
    layer = syncsn.SyncSwitchNorm2d(3, process_group=subgroup(k), momentum=1.0)
    with torch.no_grad():
        y = layer(xs[rank])
    return y, layer.running_var.clone()


def test_sync_stability_with_large_mean(world):
    xs, _ = make_batch([2, 3], [(8, 8)] * 2, 3, torch.float32, seed=1, mean=1e4)
    results = world.run(_large_mean_case, 2, xs)[:2]
    ref_layer = SN_LOCAL[2](3).double()
    samples = [s.double() for x in xs for s in x]
    with torch.no_grad():
        outs, _, var_bn = reference_switchnorm(
            samples,
            ref_layer.weight,
            ref_layer.bias,
            ref_layer.mean_weight,
            ref_layer.var_weight,
            ref_layer.eps,
        )
    y = torch.cat([r[0] for r in results])
    assert rel_err(y, torch.stack(outs)) <= 1e-4
    assert rel_err(results[0][1], var_bn) <= 1e-4


def _half_case(rank, k):
    if rank >= k:
        return None
    # 2 x 300 x 300 = 180000 > 65504 elements per channel on this rank.
    x = (torch.randn(2, 2, 300, 300) * 3 + 200).half().requires_grad_()
    layer = syncsn.SyncSwitchNorm2d(2, process_group=subgroup(k))
    y = layer(x)
    y.float().square().sum().backward()
    bn = syncsn.SyncBatchNorm(2, process_group=subgroup(k))
    z = bn(x.detach())
    return (
        y.dtype,
        bool(torch.isfinite(y).all()),
        bool(torch.isfinite(x.grad).all()),
        bool(torch.isfinite(layer.running_var).all()),
        z.dtype,
        bool(torch.isfinite(z).all()),
        bool(torch.isfinite(bn.running_var).all()),
        float(y.float().std()),
    )


def test_sync_float16_with_more_than_65504_elements_per_channel(world):
    for dtype, *finite, std in world.run(_half_case, 2)[:2]:
        assert dtype == torch.float16
        assert all(finite), finite
        assert 0.5 < std < 1.5
