"""Local Switchable Normalization layers against the float64 transcription in reference.py.

Every numerical check compares with an independent computation: the float64 transcription
of the equations (autograd on it gives the reference gradients), torch.autograd.gradcheck,
or the same layer run in float32 / contiguous layout.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from reference import (
    instance_stats,
    original_sn1d_eval,
    original_sn2d_eval,
    sn1d_forward,
    sn_forward,
    update_running,
)
from torch import Tensor

import syncsn

pytestmark = pytest.mark.timeout(120)

PARAM_NAMES = ("weight", "bias", "mean_weight", "var_weight")
# Relative error allowed against the float64 transcription, by the layer's dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# Small shapes, one per dimensionality: (N, C, *S).
SHAPES = {1: (8, 6), 2: (4, 6, 5, 7), 3: (3, 4, 3, 4, 5)}


def layer_class(dim: int) -> type[torch.nn.Module]:
    return getattr(syncsn, f"SwitchNorm{dim}d")


def rel_err(got: Tensor, expected: Tensor) -> float:
    """Norm-based relative error in float64 (absolute when the expectation is zero)."""
    got = got.detach().double()
    expected = expected.detach().double()
    diff = torch.linalg.vector_norm(got - expected).item()
    scale = torch.linalg.vector_norm(expected).item()
    return diff / scale if scale > 0 else diff


def make_input(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> Tensor:
    """Random input whose IN, LN and BN statistics all differ markedly.

    Per-(sample, channel) offsets and scales for (N, C, *S); per-sample and per-feature
    offsets for (N, C), so that every scope sees a different mean and variance and the
    switch-logit gradients do not cancel.
    """
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    if len(shape) == 2:
        offset = 2 * torch.randn(1, c, generator=g, dtype=torch.float64) + torch.randn(
            n, 1, generator=g, dtype=torch.float64
        )
        scale = torch.exp(0.5 * torch.randn(1, c, generator=g, dtype=torch.float64))
    else:
        extra = (1,) * (len(shape) - 2)
        offset = 2 * torch.randn(n, c, *extra, generator=g, dtype=torch.float64)
        scale = torch.exp(0.5 * torch.randn(n, c, *extra, generator=g, dtype=torch.float64))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    return x.to(dtype)


def make_layer(
    dim: int, c: int, dtype: torch.dtype = torch.float64, seed: int = 1, **kwargs
) -> torch.nn.Module:
    """A layer with parameters moved away from their initial values (and, with the BN
    scope, random running statistics) so that every term of the equations matters."""
    layer = layer_class(dim)(c, **kwargs).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64))
            layer.bias.copy_(0.5 * torch.randn(c, generator=g, dtype=torch.float64))
        for name in ("mean_weight", "var_weight"):
            logits = getattr(layer, name)
            logits.copy_(torch.randn(logits.shape, generator=g, dtype=torch.float64))
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
            layer.running_var.copy_(torch.exp(torch.randn(c, generator=g, dtype=torch.float64)))
    return layer


def reference_forward(layer: torch.nn.Module, x: Tensor, params: dict[str, Tensor | None]):
    """The transcription for `layer` on float64 `x`, with `params` in place of its own."""
    fn = sn1d_forward if x.dim() == 2 else sn_forward
    running = {}
    if layer.running_mean is not None:
        running = dict(
            running_mean=layer.running_mean.double(), running_var=layer.running_var.double()
        )
    return fn(
        x,
        params["weight"],
        params["bias"],
        params["mean_weight"],
        params["var_weight"],
        eps=layer.eps,
        training=layer.training,
        using_bn=layer.running_mean is not None,
        **running,
    )


def forward_backward_errors(layer: torch.nn.Module, x: Tensor, seed: int = 2) -> dict[str, float]:
    """Relative errors of output, input gradient and parameter gradients vs the float64
    transcription, for a random upstream gradient. Uses the layer's current mode."""
    names = [n for n in PARAM_NAMES if getattr(layer, n) is not None]
    params = [getattr(layer, n) for n in names]
    # The transcription reads the running statistics as they are before the step.
    x64 = x.detach().double().requires_grad_(True)
    p64 = {n: None for n in PARAM_NAMES}
    p64.update(
        {n: p.detach().double().requires_grad_(True) for n, p in zip(names, params, strict=True)}
    )
    y64, _ = reference_forward(layer, x64, p64)

    xl = x.detach().clone().requires_grad_(True)
    y = layer(xl)
    assert y.shape == x.shape and y.dtype == x.dtype
    g = torch.Generator().manual_seed(seed)
    dy64 = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(y, [xl, *params], dy64.to(y.dtype))
    grads64 = torch.autograd.grad(y64, [x64, *(p64[n] for n in names)], dy64)

    errors = {"output": rel_err(y, y64), "grad_input": rel_err(grads[0], grads64[0])}
    for n, got, expected in zip(names, grads[1:], grads64[1:], strict=True):
        assert got.shape == getattr(layer, n).shape
        errors[f"grad_{n}"] = rel_err(got, expected)
    return errors


# ---------------------------------------------------------------------------------------
# Construction


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("using_bn", [True, False])
def test_parameters_and_buffers(dim: int, using_bn: bool) -> None:
    layer = layer_class(dim)(5, using_bn=using_bn)
    scopes = (2 if dim == 1 else 3) - (0 if using_bn else 1)
    assert layer.weight.shape == (5,) and torch.equal(layer.weight, torch.ones(5))
    assert layer.bias.shape == (5,) and torch.equal(layer.bias, torch.zeros(5))
    for name in ("mean_weight", "var_weight"):
        assert isinstance(getattr(layer, name), torch.nn.Parameter)
        assert torch.equal(getattr(layer, name), torch.ones(scopes))
    if using_bn:
        assert torch.equal(layer.running_mean, torch.zeros(5))
        assert torch.equal(layer.running_var, torch.ones(5))
        assert layer.num_batches_tracked.dtype == torch.long
        assert layer.num_batches_tracked.item() == 0
        assert {"running_mean", "running_var", "num_batches_tracked"} <= set(layer.state_dict())
    else:
        assert layer.running_mean is None and layer.running_var is None
        assert layer.num_batches_tracked is None
        assert not any("running" in k for k in layer.state_dict())
    assert layer.eps == 1e-5 and layer.momentum == 0.1


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_last_gamma_affine_and_factory_kwargs(dim: int) -> None:
    assert torch.equal(layer_class(dim)(4, last_gamma=True).weight, torch.zeros(4))
    plain = layer_class(dim)(4, affine=False)
    assert plain.weight is None and plain.bias is None
    typed = layer_class(dim)(4, dtype=torch.float64)
    assert typed.weight.dtype == torch.float64 and typed.running_var.dtype == torch.float64


# ---------------------------------------------------------------------------------------
# Forward and all gradients against the float64 transcription


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", ["train", "eval", "no_bn"])
def test_forward_and_gradients(dim: int, dtype: torch.dtype, mode: str) -> None:
    shape = SHAPES[dim]
    layer = make_layer(dim, shape[1], dtype, using_bn=mode != "no_bn")
    layer.train(mode != "eval")
    errors = forward_backward_errors(layer, make_input(shape, dtype))
    expected_keys = {"output", "grad_input"} | {f"grad_{n}" for n in PARAM_NAMES}
    assert set(errors) == expected_keys
    bad = {k: v for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"relative errors above {TOL[dtype]:g}: {bad}"


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_and_gradients_without_affine(dim: int, training: bool) -> None:
    shape = SHAPES[dim]
    layer = make_layer(dim, shape[1], affine=False).train(training)
    errors = forward_backward_errors(layer, make_input(shape, torch.float64))
    assert set(errors) == {"output", "grad_input", "grad_mean_weight", "grad_var_weight"}
    assert max(errors.values()) <= TOL[torch.float64], errors


@pytest.mark.parametrize("which", ["params_only", "input_only"])
def test_partial_requires_grad(which: str) -> None:
    """Only some inputs of the layer need gradients: those still come out right."""
    shape = SHAPES[2]
    layer = make_layer(2, shape[1])
    x = make_input(shape, torch.float64)
    x64 = x.clone().requires_grad_(True)
    p64 = {n: getattr(layer, n).detach().clone().requires_grad_(True) for n in PARAM_NAMES}
    y64, _ = reference_forward(layer, x64, p64)
    dy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    if which == "params_only":
        params = [getattr(layer, n) for n in PARAM_NAMES]
        got = torch.autograd.grad(layer(x), params, dy)
        expected = torch.autograd.grad(y64, [p64[n] for n in PARAM_NAMES], dy)
    else:
        layer.requires_grad_(False)
        xl = x.clone().requires_grad_(True)
        got = torch.autograd.grad(layer(xl), [xl], dy)
        expected = torch.autograd.grad(y64, [x64], dy)
    for a, b in zip(got, expected, strict=True):
        assert rel_err(a, b) <= TOL[torch.float64]


# ---------------------------------------------------------------------------------------
# gradcheck


GRADCHECK_SHAPES = {1: (5, 4), 2: (3, 3, 2, 3), 3: (2, 3, 2, 2, 2)}


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("mode", ["train", "eval", "no_bn"])
def test_gradcheck(dim: int, mode: str) -> None:
    shape = GRADCHECK_SHAPES[dim]
    layer = make_layer(dim, shape[1], using_bn=mode != "no_bn").train(mode != "eval")
    names = [n for n, _ in layer.named_parameters()]
    assert sorted(names) == sorted(PARAM_NAMES)

    def fn(x: Tensor, *params: Tensor) -> Tensor:
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (x,))

    x = make_input(shape, torch.float64).requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    assert torch.autograd.gradcheck(fn, (x, *params))


# ---------------------------------------------------------------------------------------
# Running statistics and eval mode


STEP_SHAPES = {
    1: [(6, 5), (4, 5), (9, 5), (3, 5)],
    2: [(4, 5, 5, 6), (3, 5, 4, 4), (5, 5, 6, 3), (2, 5, 3, 5)],
    3: [(3, 5, 2, 3, 4), (2, 5, 3, 3, 2), (4, 5, 2, 2, 3), (2, 5, 4, 2, 2)],
}
MOMENTUM_CONFIGS = {
    "momentum0.1": dict(momentum=0.1),
    "momentum0.3": dict(momentum=0.3),
    "cumulative": dict(momentum=None),
    "no_moving_average": dict(momentum=0.1, using_moving_average=False),
}


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("config", list(MOMENTUM_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_running_statistics_and_eval(dim: int, config: str, dtype: torch.dtype) -> None:
    kwargs = MOMENTUM_CONFIGS[config]
    cumulative = kwargs.get("momentum") is None or not kwargs.get("using_moving_average", True)
    momentum = None if cumulative else kwargs["momentum"]
    c = STEP_SHAPES[dim][0][1]
    layer = layer_class(dim)(c, **kwargs).to(dtype)
    fn = sn1d_forward if dim == 1 else sn_forward
    running_mean = torch.zeros(c, dtype=torch.float64)
    running_var = torch.ones(c, dtype=torch.float64)
    p64 = {n: getattr(layer, n).detach().double() for n in PARAM_NAMES}

    for step, shape in enumerate(STEP_SHAPES[dim], start=1):
        x = make_input(shape, dtype, seed=10 + step)
        # Recalibration runs the layer without autograd; the statistics must not care.
        with torch.set_grad_enabled(step % 2 == 0):
            layer(x)
        _, batch = fn(x.double(), *p64.values(), eps=layer.eps, training=True)
        running_mean = update_running(running_mean, batch.mean, momentum, step)
        running_var = update_running(running_var, batch.var, momentum, step)
        assert layer.num_batches_tracked.item() == step
        assert rel_err(layer.running_mean, running_mean) <= TOL[dtype], step
        assert rel_err(layer.running_var, running_var) <= TOL[dtype], step

    layer.eval()
    x = make_input(STEP_SHAPES[dim][0], dtype, seed=99)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x)
    y64, _ = fn(
        x.double(),
        *p64.values(),
        eps=layer.eps,
        training=False,
        running_mean=running_mean,
        running_var=running_var,
    )
    assert rel_err(y, y64) <= TOL[dtype]
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"eval mode changed {k}"


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_fresh_layer_eval_uses_initial_running_stats(dim: int) -> None:
    """running_mean 0 and running_var 1 at start, as in torch (not the reference's 0/0)."""
    shape = SHAPES[dim]
    layer = layer_class(dim)(shape[1]).double().eval()
    x = make_input(shape, torch.float64)
    p64 = {n: getattr(layer, n).detach() for n in PARAM_NAMES}
    fn = sn1d_forward if dim == 1 else sn_forward
    y64, _ = fn(
        x,
        *p64.values(),
        eps=layer.eps,
        training=False,
        running_mean=torch.zeros(shape[1], dtype=torch.float64),
        running_var=torch.ones(shape[1], dtype=torch.float64),
    )
    assert rel_err(layer(x), y64) <= TOL[torch.float64]


@pytest.mark.parametrize("dim", [2, 3])
def test_without_bn_scope_train_equals_eval(dim: int) -> None:
    """With using_bn=False nothing depends on the batch: train and eval outputs agree, and
    the layer works on a single sample."""
    shape = (1, *SHAPES[dim][1:])
    layer = make_layer(dim, shape[1], using_bn=False)
    x = make_input(shape, torch.float64)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert rel_err(y_train, y_eval) <= 1e-14
    assert layer.running_mean is None and layer.num_batches_tracked is None


# ---------------------------------------------------------------------------------------
# State dicts saved by the original authors' implementation


def original_state_dict(dim: int, c: int, using_bn: bool, dtype: torch.dtype) -> dict:
    """Random state in the original layout: no num_batches_tracked, (1, C, 1, 1) / (1, C)
    affine parameters, (1, C, 1) / (1, C) running statistics."""
    g = torch.Generator().manual_seed(5)
    affine_shape = (1, c, 1, 1) if dim == 2 else (1, c)
    stat_shape = (1, c, 1) if dim == 2 else (1, c)
    scopes = (3 if dim == 2 else 2) - (0 if using_bn else 1)

    def rnd(*shape: int) -> Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64)

    state = {
        "weight": 1 + 0.5 * rnd(*affine_shape),
        "bias": 0.5 * rnd(*affine_shape),
        "mean_weight": rnd(scopes),
        "var_weight": rnd(scopes),
    }
    if using_bn:
        state["running_mean"] = rnd(*stat_shape)
        state["running_var"] = torch.exp(rnd(*stat_shape))
    return {k: v.to(dtype) for k, v in state.items()}


@pytest.mark.parametrize(
    "dim,using_bn", [(2, True), (2, False), (1, True)], ids=["2d", "2d-no_bn", "1d"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_loads_original_state_dict(dim: int, using_bn: bool, dtype: torch.dtype) -> None:
    c = 6
    state = original_state_dict(dim, c, using_bn, dtype)
    layer = layer_class(dim)(c, using_bn=using_bn).to(dtype)
    layer.load_state_dict(state, strict=True)
    layer.eval()

    shape = (4, c, 5, 7) if dim == 2 else (8, c)
    x = make_input(shape, dtype)
    original = original_sn2d_eval if dim == 2 else original_sn1d_eval
    state64 = {k: v.double() for k, v in state.items()}
    expected = original(x.double(), state64, eps=1e-5)
    assert rel_err(layer(x), expected) <= {torch.float64: 1e-12, torch.float32: 1e-6}[dtype]

    # Our own layout after loading: (C,) shapes, and it round-trips strictly.
    own = layer.state_dict()
    assert own["weight"].shape == (c,) and own["bias"].shape == (c,)
    if using_bn:
        assert own["running_mean"].shape == (c,) and own["running_var"].shape == (c,)
        assert "num_batches_tracked" in own
    layer_class(dim)(c, using_bn=using_bn).to(dtype).load_state_dict(own, strict=True)


# ---------------------------------------------------------------------------------------
# Numerical stability: large mean, small spread


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_stability_large_mean(dim: int) -> None:
    shape = {1: (64, 16), 2: (4, 8, 32, 32), 3: (2, 4, 8, 16, 16)}[dim]
    g = torch.Generator().manual_seed(7)
    x32 = (1e4 + torch.randn(shape, generator=g, dtype=torch.float64)).float()
    x64 = x32.double()
    layer = layer_class(dim)(shape[1], momentum=1.0)
    y = layer(x32)
    p64 = {n: getattr(layer, n).detach().double() for n in PARAM_NAMES}
    fn = sn1d_forward if dim == 1 else sn_forward
    y64, batch = fn(x64, *p64.values(), eps=layer.eps, training=True)
    assert torch.isfinite(y).all()
    assert rel_err(y, y64) <= 1e-4
    # momentum 1.0: the running statistics are this batch's BN statistics.
    assert rel_err(layer.running_var, batch.var) <= 1e-4
    assert rel_err(layer.running_mean, batch.mean) <= 1e-6


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_stability_large_mean_gradients(dim: int) -> None:
    """Gradients for the same large-mean float32 input, within 1e-3 of float64.

    Rounding a mean of 1e4 to float32 alone moves results by about 3e-4 relative here
    (torch.nn.BatchNorm2d's own float32 weight gradient is 5.6e-4 off); 1e-3 allows a few
    times that and still catches sums such as S2 - mu * S1 or sum_k w_k mu_k that cancel
    when they are formed from raw (unshifted) moments.
    """
    shape = {1: (64, 16), 2: (4, 8, 32, 32), 3: (2, 4, 8, 16, 16)}[dim]
    g = torch.Generator().manual_seed(7)
    x32 = (1e4 + torch.randn(shape, generator=g, dtype=torch.float64)).float()
    layer = make_layer(dim, shape[1], torch.float32)
    errors = forward_backward_errors(layer, x32)
    grads = {k: v for k, v in errors.items() if k.startswith("grad_")}
    assert len(grads) == 5
    bad = {k: f"{v:.2e}" for k, v in grads.items() if not v <= 1e-3}
    assert not bad, f"relative errors above 1e-3: {bad}"


# ---------------------------------------------------------------------------------------
# Bad input


def _names_number(message: str, number: int) -> bool:
    return re.search(rf"(?<!\d){number}(?!\d)", message) is not None


@pytest.mark.parametrize(
    "dim,shape",
    [(1, (3, 6, 7)), (2, (2, 6, 7)), (2, (2, 6, 7, 7, 7)), (3, (2, 6, 7, 7)), (3, (6,))],
)
def test_wrong_ndim(dim: int, shape: tuple[int, ...]) -> None:
    layer = layer_class(dim)(6)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(shape))
    message = str(info.value)
    assert _names_number(message, 2 if dim == 1 else dim + 2), message
    assert _names_number(message, len(shape)), message


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_wrong_channel_count(dim: int) -> None:
    layer = layer_class(dim)(5)
    shape = {1: (3, 7), 2: (3, 7, 6, 6), 3: (3, 7, 2, 3, 4)}[dim]
    with pytest.raises(ValueError) as info:
        layer(torch.randn(shape))
    message = str(info.value)
    assert _names_number(message, 5) and _names_number(message, 7), message


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_integer_dtype(dim: int, dtype: torch.dtype) -> None:
    layer = layer_class(dim)(4)
    with pytest.raises(TypeError) as info:
        layer(torch.ones(SHAPES[dim][:1] + (4,) + SHAPES[dim][2:], dtype=dtype))
    assert str(dtype).removeprefix("torch.") in str(info.value), str(info.value)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("mode", ["train", "eval", "no_bn"])
def test_spatial_size_zero_is_refused_one_is_not(dim: int, mode: str) -> None:
    """A 1x1 map is normalized (IN variance 0 over one value: tests/test_one_pixel.py); a
    map with no positions has no instance statistics at all."""
    layer = layer_class(dim)(5, using_bn=mode != "no_bn").train(mode != "eval")
    with pytest.raises(ValueError) as info:
        layer(torch.randn(4, 5, *(1,) * (dim - 1), 0))
    message = str(info.value)
    assert "at least 1 spatial element" in message and "0 elements" in message, message
    assert torch.isfinite(layer(torch.randn(4, 5, *(1,) * dim))).all()


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_single_sample_batch_statistics(dim: int) -> None:
    shape = (1, *SHAPES[dim][1:])
    layer = layer_class(dim)(shape[1])
    x = make_input(shape, torch.float32)
    with pytest.raises(ValueError):
        layer.train()(x)
    assert layer.num_batches_tracked.item() == 0
    assert torch.equal(layer.running_var, torch.ones(shape[1]))
    # Eval mode uses the running statistics, so one sample is fine.
    assert torch.isfinite(layer.eval()(x)).all()


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_empty_batch(dim: int) -> None:
    """An empty batch in training gives an empty output and leaves the statistics alone."""
    shape = (0, *SHAPES[dim][1:])
    layer = make_layer(dim, shape[1], torch.float32)
    before = {k: v.clone() for k, v in layer.state_dict().items() if "running" in k}
    x = torch.zeros(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == shape
    y.sum().backward()
    for k, v in before.items():
        assert torch.equal(layer.state_dict()[k], v), k
    for p in layer.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_non_finite_statistics_leave_running_stats() -> None:
    """An overflowed step (inf in the input) must not poison the running statistics."""
    layer = make_layer(2, 4, torch.float32)
    before = (layer.running_mean.clone(), layer.running_var.clone())
    x = torch.randn(3, 4, 5, 5)
    x[1, 2, 3, 3] = float("inf")
    with pytest.warns(Warning):
        layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer(x)
    assert torch.equal(layer.running_mean, before[0])
    assert torch.equal(layer.running_var, before[1])


# ---------------------------------------------------------------------------------------
# Mixed precision and memory layout


# Bound on the norm-relative error of a result rounded to the low precision type.
LOW_PRECISION_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _low_precision_check(layer: torch.nn.Module, x: Tensor, autocast: bool = False) -> None:
    """Run `layer` (float32 parameters) on low precision `x`; compare with float32."""
    ref_layer = copy.deepcopy(layer)
    tol = LOW_PRECISION_TOL[x.dtype]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(x.dtype)

    xl = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=x.dtype, enabled=autocast):
        y = layer(xl)
    assert y.dtype == x.dtype
    y.backward(dy)
    assert xl.grad.dtype == x.dtype
    assert torch.isfinite(y).all() and torch.isfinite(xl.grad).all()

    x32 = x.float().requires_grad_(True)
    y32 = ref_layer(x32)
    y32.backward(dy.float())
    assert rel_err(y, y32) <= tol
    assert rel_err(xl.grad, x32.grad) <= tol
    for n in PARAM_NAMES:
        got, expected = getattr(layer, n).grad, getattr(ref_layer, n).grad
        assert got.dtype == torch.float32
        assert rel_err(got, expected) <= tol, n
    for n in ("running_mean", "running_var"):
        assert getattr(layer, n).dtype == torch.float32
        assert rel_err(getattr(layer, n), getattr(ref_layer, n)) <= 1e-5, n


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_input(dim: int, dtype: torch.dtype) -> None:
    shape = SHAPES[dim]
    _low_precision_check(make_layer(dim, shape[1], torch.float32), make_input(shape, dtype))


def test_bfloat16_under_autocast() -> None:
    shape = SHAPES[2]
    layer = make_layer(2, shape[1], torch.float32)
    _low_precision_check(layer, make_input(shape, torch.bfloat16), autocast=True)


def test_float16_long_rows_do_not_overflow() -> None:
    """65536 positions per instance with mean 3: float16 sums would overflow (max 65504)."""
    shape = (2, 2, 256, 256)
    g = torch.Generator().manual_seed(8)
    x = (3 + torch.randn(shape, generator=g)).half()
    _low_precision_check(make_layer(2, 2, torch.float32), x)


@pytest.mark.parametrize("dim", [2, 3])
def test_channels_last(dim: int) -> None:
    fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
    shape = SHAPES[dim]
    layer = make_layer(dim, shape[1], torch.float32)
    twin = copy.deepcopy(layer)
    x = make_input(shape, torch.float32)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(6))

    x_cl = x.to(memory_format=fmt).requires_grad_(True)
    y_cl = layer(x_cl)
    assert y_cl.is_contiguous(memory_format=fmt)
    y_cl.backward(dy.to(memory_format=fmt))

    x_c = x.clone().requires_grad_(True)
    y_c = twin(x_c)
    y_c.backward(dy)
    assert rel_err(y_cl, y_c) <= 1e-6
    assert rel_err(x_cl.grad, x_c.grad) <= 1e-6
    for n in PARAM_NAMES:
        assert rel_err(getattr(layer, n).grad, getattr(twin, n).grad) <= 1e-6, n
    assert rel_err(layer.running_var, twin.running_var) <= 1e-6


# ---------------------------------------------------------------------------------------
# Memory kept for backward


def test_saved_for_backward_at_most_1_1x_input() -> None:
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    layer = syncsn.SwitchNorm2d(16)
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    saved = sum(storages.values())
    input_bytes = x.numel() * x.element_size()
    assert saved <= 1.1 * input_bytes, f"saved {saved} bytes for a {input_bytes}-byte input"
    # The graph must still be usable.
    y.sum().backward()
    assert x.grad is not None


def test_instance_statistics_helper_is_unbiased() -> None:
    """Guards the transcription itself against torch's own unbiased variance."""
    x = make_input(SHAPES[3], torch.float64)
    mean, var = instance_stats(x)
    flat = x.reshape(*x.shape[:2], -1)
    assert torch.allclose(mean, flat.mean(-1)) and torch.allclose(var, flat.var(-1))


# ---------------------------------------------------------------------------------------
# Constructor arguments: every layer checks every argument

ALL_LAYERS = [
    syncsn.SwitchNorm1d,
    syncsn.SwitchNorm2d,
    syncsn.SyncSwitchNorm3d,
    syncsn.SparseSwitchNorm2d,
    syncsn.SyncSparseSwitchNorm1d,
    syncsn.SyncBatchNorm,
]

BAD_ARGUMENTS = [
    ({"momentum": "a"}, TypeError, r"momentum must be None .* or a number in \[0, 1\], got 'a'"),
    ({"momentum": True}, TypeError, r"momentum .* got True \(bool\)"),
    ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\].* got 1\.5"),
    ({"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\].* got -0\.1"),
    ({"momentum": float("nan")}, ValueError, r"momentum must be in \[0, 1\].* got nan"),
    ({"eps": 0}, ValueError, r"eps must be finite and > 0, got 0"),
    ({"eps": -1e-5}, ValueError, r"eps must be finite and > 0, got -1e-05"),
    ({"eps": float("inf")}, ValueError, r"eps must be finite and > 0, got inf"),
    ({"eps": "1e-5"}, TypeError, r"eps must be a positive number, got '1e-5' \(str\)"),
    ({"num_features": 0}, ValueError, r"num_features must be at least 1, got 0"),
    ({"num_features": 4.0}, TypeError, r"num_features must be an int, got 4\.0 \(float\)"),
    ({"num_features": True}, TypeError, r"num_features must be an int, got True"),
    ({"affine": "False"}, TypeError, r"affine must be True or False, got 'False' \(str\)"),
    ({"track_running_stats": 0}, TypeError, r"track_running_stats must be True or False"),
]


@pytest.mark.parametrize("cls", ALL_LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad, error, message", BAD_ARGUMENTS, ids=lambda v: str(v)[:30])
def test_constructor_checks_arguments(cls, bad: dict, error: type, message: str) -> None:
    kwargs = {"num_features": 4, **bad}
    with pytest.raises(error, match=rf"{cls.__name__}: {message}"):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [c for c in ALL_LAYERS if c is not syncsn.SyncBatchNorm])
@pytest.mark.parametrize(
    "name", ["using_moving_average", "using_bn", "last_gamma", "bias"], ids=str
)
def test_switchable_flags_must_be_bools(cls, name: str) -> None:
    with pytest.raises(TypeError, match=rf"{name} must be True or False, got 'yes'"):
        cls(4, **{name: "yes"})


@pytest.mark.parametrize("cls", [syncsn.SyncSwitchNorm2d, syncsn.SyncBatchNorm])
def test_process_group_must_be_a_group(cls) -> None:
    with pytest.raises(TypeError, match=r"process_group must be None .* got 8 \(int\)"):
        cls(4, process_group=8)
    cls(4, process_group=None)


@pytest.mark.parametrize(
    "cls, shape",
    [
        (syncsn.SwitchNorm1d, (4, 3)),
        (syncsn.SwitchNorm2d, (2, 3, 4, 4)),
        (syncsn.SparseSwitchNorm3d, (2, 3, 2, 2, 2)),
        (syncsn.SyncBatchNorm, (2, 3, 4)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_float8_input_is_a_type_error(cls, shape: tuple, dtype: torch.dtype) -> None:
    x = torch.randn(shape).to(dtype)
    with pytest.raises(TypeError) as info:
        cls(3)(x)
    message = str(info.value)
    assert str(dtype) in message
    for supported in ("float16", "bfloat16", "float32", "float64"):
        assert supported in message, message


# ---------------------------------------------------------------------------------------
# track_running_stats and bias, with torch's meaning


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_track_running_stats_false_has_no_buffers(dim: int) -> None:
    layer = layer_class(dim)(5, track_running_stats=False)
    assert not layer.track_running_stats and layer.using_bn
    assert layer.running_mean is None and layer.running_var is None
    assert layer.num_batches_tracked is None
    assert not any("running" in k or "tracked" in k for k in layer.state_dict())
    assert "track_running_stats=False" in repr(layer)
    layer.reset_parameters()  # nothing to reset, no error
    # Without the BN scope nothing is tracked either.
    assert not layer_class(dim)(5, using_bn=False).track_running_stats
    assert layer_class(dim)(5).track_running_stats


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("cls_name", ["SwitchNorm", "SyncSwitchNorm"])
def test_track_running_stats_false_uses_batch_statistics_in_eval(dim: int, cls_name) -> None:
    """Eval mode computes what training computes (the BN scope from the batch), against the
    float64 transcription in training mode, and nothing is updated."""
    shape = SHAPES[dim]
    layer = getattr(syncsn, f"{cls_name}{dim}d")(shape[1], track_running_stats=False).double()
    reference = make_layer(dim, shape[1])
    layer.load_state_dict(reference.state_dict(), strict=False)
    x = make_input(shape, torch.float64)
    fn = sn1d_forward if dim == 1 else sn_forward
    params = [getattr(layer, n).detach() for n in PARAM_NAMES]
    expected, _ = fn(x, *params, eps=layer.eps, training=True)
    for training in (True, False):
        assert rel_err(layer.train(training)(x), expected) <= 1e-12, training
    assert layer.running_mean is None


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_bias_false(dim: int) -> None:
    shape = SHAPES[dim]
    layer = layer_class(dim)(shape[1], bias=False).double()
    assert layer.bias is None and layer.weight is not None
    assert "bias" not in layer.state_dict() and "bias=False" in repr(layer)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    x = make_input(shape, torch.float64)
    fn = sn1d_forward if dim == 1 else sn_forward
    logits = [layer.mean_weight.detach(), layer.var_weight.detach()]
    expected, _ = fn(x, layer.weight.detach(), None, *logits, eps=layer.eps, training=True)
    assert rel_err(layer(x), expected) <= 1e-12


def test_batchnorm_tools_of_torch_recognise_the_layers() -> None:
    """torch.func.replace_all_batch_norm_modules_ turns _BatchNorm layers into ones without
    running statistics; a switchable layer then computes with batch statistics."""
    layer = make_layer(2, 6)
    x = make_input(SHAPES[2], torch.float64)
    train_output = layer.train()(x)
    torch.func.replace_all_batch_norm_modules_(layer)
    assert not layer.track_running_stats and layer.running_mean is None
    assert rel_err(layer.eval()(x), train_output) <= 1e-12
