"""Switchable Normalization on one spatial element (1x1 maps) and on one feature.

DeepLabV3's image-pooling branch and PSPNet's pool scale 1 normalize a 1x1 map. The IN
scope's statistics over one value are mean = x and variance 0 (the unbiased divisor L - 1
clamped to 1, so value and gradient are defined; eps keeps the mixture finite), and so are
SwitchNorm1d's LN statistics over one feature. Checked against a float64 transcription of
the equations written here with that convention, on every backend, with gradcheck, on two
ranks, and on the ASPP and PSP structures converted from BatchNorm.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import thirdparty
import torch
import torch.nn.functional as TF
from dist_world import subgroup
from torch import Tensor, nn
from torch.func import functional_call

import syncsn
from syncsn import functional as F
from syncsn import kernels

pytestmark = pytest.mark.timeout(300)

# Each backend computes in float64 but Triton (float32 in its interpreter; tiny shapes). The
# cases run on CPU tensors: Triton takes them in its interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1 without CUDA), as in tests/test_conformance.py.
BACKENDS = {"torch": torch.float64, "cpp": torch.float64}
if not torch.cuda.is_available():
    BACKENDS["triton"] = torch.float32
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture(params=list(BACKENDS))
def backend(request, monkeypatch) -> str:
    name = request.param
    chosen = kernels.get(name)
    if not chosen.available():
        if name == "cpp" and (shutil.which("c++") or shutil.which("g++")):
            pytest.fail("a C++ compiler is installed but the C++ kernels did not build")
        if name == "triton":
            pytest.fail(f"Triton's interpreter is unavailable: {chosen.unavailable_reason()}")
        pytest.skip(f"the {name} backend is not available: {chosen.unavailable_reason()}")
    monkeypatch.setenv("SYNCSN_BACKEND", name)
    return name


# --- the transcription ----------------------------------------------------------------------


def one_value_var(values: Tensor, dim: int) -> Tensor:
    """Unbiased variance along ``dim``, 0 over a single value."""
    count = values.shape[dim]
    centred = values - values.mean(dim, keepdim=True)
    return centred.square().sum(dim) / max(count - 1, 1)


def transcribed_sn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mean_w: Tensor,
    var_w: Tensor,
    eps: float,
    running: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """SN over (N, C, *S) from the equations; ``mean_w``, ``var_w`` the (3,) mixing weights
    over (IN, LN, BN); BN from the batch when ``running`` is None. Returns y and the batch's
    BN mean and variance (None in eval)."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    mu_in, var_in = flat.mean(-1), one_value_var(flat, -1)
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = var_in.mean(1, keepdim=True) + (mu_in - mu_ln).square().mean(1, keepdim=True)
    if running is None:
        mu_bn = mu_in.mean(0, keepdim=True)
        var_bn = var_in.mean(0, keepdim=True) + (mu_in - mu_bn).square().mean(0, keepdim=True)
    else:
        mu_bn, var_bn = running[0][None], running[1][None]
    mu = mean_w[0] * mu_in + mean_w[1] * mu_ln + mean_w[2] * mu_bn
    var = var_w[0] * var_in + var_w[1] * var_ln + var_w[2] * var_bn
    view = (n, c) + (1,) * (x.dim() - 2)
    y = (x - mu.view(view)) / (var.view(view) + eps).sqrt()
    y = y * weight.view(1, c, *view[2:]) + bias.view(1, c, *view[2:])
    batch = (mu_bn[0], var_bn[0]) if running is None else (None, None)
    return y, *batch


def transcribed_sn1d(x, weight, bias, mean_w, var_w, eps, running):
    """SwitchNorm1d over (N, C): LN over the C features, BN over the N samples, both
    unbiased, 0 over a single value; ``mean_w``, ``var_w`` the (2,) weights over (LN, BN)."""
    mu_ln, var_ln = x.mean(1, keepdim=True), one_value_var(x, 1)[:, None]
    if running is None:
        mu_bn, var_bn = x.mean(0, keepdim=True), one_value_var(x, 0)[None]
    else:
        mu_bn, var_bn = running[0][None], running[1][None]
    mu = mean_w[0] * mu_ln + mean_w[1] * mu_bn
    var = var_w[0] * var_ln + var_w[1] * var_bn
    return (x - mu) / (var + eps).sqrt() * weight + bias


def randomized(layer: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=g))
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=g) + 0.5)
    return layer


def rel_err(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-300)).item()


def expected_run(layer, x, dy, training: bool, transcription):
    """The transcription's output, gradients and running statistics for one step of
    ``layer`` (unchanged) on ``x``, in float64."""
    p = {k: v.detach().double().requires_grad_() for k, v in layer.named_parameters()}
    xd = x.detach().double().requires_grad_()
    running = None
    if not training:
        running = (layer.running_mean.double(), layer.running_var.double())
    weights = torch.softmax(p["mean_weight"], 0), torch.softmax(p["var_weight"], 0)
    out = transcription(xd, p["weight"], p["bias"], *weights, layer.eps, running)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(dy.double())
    result = {"y": y, "dx": xd.grad, **{"d" + k: v.grad for k, v in p.items()}}
    if training and isinstance(out, tuple):
        m = layer.momentum
        result["running_mean"] = (1 - m) * layer.running_mean.double() + m * out[1]
        result["running_var"] = (1 - m) * layer.running_var.double() + m * out[2]
    return result


def layer_run(layer, x, dy, training: bool):
    layer.train(training)
    xg = x.detach().clone().requires_grad_()
    y = layer(xg)
    y.backward(dy)
    result = {"y": y, "dx": xg.grad, **{"d" + k: v.grad for k, v in layer.named_parameters()}}
    result.update(running_mean=layer.running_mean, running_var=layer.running_var)
    return result


def compare(got: dict, want: dict, dtype: torch.dtype) -> None:
    for key, value in want.items():
        assert torch.isfinite(got[key]).all(), key
        err = rel_err(got[key], value)
        assert err <= TOLERANCE[dtype], f"{key}: relative error {err:.2e}"


# --- the layers on every backend ------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spatial", [(1, 1), (1, 1, 1)], ids=["2d", "3d"])
def test_one_pixel_matches_the_equations(backend, spatial, training) -> None:
    dtype = BACKENDS[backend]
    cls = syncsn.SwitchNorm2d if len(spatial) == 2 else syncsn.SwitchNorm3d
    layer = randomized(cls(5).to(dtype), seed=1)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 5, *spatial, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    want = expected_run(layer, x, dy, training, transcribed_sn)
    compare(layer_run(layer, x, dy, training), want, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_one_feature_matches_the_equations(backend, training) -> None:
    dtype = BACKENDS[backend]
    layer = randomized(syncsn.SwitchNorm1d(1).to(dtype), seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 1, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    want = expected_run(layer, x, dy, training, transcribed_sn1d)
    compare(layer_run(layer, x, dy, training), want, dtype)


@pytest.mark.parametrize("shape, ddof", [((4, 5, 1, 1), 0), ((6, 1), 1)], ids=["1x1", "1d"])
def test_export_graph_on_one_value(shape, ddof) -> None:
    """The eval computation torch.export and ONNX record (plain torch operations)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    c = shape[1]
    weight, bias = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c)
    running = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    w, v = torch.softmax(torch.randn(3, generator=g), 0), torch.softmax(torch.randn(3), 0)
    if ddof:
        w, v = torch.cat([w.new_zeros(1), w[1:] / w[1:].sum()]), torch.tensor([0.0, 0.3, 0.7])
        want = transcribed_sn1d(x, weight, bias.double(), w[1:], v[1:], 1e-5, running)
    else:
        want, *_ = transcribed_sn(x, weight, bias.double(), w, v, 1e-5, running)
    got = F.switch_norm_eval(x, w.double(), v.double(), *running, weight, bias.double(), 1e-5, ddof)
    assert rel_err(got, want) <= 1e-12


def test_sparse_switchnorm_on_one_pixel(backend) -> None:
    """SSN: the same statistics, mixed with its sparsestmax weights."""
    dtype = BACKENDS[backend]
    layer = randomized(syncsn.SparseSwitchNorm2d(5).to(dtype), seed=6)
    syncsn.set_radius(layer, 0.2)
    x = torch.randn(4, 5, 1, 1, generator=torch.Generator().manual_seed(7)).to(dtype)
    for training in (True, False):
        layer.train(training)
        mean_w, var_w = (w.double() for w in layer.mixing_weights())
        running = None if training else (layer.running_mean.double(), layer.running_var.double())
        p = {k: v.detach().double() for k, v in layer.named_parameters()}
        want, *_ = transcribed_sn(x.double(), p["weight"], p["bias"], mean_w, var_w, 1e-5, running)
        got = layer(x)
        assert rel_err(got, want) <= TOLERANCE[dtype], training


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("make, shape", [
    (lambda: syncsn.SwitchNorm2d(3), (4, 3, 1, 1)),
    (lambda: syncsn.SwitchNorm1d(1), (5, 1)),
], ids=["1x1", "1d-one-feature"])  # fmt: skip
def test_gradcheck_on_one_value(make, shape, training) -> None:
    layer = randomized(make().double(), seed=8).train(training)
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def fn(x, *values):
        return functional_call(layer, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *params))


# --- two ranks ------------------------------------------------------------------------------

SIZES = (3, 2)


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(10)
    x = torch.randn(sum(SIZES), 6, 1, 1, generator=g, dtype=torch.float64) * 2 + 1
    return x, torch.randn(x.shape, generator=g, dtype=torch.float64)


def _sync_one_pixel(rank: int):
    if rank >= len(SIZES):
        return None
    x_all, dy_all = _batch()
    start = sum(SIZES[:rank])
    x, dy = x_all[start : start + SIZES[rank]], dy_all[start : start + SIZES[rank]]
    layer = randomized(syncsn.SyncSwitchNorm2d(6, process_group=subgroup(2)).double(), 11)
    out = layer_run(layer, x, dy, training=True)
    return {k: v.detach() for k, v in out.items()}


def test_sync_on_two_ranks_equals_local_on_the_whole_batch(world) -> None:
    results = world.run(_sync_one_pixel)
    x, dy = _batch()
    local = randomized(syncsn.SwitchNorm2d(6).double(), 11)
    want = layer_run(local, x, dy, training=True)
    for rank, size in enumerate(SIZES):
        part = slice(sum(SIZES[:rank]), sum(SIZES[:rank]) + size)
        for key in ("y", "dx"):
            assert rel_err(results[rank][key], want[key][part]) <= 1e-12, (rank, key)
        for key in ("running_mean", "running_var"):
            assert torch.equal(results[rank][key], results[0][key]), (rank, key)
            assert rel_err(results[rank][key], want[key]) <= 1e-12, (rank, key)
    for key in [k for k in want if k.startswith("d") and k != "dx"]:
        total = results[0][key] + results[1][key]
        assert rel_err(total, want[key]) <= 1e-12, key


# --- the architectures ----------------------------------------------------------------------


class ASPPPooling(nn.Sequential):
    """torchvision's DeepLabV3 image-pooling branch (torchvision.models.segmentation)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return TF.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """torchvision's ASPP: a 1x1 branch, dilated 3x3 branches, the pooling branch, a
    projection."""

    def __init__(self, cin: int, rates: tuple[int, ...], cout: int = 8) -> None:
        super().__init__()

        def cbr(conv: nn.Module) -> nn.Sequential:
            return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())

        self.convs = nn.ModuleList(
            [cbr(nn.Conv2d(cin, cout, 1, bias=False))]
            + [cbr(nn.Conv2d(cin, cout, 3, padding=r, dilation=r, bias=False)) for r in rates]
            + [ASPPPooling(cin, cout)]
        )
        self.project = cbr(nn.Conv2d(cout * (len(rates) + 2), cout, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class PSPHead(nn.Module):
    """mmseg's PSPHead: pooling pyramid (scales 1, 2, 3, 6: pool, 1x1 conv, norm, ReLU,
    upsample), concatenated with the input, then a 3x3 bottleneck."""

    def __init__(self, cin: int, channels: int = 8, scales=(1, 2, 3, 6)) -> None:
        super().__init__()
        self.ppm = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(s),
                nn.Conv2d(cin, channels, 1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            )
            for s in scales
        )
        self.bottleneck = nn.Sequential(
            nn.Conv2d(cin + len(scales) * channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        pyramid = [
            TF.interpolate(m(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
            for m in self.ppm
        ]
        return self.bottleneck(torch.cat([x, *pyramid], dim=1))


HEADS = {
    "aspp": (lambda: ASPP(6, rates=(1, 2)), "convs.3.2"),
    "psp": (lambda: PSPHead(6), "ppm.0.2"),
}
CONVERTERS = {
    "sn": syncsn.convert_switchnorm,
    "syncsn": syncsn.convert_sync_switchnorm,
    "ssn": lambda m: syncsn.convert_switchnorm(m, sparse=True),
}


def check_trains_and_evaluates(model: nn.Module, layer: nn.Module, x: Tensor, run, steps=2) -> None:
    """SGD steps of ``model`` on ``x`` (``run(model, x)`` gives the loss): finite loss
    and gradients; then, in eval and in training mode, ``layer`` (a switchable layer that
    sees a 1x1 map) computes the equations on its input."""
    assert isinstance(layer, syncsn.switchnorm._SwitchNorm), type(layer)
    seen: list[tuple[Tensor, Tensor]] = []
    # (clones: an in-place activation may overwrite the output afterwards)
    layer.register_forward_hook(
        lambda m, args, y: seen.append((args[0].detach().clone(), y.detach().clone()))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = run(model, x)
        loss.backward()
        assert torch.isfinite(loss)
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
        assert layer.weight.grad is not None and layer.mean_weight.grad is not None
        optimizer.step()
    for training in (False, True):
        model.train(training)
        running = None if training else (layer.running_mean.clone(), layer.running_var.clone())
        with torch.no_grad():
            assert torch.isfinite(run(model, x if training else x[:1]))
        inp, out = seen[-1]
        assert inp.shape[-2:] == (1, 1)
        mean_w, var_w = (w.to(inp.dtype) for w in layer.mixing_weights())
        weight, bias = layer.weight.detach().to(inp.dtype), layer.bias.detach().to(inp.dtype)
        if running is not None:
            running = tuple(t.to(inp.dtype) for t in running)
        want, *_ = transcribed_sn(inp, weight, bias, mean_w, var_w, layer.eps, running)
        tol = 1e-10 if inp.dtype == torch.float64 else 1e-4
        assert rel_err(out, want) <= tol, "train" if training else "eval"


def squared_mean(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).square().mean()


@pytest.mark.parametrize("convert", list(CONVERTERS))
@pytest.mark.parametrize("head", list(HEADS))
def test_heads_with_a_one_pixel_branch_train_and_evaluate(head, convert) -> None:
    make, one_pixel = HEADS[head]
    torch.manual_seed(12)
    model = CONVERTERS[convert](make().double())
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    check_trains_and_evaluates(model, model.get_submodule(one_pixel), x, squared_mean)


# --- the real model code (tests/thirdparty.py loads it without compiled operators) -----------


def test_torchvision_deeplabv3_resnet50() -> None:
    torchvision = thirdparty.import_module("torchvision")
    torch.manual_seed(13)
    model = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=3
    )
    model = syncsn.convert_sync_switchnorm(model)
    pooling = model.classifier[0].convs[4]
    assert isinstance(pooling[0], nn.AdaptiveAvgPool2d)
    x = torch.randn(2, 3, 32, 32)
    run = lambda m, x: m(x)["out"].square().mean()  # noqa: E731
    check_trains_and_evaluates(model, pooling[2], x, run, steps=1)


@pytest.mark.parametrize("norm", ["SyncSN", "SyncSSN", "SN"])
@pytest.mark.parametrize("head", ["ASPPHead", "PSPHead"])
def test_mmseg_heads_built_with_switchable_norms(head, norm) -> None:
    heads = thirdparty.import_module("mmseg.models.decode_heads")
    import syncsn.integrations  # noqa: F401  (the names in mmengine's registry)

    torch.manual_seed(14)
    extra = {"dilations": (1, 2)} if head == "ASPPHead" else {"pool_scales": (1, 2, 3, 6)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # mmseg's own deprecation notices
        model = getattr(heads, head)(
            in_channels=6, channels=8, num_classes=3, norm_cfg={"type": norm}, **extra
        ).double()
    one_pixel = "image_pool.1.bn" if head == "ASPPHead" else "psp_modules.0.1.bn"
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    run = lambda m, x: m([x]).square().mean()  # noqa: E731
    check_trains_and_evaluates(model, model.get_submodule(one_pixel), x, run)
