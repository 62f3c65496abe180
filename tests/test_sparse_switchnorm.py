"""Sparse Switchable Normalization: layers against a float64 transcription with sparsestmax
weights, freezing, the radius schedule, and the Sync layers on gloo ranks (equivalence with
the local layer on the concatenated batch, collective counts before and after freezing, a
short DistributedDataParallel training run in which every layer ends one-hot).

The weights of the transcription come from ``sparsestmax`` in float64, which
test_sparsemax.py checks against brute-force projections; here the transcription checks
how the layer mixes the scopes with them, and autograd through it gives the reference
gradients of the switch logits.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from dist_world import count_collectives, subgroup
from test_faults import LateRead
from test_sync import compare_to_concatenated, make_batch, randomize_
from torch import Tensor, nn

import syncsn.sparse_switchnorm as ssn_module
from syncsn import kernels
from syncsn.optim import param_groups
from syncsn.sparse_switchnorm import (
    RadiusSchedule,
    SparseSwitchNorm1d,
    SparseSwitchNorm2d,
    SparseSwitchNorm3d,
    SyncSparseSwitchNorm1d,
    SyncSparseSwitchNorm2d,
    SyncSparseSwitchNorm3d,
    set_radius,
)
from syncsn.sparsemax import is_one_hot, sparsestmax
from syncsn.switchnorm import SwitchNorm1d, SwitchNorm2d

pytestmark = pytest.mark.timeout(300)

LOCAL = {1: SparseSwitchNorm1d, 2: SparseSwitchNorm2d, 3: SparseSwitchNorm3d}
SYNC = {1: SyncSparseSwitchNorm1d, 2: SyncSparseSwitchNorm2d, 3: SyncSparseSwitchNorm3d}
SHAPES = {1: (7, 5), 2: (4, 5, 4, 6), 3: (3, 4, 2, 3, 4)}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
SCOPES = {1: ("ln", "bn"), 2: ("in", "ln", "bn"), 3: ("in", "ln", "bn")}
# Logits whose sparsestmax weights are neither one-hot nor degenerate for radii below the
# vertex distance (sqrt(2/3) with three scopes, sqrt(1/2) with two). With two scopes the
# sparsemax point is at distance 0.39 / 0.35 from the centre: radius 0.3 leaves it, 0.55
# pushes it (where the logits' gradient vanishes: the pushed point is fixed on the edge).
SPARSE_LOGITS = {3: ([0.2, -0.1, 0.3], [0.0, 0.25, 0.1]), 2: ([0.45, -0.1], [0.0, 0.5])}


def rel_err(got: Tensor, expected: Tensor) -> float:
    got, expected = got.detach().double(), expected.detach().double()
    scale = expected.norm().item()
    diff = (got - expected).norm().item()
    return diff / scale if scale > 0 else diff


def favouring(scope: int, k: int) -> list[float]:
    """Logits whose sparsemax is not one-hot but whose sparsestmax at radius 1 selects
    ``scope`` (the push goes away from the centre, towards the largest weight)."""
    logits = [0.0, 0.1, 0.05][:k]
    logits[scope] = 0.4
    return logits


def set_logits_(layer: nn.Module, mean: list[float], var: list[float]) -> None:
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor(mean))
        layer.var_weight.copy_(torch.tensor(var))


# -- the float64 transcription ------------------------------------------------------------


def reference_ssn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    w: Tensor,
    v: Tensor,
    *,
    eps: float,
    training: bool,
    running_mean: Tensor,
    running_var: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """SN with given mixing weights w, v (K,) for the means and variances.

    (N, C, *S): scopes IN, LN, BN from the instance means a and unbiased variances b.
    (N, C): scopes LN (over C, divides by C - 1) and BN (over N, divides by N - 1).
    The BN scope is the batch in training and the running statistics in eval; it is used
    only when w has all K entries. Returns y and the batch mean and variance (C,).
    """
    n, c = x.shape[:2]
    if x.dim() == 2:
        mu_ln = x.mean(1, keepdim=True)
        means, variances = [mu_ln], [((x - mu_ln) ** 2).sum(1, keepdim=True) / (c - 1)]
        mu_bn = x.mean(0, keepdim=True)
        var_bn = ((x - mu_bn) ** 2).sum(0, keepdim=True) / (n - 1)
    else:
        flat = x.reshape(n, c, -1)
        length = flat.shape[-1]
        a = flat.mean(-1)
        b = ((flat - a[..., None]) ** 2).sum(-1) / (length - 1)
        mu_ln = a.mean(1, keepdim=True)
        var_ln = b.mean(1, keepdim=True) + ((a - mu_ln) ** 2).mean(1, keepdim=True)
        means, variances = [a, mu_ln], [b, var_ln]
        mu_bn = a.mean(0, keepdim=True)
        var_bn = b.mean(0, keepdim=True) + ((a - mu_bn) ** 2).mean(0, keepdim=True)
    if training:
        means.append(mu_bn)
        variances.append(var_bn)
    else:
        means.append(running_mean[None, :])
        variances.append(running_var[None, :])
    mu = sum(w[k] * means[k] for k in range(len(means)))
    var = sum(v[k] * variances[k] for k in range(len(variances)))
    view = (n, c) + (1,) * (x.dim() - 2)
    channel = (1, c) + (1,) * (x.dim() - 2)
    y = (x - mu.reshape(view)) / (var.reshape(view) + eps).sqrt()
    y = y * weight.reshape(channel) + bias.reshape(channel)
    return y, mu_bn.reshape(c), var_bn.reshape(c)


def make_layer(dim: int, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    layer = LOCAL[dim](SHAPES[dim][1]).to(dtype)
    g = torch.Generator().manual_seed(seed)
    c = layer.num_features
    with torch.no_grad():
        layer.weight.copy_(1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64))
        layer.bias.copy_(0.5 * torch.randn(c, generator=g, dtype=torch.float64))
        layer.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        layer.running_var.copy_(torch.exp(torch.randn(c, generator=g, dtype=torch.float64)))
    return layer


def make_input(dim: int, dtype: torch.dtype, seed: int = 1) -> Tensor:
    """Input whose IN, LN and BN statistics all differ (per-(n, c) offsets and scales)."""
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[dim]
    extra = (1,) * (len(shape) - 2)
    offset = 2 * torch.randn(shape[0], shape[1], *extra, generator=g, dtype=torch.float64)
    scale = torch.exp(0.5 * torch.randn(shape[0], shape[1], *extra, generator=g))
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def check_against_reference(
    layer: nn.Module, x: Tensor, weights64=None, uses_batch_scope: bool = True
) -> None:
    """One step of ``layer`` (its current mode) against the transcription: output, input
    and parameter gradients, running statistics. ``weights64(mean64, var64)`` gives the
    reference's mixing weights from float64 copies of the logits (default: sparsestmax at
    the layer's radius). A layer frozen off the BN scope must leave its running statistics
    alone (``uses_batch_scope=False``)."""
    radius = float(layer.radius)
    if weights64 is None:

        def weights64(m, v):
            return sparsestmax(m, radius), sparsestmax(v, radius)

    names = ["weight", "bias", "mean_weight", "var_weight"]
    p64 = {n: getattr(layer, n).detach().double().requires_grad_() for n in names}
    x64 = x.detach().double().requires_grad_()
    running = (layer.running_mean.double().clone(), layer.running_var.double().clone())
    batches = int(layer.num_batches_tracked)
    w64, v64 = weights64(p64["mean_weight"], p64["var_weight"])
    y64, mu_bn, var_bn = reference_ssn(
        x64,
        p64["weight"],
        p64["bias"],
        w64,
        v64,
        eps=layer.eps,
        training=layer.training,
        running_mean=running[0],
        running_var=running[1],
    )
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(y64.shape, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad(y64, [x64, *p64.values(), w64, v64], dy, allow_unused=True)
    # The logit gradients are J^T times the gradients for the weights, which set their scale:
    # sparsestmax's Jacobian J can vanish (two scopes, pushed: the point no longer moves).
    floors = [0.0] * 3 + [ref[5].norm().item(), ref[6].norm().item()]
    ref = ref[:5]

    xl = x.detach().clone().requires_grad_()
    y = layer(xl)
    got = torch.autograd.grad(y, [xl, *(getattr(layer, n) for n in names)], dy.to(y.dtype))
    tol = TOL[x.dtype]
    errors = {"y": rel_err(y, y64)}
    for n, a, b, floor in zip(["dx", *names], got, ref, floors, strict=True):
        errors[n] = (a.double() - b).norm().item() / max(b.norm().item(), floor)
    if layer.training and not uses_batch_scope:
        assert torch.equal(layer.running_mean.double(), running[0])
        assert torch.equal(layer.running_var.double(), running[1])
        assert int(layer.num_batches_tracked) == batches
    elif layer.training:
        m = layer.momentum
        errors["running_mean"] = rel_err(layer.running_mean, (1 - m) * running[0] + m * mu_bn)
        errors["running_var"] = rel_err(layer.running_var, (1 - m) * running[1] + m * var_bn)
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"


# -- local layers -------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("radius", [0.0, 0.3, 0.55])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_matches_transcription_with_sparsestmax_weights(dim, dtype, radius, training):
    layer = make_layer(dim, dtype).train(training)
    k = len(layer.scopes)
    set_logits_(layer, *SPARSE_LOGITS[k])
    assert set_radius(layer, radius) == 1
    w, v = layer.mixing_weights()
    assert not is_one_hot(w) and not is_one_hot(v)
    check_against_reference(layer, make_input(dim, dtype))
    assert layer.frozen_scopes == (None, None)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_mixing_weights_are_sparsestmax_of_the_logits(dim):
    layer = LOCAL[dim](4)
    k = len(layer.scopes)
    set_logits_(layer, *SPARSE_LOGITS[k])
    for radius in (0.0, 0.2, 0.5, 1.0):
        set_radius(layer, radius)
        w, v = layer.mixing_weights()
        assert torch.equal(w, sparsestmax(layer.mean_weight.detach(), radius))
        assert torch.equal(v, sparsestmax(layer.var_weight.detach(), radius))


FROZEN_CASES = [
    (2, "in", "in"),
    (2, "ln", "ln"),
    (2, "bn", "bn"),
    (2, "in", "bn"),
    (2, "bn", "ln"),
    (3, "ln", "in"),
    (3, "bn", "bn"),
    (1, "ln", "ln"),
    (1, "bn", "bn"),
    (1, "bn", "ln"),
]


@pytest.mark.parametrize("dim, mean_scope, var_scope", FROZEN_CASES)
def test_freezing_selects_one_scope_for_good(dim, mean_scope, var_scope):
    layer = make_layer(dim, torch.float64)
    scopes, k = layer.scopes, len(layer.scopes)
    set_logits_(
        layer, favouring(scopes.index(mean_scope), k), favouring(scopes.index(var_scope), k)
    )
    x = make_input(dim, torch.float64)
    layer(x)  # radius 0: sparsemax, not one-hot
    assert layer.frozen_scopes == (None, None)
    assert (int(layer.frozen_mean), int(layer.frozen_var)) == (-1, -1)

    set_radius(layer, 1.0)
    uses_bn = "bn" in (mean_scope, var_scope)

    def one_hot(m, v):
        return (
            torch.eye(k, dtype=m.dtype)[scopes.index(mean_scope)] + 0 * m,
            torch.eye(k, dtype=v.dtype)[scopes.index(var_scope)] + 0 * v,
        )

    # Freezes in this step (decided in the kernels: the batch scope is still computed, with
    # weight 0 when frozen off BN); the host knows it from the next step on.
    check_against_reference(layer, x, one_hot)
    assert layer._reads().settled == (scopes.index(mean_scope), scopes.index(var_scope))
    assert layer.frozen_scopes == (mean_scope, var_scope)
    assert int(layer.frozen_mean) == scopes.index(mean_scope)
    assert int(layer.frozen_var) == scopes.index(var_scope)
    w, v = layer.mixing_weights()
    assert is_one_hot(w) and is_one_hot(v)

    # Frozen for good: logits now favouring other scopes, and radius 0, change nothing.
    other = favouring((scopes.index(mean_scope) + 1) % k, k)
    set_logits_(layer, other, other)
    set_radius(layer, 0.0)
    layer.zero_grad()
    check_against_reference(layer, make_input(dim, torch.float64, seed=3), one_hot, uses_bn)
    assert layer.frozen_scopes == (mean_scope, var_scope)
    # The logits keep a (zero) gradient, so DistributedDataParallel sees every parameter used.
    y = layer(x)
    y.square().sum().backward()
    assert torch.equal(layer.mean_weight.grad, torch.zeros(k))
    assert torch.equal(layer.var_weight.grad, torch.zeros(k))
    # Eval mode uses the frozen selection too (BN from the running statistics).
    layer.eval()
    check_against_reference(layer, x, one_hot)

    layer.reset_parameters()
    assert layer.frozen_scopes == (None, None)


def test_frozen_layer_handles_float16_parameters_and_input():
    layer = SparseSwitchNorm2d(4).half()
    set_logits_(layer, favouring(0, 3), favouring(1, 3))
    x = make_input(2, torch.float16)[:, :4]
    y = layer(x)
    assert layer.frozen_scopes == (None, None) and y.dtype == torch.float16
    set_radius(layer, 1.0)
    y = layer(x)
    assert layer.frozen_scopes == ("in", "ln")
    assert y.dtype == torch.float16 and bool(torch.isfinite(y).all())
    ref, _, _ = reference_ssn(
        x.double(),
        torch.ones(4, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
        torch.tensor([1.0, 0, 0], dtype=torch.float64),
        torch.tensor([0, 1.0, 0], dtype=torch.float64),
        eps=layer.eps,
        training=True,
        running_mean=None,
        running_var=None,
    )
    assert rel_err(y, ref) < 2e-3


def test_no_freezing_in_eval_mode():
    layer = SparseSwitchNorm2d(4).eval()
    set_logits_(layer, favouring(0, 3), favouring(2, 3))
    set_radius(layer, 1.0)
    w, v = layer.mixing_weights()
    assert is_one_hot(w) and is_one_hot(v)
    layer(torch.randn(2, 4, 3, 3))
    assert layer.frozen_scopes == (None, None)
    layer.train()(torch.randn(2, 4, 3, 3))
    assert layer.frozen_scopes == ("in", "bn")


SN_LOCAL = {1: SwitchNorm1d, 2: SwitchNorm2d}


# (NumPy's warnings from Triton's interpreter computing on NaN.)
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning:triton")
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("logit", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_switch_logits_give_nan_as_switchnorm_does(backend, dim, logit, monkeypatch):
    """After one NaN optimizer step the switch logits are NaN: SSN gives NaN outputs and
    gradients, as SN's softmax does, in training and eval, on every backend; nothing
    freezes, and the running statistics (of the batch, which is finite) fold as SN's do.
    No error and no host read: every rank holds the same logits and computes the same."""
    if backend == "triton" and not kernels.get("triton").available():
        pytest.skip(kernels.get("triton").unavailable_reason())
    monkeypatch.setenv("SYNCSN_BACKEND", backend)
    c = SHAPES[dim][1]
    layers = {"ssn": LOCAL[dim](c), "sn": SN_LOCAL[dim](c)}
    set_radius(layers["ssn"], 0.5)
    out = {}
    for name, layer in layers.items():
        with torch.no_grad():
            layer.var_weight[-1] = logit
        x = make_input(dim, torch.float32).requires_grad_()
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = {k: p.grad for k, p in layer.named_parameters()}
        with torch.no_grad():
            evaluated = layer.eval()(make_input(dim, torch.float32, seed=2))
        out[name] = y.detach(), x.grad, grads, evaluated
    (y, dx, grads, evaluated), (sn_y, sn_dx, sn_grads, sn_evaluated) = out["ssn"], out["sn"]
    for got, sn in ((y, sn_y), (dx, sn_dx), (evaluated, sn_evaluated)):
        assert bool(got.isnan().all()) and bool(sn.isnan().all())
    for k, sn in sn_grads.items():  # NaN where SN's are (all but the bias's)
        assert torch.equal(grads[k].isnan(), sn.isnan()), k
    ssn, sn_layer = layers["ssn"], layers["sn"]
    assert ssn.frozen_scopes == (None, None)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ssn, k), getattr(sn_layer, k)), k
    assert int(ssn.num_batches_tracked) == 1


def test_tied_logits_never_freeze_until_a_gradient_step_breaks_the_tie():
    """At initialisation the logits are tied (all ones): sparsestmax returns the uniform
    point at any radius, so a fresh layer is plain sparsemax-SN. The sparsemax gradient at
    that point is not zero, so one optimizer step unties the logits and the push begins."""
    torch.manual_seed(0)
    layer = SparseSwitchNorm2d(4)
    set_radius(layer, 1.0)
    x = make_input(2, torch.float32)[:, :4]
    y = layer(x)
    assert layer.frozen_scopes == (None, None)
    assert torch.equal(layer.mixing_weights()[0], torch.full((3,), 1 / 3))
    (y * torch.randn_like(y)).sum().backward()
    assert layer.mean_weight.grad.abs().max() > 0 and layer.var_weight.grad.abs().max() > 0
    with torch.no_grad():
        for p in (layer.mean_weight, layer.var_weight):
            p -= 1e-3 * p.grad
    layer(x)
    assert None not in layer.frozen_scopes


def test_bad_frozen_buffer_is_reported():
    layer = SparseSwitchNorm2d(4)
    layer(torch.randn(2, 4, 3, 3))
    layer.frozen_var.fill_(3)
    with pytest.raises(ValueError, match=r"frozen_var must be -1 .* scopes \('in', 'ln', 'bn'\)"):
        layer(torch.randn(2, 4, 3, 3))


def test_bad_frozen_buffer_is_reported_when_loaded():
    state = SparseSwitchNorm2d(4).state_dict()
    state["frozen_mean"] = torch.tensor(5)
    with pytest.raises(ValueError, match=r"frozen_mean must be -1 .* got 5"):
        SparseSwitchNorm2d(4).load_state_dict(state)


def test_a_host_that_learns_a_step_late_computes_the_same(monkeypatch):
    """On CUDA the host reads the frozen selections one step late. Until then the layer
    computes the batch scope with weight 0: the same outputs and gradients as a layer whose
    host knew at once (CPU), and one more batch folded into the unused running statistics."""
    x = make_input(2, torch.float64)
    layers = {}
    for name in ("at_once", "late"):
        if name == "late":
            monkeypatch.setattr(ssn_module, "DeferredRead", LateRead)
        layer = layers[name] = make_layer(2, torch.float64)
        set_logits_(layer, favouring(0, 3), favouring(1, 3))  # freezes on (IN, LN): off BN
        set_radius(layer, 1.0)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
        out = {}
        for name, layer in layers.items():
            layer.zero_grad()
            xl = x.clone().requires_grad_()
            y = layer(xl)
            (y * dy).sum().backward()
            out[name] = [y, xl.grad, *(p.grad for p in layer.parameters())]
        for a, b in zip(out["late"], out["at_once"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert layers["late"].frozen_scopes == layers["at_once"].frozen_scopes == ("in", "ln")
    # The freezing call still computes the batch scope; a host that learns at once drops it
    # from the next call, one that learns a call late from the one after.
    assert int(layers["at_once"].num_batches_tracked) == 1
    assert int(layers["late"].num_batches_tracked) == 2


def test_loading_a_state_makes_a_frozen_layer_learn_its_selection_again():
    x = make_input(2, torch.float32)
    layer = make_layer(2, torch.float32)
    set_logits_(layer, favouring(0, 3), favouring(1, 3))
    set_radius(layer, 1.0)
    layer(x)
    assert layer.frozen_scopes == ("in", "ln")  # frozen off BN, and the host knows it
    fresh = make_layer(2, torch.float32, seed=5)
    set_logits_(fresh, *SPARSE_LOGITS[3])
    layer.load_state_dict(fresh.state_dict())
    assert layer.frozen_scopes == (None, None)
    for mode in (True, False):
        torch.testing.assert_close(layer.train(mode)(x), fresh.train(mode)(x), rtol=0, atol=0)


@pytest.mark.parametrize("dim", [1, 2])
def test_state_dict_round_trip_keeps_radius_and_frozen_selection(dim):
    layer = make_layer(dim, torch.float32)
    k = len(layer.scopes)
    # Means one-hot already under sparsemax (frozen at the first step), variances not.
    set_logits_(layer, [1.5] + [0.0] * (k - 1), SPARSE_LOGITS[k][1])
    set_radius(layer, 0.3)
    x = make_input(dim, torch.float32)
    layer(x)
    assert layer.frozen_scopes == (layer.scopes[0], None)
    state = layer.state_dict()
    assert {"radius", "frozen_mean", "frozen_var"} <= set(state)

    clone = LOCAL[dim](layer.num_features)
    clone(x)  # its host copy of the (unfrozen) selection must be refreshed by the load
    clone.load_state_dict(state)
    assert float(clone.radius) == pytest.approx(0.3)
    assert clone.frozen_scopes == (layer.scopes[0], None)
    for mode in (True, False):
        layer.train(mode)
        clone.train(mode)
        assert torch.equal(clone(x), layer(x))
    assert clone.frozen_scopes == layer.frozen_scopes


# -- radius, schedule, optimizer groups -----------------------------------------------------


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        SparseSwitchNorm2d(4),
        nn.Sequential(nn.Conv2d(4, 4, 1), SyncSparseSwitchNorm2d(4)),
        nn.Flatten(),
        nn.Linear(4 * 9, 6),
        SparseSwitchNorm1d(6),
        nn.BatchNorm1d(6),
    )


def radii(model: nn.Module) -> list[float]:
    return [float(m.radius) for m in model.modules() if hasattr(m, "frozen_scopes")]


def test_set_radius_sets_every_sparse_layer_and_checks_its_argument():
    model = small_model()
    assert set_radius(model, 0.25) == 3
    assert radii(model) == [0.25] * 3
    assert set_radius(nn.Linear(2, 2), 0.5) == 0
    for bad, error in ((-0.1, ValueError), (math.nan, ValueError), (True, TypeError)):
        with pytest.raises(error, match="radius"):
            set_radius(model, bad)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        set_radius([model], 0.5)


def test_radius_schedule_ramps_linearly_to_one_and_resumes():
    model = small_model()
    set_radius(model, 0.7)
    schedule = RadiusSchedule(model, total_steps=8)
    assert radii(model) == [0.0] * 3 and schedule.radius == 0.0
    seen = [schedule.step() for _ in range(10)]
    assert seen == [min(i / 8, 1.0) for i in range(1, 11)]
    assert radii(model) == [1.0] * 3

    first = RadiusSchedule(model, total_steps=20)
    for _ in range(7):
        first.step()
    saved = first.state_dict()
    assert saved == {"last_step": 7, "total_steps": 20}

    resumed_model = small_model()
    resumed = RadiusSchedule(resumed_model, total_steps=1)
    resumed.load_state_dict(saved)
    assert radii(resumed_model) == pytest.approx([7 / 20] * 3)
    assert [resumed.step() for _ in range(3)] == [first.step() for _ in range(3)]


def test_radius_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        RadiusSchedule(small_model(), 0)
    with pytest.raises(ValueError, match="no Sparse Switchable Normalization layer"):
        RadiusSchedule(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), 10)
    schedule = RadiusSchedule(small_model(), 10)
    with pytest.raises(KeyError, match="last_step"):
        schedule.load_state_dict({"total_steps": 10})
    with pytest.raises(ValueError, match="total_steps >= 1"):
        schedule.load_state_dict({"last_step": 1, "total_steps": 0})


def test_param_groups_put_the_sparse_switch_logits_apart():
    model = small_model()
    groups = {g["name"]: g for g in param_groups(model, lr=0.1, weight_decay=1e-4)}
    switch = {id(p) for p in groups["switch"]["params"]}
    expected = {
        id(p) for n, p in model.named_parameters() if n.endswith(("mean_weight", "var_weight"))
    }
    assert switch == expected and len(expected) == 6
    assert groups["switch"]["lr"] == pytest.approx(0.01)
    assert groups["switch"]["weight_decay"] == 0.0


def test_sync_layers_are_sparse_layers_with_a_process_group():
    for dim in (1, 2, 3):
        layer = SYNC[dim](4)
        assert isinstance(layer, LOCAL[dim]) and layer.process_group is None
        assert layer.scopes == SCOPES[dim]
    # Without a process group a Sync layer is its local layer.
    x = make_input(2, torch.float32)
    sync, local = SyncSparseSwitchNorm2d(5), SparseSwitchNorm2d(5)
    for layer in (sync, local):
        set_logits_(layer, favouring(2, 3), favouring(0, 3))
        set_radius(layer, 1.0)
    assert torch.equal(sync(x), local(x))
    assert sync.frozen_scopes == local.frozen_scopes == ("bn", "in")


# -- synchronized layers on gloo ranks ------------------------------------------------------


def prepare_(layer: nn.Module, state: str, seed: int) -> None:
    """Random affine parameters, then the switch state under test (same on every rank)."""
    randomize_(layer, seed)
    k = len(layer.scopes)
    if state == "sparse":  # sparsestmax weights, not one-hot
        set_logits_(layer, *SPARSE_LOGITS[k])
        set_radius(layer, 0.3)
    elif state == "freezing":  # freezes at the first step: means on BN, variances on the first
        set_logits_(layer, favouring(k - 1, k), favouring(0, k))
        set_radius(layer, 1.0)
    elif state == "off_bn":  # freezes at the first step on IN / LN: no collective any more
        set_logits_(layer, favouring(0, k), favouring(k - 2, k))
        set_radius(layer, 1.0)
    else:
        raise ValueError(state)


def _run_sync(rank, k, dim, state, xs, gs, seed):
    if rank >= k:
        return None
    layer = SYNC[dim](3, process_group=subgroup(k)).to(xs[0].dtype)
    prepare_(layer, state, seed)
    out = None
    for _ in range(2):
        layer.zero_grad()
        x = xs[rank].clone().requires_grad_()
        y = layer(x)
        (y * gs[rank]).sum().backward()
        out = {"y": y.detach(), "dx": x.grad}
        out.update({"d" + n: p.grad.clone() for n, p in layer.named_parameters()})
        out.update({n: b.clone() for n, b in layer.named_buffers()})
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("state", ["sparse", "freezing", "off_bn"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_sync_equals_local_on_concatenated_batch_on_3_uneven_ranks(world, dim, state, dtype):
    spatial = {1: (), 2: (4, 5), 3: (2, 3, 4)}[dim]
    sizes = [2, 0, 3]
    xs, gs = make_batch(sizes, [spatial] * 3, 3, dtype, seed=dim)
    results = world.run(_run_sync, 3, dim, state, xs, gs, 5)[:3]
    local = LOCAL[dim](3).to(dtype)
    prepare_(local, state, 5)
    # Outputs, input gradients, summed parameter gradients, and every buffer (running
    # statistics, radius, frozen selections) identical on all ranks and equal to local.
    compare_to_concatenated(results, local, xs, gs, dtype, steps=2)
    expected = (None, None) if state == "sparse" else local.frozen_scopes
    assert local.frozen_scopes == expected
    if state != "sparse":
        assert None not in expected


def _count_case(rank, k, dim, mean_scope, var_scope):
    """Collectives per training step: one at radius 0, then two at radius 1 (the first
    freezes), then in eval, then in a fresh layer loaded from the frozen state dict."""
    if rank >= k:
        return None
    group = subgroup(k)
    layer = SYNC[dim](4, process_group=group)
    scopes, n = layer.scopes, len(layer.scopes)
    set_logits_(
        layer, favouring(scopes.index(mean_scope), n), favouring(scopes.index(var_scope), n)
    )
    shape = {1: (3, 4), 2: (2, 4, 3, 3), 3: (2, 4, 2, 2, 3)}[dim]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(rank), requires_grad=True)

    def step(module):
        holder = {}
        fwd = count_collectives(lambda: holder.setdefault("y", module(x)))
        bwd = count_collectives(lambda: holder["y"].square().sum().backward())
        return dict(fwd), dict(bwd)

    counts = [step(layer)]
    set_radius(layer, 1.0)
    counts += [step(layer), step(layer)]
    layer.eval()
    counts.append(step(layer))
    fresh = SYNC[dim](4, process_group=group)
    fresh.load_state_dict(layer.state_dict())
    counts.append(step(fresh))
    return counts, layer.frozen_scopes, fresh.frozen_scopes


COUNT_CASES = [
    (2, "in", "in", 0),
    (2, "ln", "ln", 0),
    (2, "in", "ln", 0),
    (2, "bn", "bn", 1),
    (2, "in", "bn", 1),
    (3, "ln", "in", 0),
    (3, "bn", "bn", 1),
    (1, "ln", "ln", 0),
    (1, "bn", "bn", 1),
]


@pytest.mark.parametrize("dim, mean_scope, var_scope, expected", COUNT_CASES)
def test_collectives_before_and_after_freezing(world, dim, mean_scope, var_scope, expected):
    one_each_way = ({"gloo:all_gather": 1}, {"gloo:all_reduce": 1})
    after = one_each_way if expected else ({}, {})
    for counts, frozen, fresh_frozen in world.run(_count_case, 2, dim, mean_scope, var_scope)[:2]:
        assert frozen == fresh_frozen == (mean_scope, var_scope)
        before, freezing, frozen_step, evaluation, loaded = counts
        assert before == one_each_way, before
        # The kernels freeze during the call: it still makes the batch scope's collectives.
        assert freezing == one_each_way and frozen_step == after, (freezing, frozen_step)
        assert evaluation == ({}, {}), evaluation
        assert loaded == after, loaded


def _late_read_case(rank, k):
    """Collectives per training step when the host learns the frozen selections a step late
    (as on CUDA): the step that freezes off BN and the next one still make them, with weight
    0; the one after, the same on every rank, makes none."""
    if rank >= k:
        return None
    saved, ssn_module.DeferredRead = ssn_module.DeferredRead, LateRead
    try:
        layer = SyncSparseSwitchNorm2d(4, process_group=subgroup(k))
    finally:
        ssn_module.DeferredRead = saved
    set_logits_(layer, favouring(0, 3), favouring(1, 3))
    set_radius(layer, 1.0)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(rank), requires_grad=True)

    def step():
        holder = {}
        fwd = count_collectives(lambda: holder.setdefault("y", layer(x)))
        bwd = count_collectives(lambda: holder["y"].square().sum().backward())
        return dict(fwd), dict(bwd)

    counts = [step() for _ in range(3)]
    return counts, layer.frozen_scopes


def test_a_late_host_read_switches_every_rank_at_the_same_step(world):
    one_each_way = ({"gloo:all_gather": 1}, {"gloo:all_reduce": 1})
    for counts, frozen in world.run(_late_read_case, 2)[:2]:
        assert frozen == ("in", "ln")
        assert counts == [one_each_way, one_each_way, ({}, {})], counts


def _debug_mismatch_case(rank, k):
    if rank >= k:
        return None
    layer = SyncSparseSwitchNorm2d(4, process_group=subgroup(k))
    # Rank 1's logits differ: it would freeze its means on BN while rank 0 freezes on IN.
    set_logits_(layer, favouring(2 if rank == 1 else 0, 3), favouring(1, 3))
    set_radius(layer, 1.0)
    previous = os.environ.get("SYNCSN_DEBUG")
    os.environ["SYNCSN_DEBUG"] = "1"
    try:
        layer(torch.randn(2, 4, 3, 3))
    except RuntimeError as error:
        return str(error), layer.frozen_scopes
    finally:
        if previous is None:
            del os.environ["SYNCSN_DEBUG"]
        else:
            os.environ["SYNCSN_DEBUG"] = previous
    return None, layer.frozen_scopes


def test_debug_mode_reports_ranks_that_disagree_on_freezing(world):
    for message, frozen in world.run(_debug_mismatch_case, 2)[:2]:
        assert message is not None and "disagree on which switch weights are frozen" in message
        assert "[(0, 1), (2, 1)]" in message
        assert frozen == (None, None)  # nothing recorded: the ranks stay consistent


# -- a short training run ----------------------------------------------------------------


class TinyNet(nn.Module):
    """conv - SSN2d - relu - conv - SSN2d - relu - pool - linear - SSN1d - relu - linear."""

    def __init__(self, group) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            SyncSparseSwitchNorm2d(8, process_group=group),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            SyncSparseSwitchNorm2d(8, process_group=group),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Linear(8, 16),
            SyncSparseSwitchNorm1d(16, process_group=group),
            nn.ReLU(),
            nn.Linear(16, 4),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


STEPS, RAMP = 32, 30


def _training_case(rank, k):
    """DDP training from the default (tied) switch logits with the authors' schedule."""
    if rank >= k:
        return None
    group = subgroup(k)
    torch.manual_seed(0)
    net = TinyNet(group)
    model = nn.parallel.DistributedDataParallel(net, process_group=group)
    optimizer = torch.optim.SGD(param_groups(model, lr=0.2, weight_decay=1e-4), momentum=0.9)
    schedule = RadiusSchedule(model, total_steps=RAMP)
    teacher = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    data = torch.Generator().manual_seed(100 + rank)
    layers = [m for m in net.modules() if isinstance(m, (SparseSwitchNorm1d, SparseSwitchNorm2d))]
    frozen_at = [None] * len(layers)
    losses = []
    for step in range(STEPS):
        x = torch.randn(8, 3, 6, 6, generator=data) + torch.randn(8, 3, 1, 1, generator=data)
        labels = (x.mean(dim=(2, 3)) @ teacher).argmax(dim=1)
        loss = nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        for i, layer in enumerate(layers):
            if frozen_at[i] is None and None not in layer.frozen_scopes:
                frozen_at[i] = step
    # Collectives of one training step of the bare network, without DDP's own.
    x = torch.randn(8, 3, 6, 6, generator=data)
    holder = {}
    fwd = count_collectives(lambda: holder.setdefault("y", net(x)))
    bwd = count_collectives(lambda: holder["y"].sum().backward())
    return {
        "frozen": [layer.frozen_scopes for layer in layers],
        "one_hot": [all(is_one_hot(w) for w in layer.mixing_weights()) for layer in layers],
        "frozen_at": frozen_at,
        "num_scopes": [len(layer.scopes) for layer in layers],
        "losses": losses,
        "counts": (fwd.get("gloo:all_gather", 0), bwd.get("gloo:all_reduce", 0)),
        "params": [p.detach().clone() for p in net.parameters()],
    }


def test_training_run_ends_with_every_layer_one_hot(world):
    """Two ranks, DistributedDataParallel, SGD with param_groups, the radius ramped over 30
    of 32 steps. The logits start tied (all ones): at radius 0 sparsestmax is sparsemax,
    whose gradient at the uniform point unties them in the first step (see
    test_tied_logits_never_freeze_until_a_gradient_step_breaks_the_tie); from then on the
    push moves every vector to a vertex by the time the radius reaches sqrt(2/3)
    (sqrt(1/2) for the 1d layer), and the layer freezes there."""
    results = world.run(_training_case, 2)[:2]
    first = results[0]
    for res in results:
        assert all(res["one_hot"]), res["frozen"]
        assert all(None not in f for f in res["frozen"]), res["frozen"]
        assert res["frozen"] == first["frozen"]  # the same decisions on every rank
        for a, b in zip(res["params"], first["params"], strict=True):
            assert torch.equal(a, b)
        assert all(math.isfinite(v) for v in res["losses"])
    # Frozen no later than the first step whose radius (step / RAMP) reaches the distance
    # from the centre to a vertex, sqrt((K - 1) / K) with K scopes.
    for at, k in zip(first["frozen_at"], first["num_scopes"], strict=True):
        assert at is not None and at <= math.ceil(RAMP * math.sqrt((k - 1) / k)), at
    # A layer keeps one collective each way only if BN is one of its selections.
    with_bn = sum("bn" in scopes for scopes in first["frozen"])
    for res in results:
        assert res["counts"] == (with_bn, with_bn), (res["counts"], first["frozen"])
    # Training did something: the loss went down.
    losses = first["losses"]
    assert sum(losses[-8:]) < sum(losses[:8]), losses
