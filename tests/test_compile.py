"""torch.compile(fullgraph=True), torch.export, ONNX and torch.jit.trace of every layer.

Compiled models are compared with the same model run eagerly: outputs and gradients
within 1e-5 (float32), running statistics equal, no graph break, the same collectives.
Compiling is slow on a small CPU, so most cases use the ``aot_eager`` backend (dynamo and
AOTAutograd, which is where a layer could break the graph) and one model with every layer
kind goes through inductor.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch._dynamo.testing
from dist_world import count_collectives, subgroup
from torch import nn

import syncsn


def conv_net(norm, channels: int = 6, dim: int = 2) -> nn.Module:
    """conv, norm, relu, twice: the small model a new user tries first."""
    conv = {1: nn.Linear, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    args = {} if dim == 1 else {"kernel_size": 3, "padding": 1}
    first = conv(3 if dim > 1 else 5, channels, **args)
    return nn.Sequential(
        first, norm(channels), nn.ReLU(), conv(channels, channels, **args), norm(channels),
        nn.ReLU(),
    )  # fmt: skip


def mixed_net(sync_group=None) -> nn.Module:
    """One model with every 2-D layer kind (the Sync ones over ``sync_group``)."""
    group = {"process_group": sync_group}
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), syncsn.SwitchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), syncsn.SyncSwitchNorm2d(6, **group), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), syncsn.SyncBatchNorm(6, **group), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), syncsn.SparseSwitchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), syncsn.SyncSparseSwitchNorm2d(6, **group), nn.ReLU(),
    )  # fmt: skip


class Mean(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3, 4))


def net_1d_3d() -> nn.Module:
    """SwitchNorm3d on a volume, then SwitchNorm1d on pooled features."""
    return nn.Sequential(
        nn.Conv3d(3, 6, 3, padding=1), syncsn.SwitchNorm3d(6), nn.ReLU(), Mean(),
        nn.Linear(6, 5), syncsn.SwitchNorm1d(5),
    )  # fmt: skip


# Shapes whose sizes all differ from each other, so that no size is specialized (duck sizing).
SHAPES_2D = [(2, 3, 6, 7), (3, 3, 5, 9), (5, 3, 8, 4)]
SHAPES_3D = [(2, 3, 4, 5, 6), (3, 3, 5, 4, 7)]


def _input(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2 + 0.5


def _loss(y: torch.Tensor) -> torch.Tensor:
    return (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()


def assert_relative_close(
    a: torch.Tensor, b: torch.Tensor, tol: float, what: str, scale: torch.Tensor
) -> None:
    """Error relative to the whole gradient's norm ``scale``: inductor reorders the sums of a
    convolution's gradient, and the gradient of a bias in front of a BN layer is exactly 0
    in theory, so only rounding is left of it."""
    error = ((a - b).norm() / scale.clamp(min=1e-30)).item()
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:.0e}"


def check_against_eager(
    model: nn.Module, backend: str, train: bool, shapes, tol=1e-5, same_graph=True,
    buffer_tol=0.0,
):  # fmt: skip
    """Compile a copy of ``model`` (fullgraph, dynamic) and run it next to eager on every
    shape: outputs, gradients and buffers agree (buffers bitwise, or within ``buffer_tol``
    where the compiler rounds the layers' inputs differently), and the shapes share one
    compiled frame."""
    torch._dynamo.reset()
    eager, compiled_model = copy.deepcopy(model).train(train), copy.deepcopy(model).train(train)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=counter, dynamic=True)
    frames = None
    for i, shape in enumerate(shapes):
        x = _input(shape, i)
        for m in (eager, compiled_model):
            m.zero_grad(set_to_none=True)
        y_eager, y = eager(x), compiled(x)
        if train:
            _loss(y_eager).backward()
            _loss(y).backward()
        torch.testing.assert_close(y.detach(), y_eager.detach(), rtol=tol, atol=tol)
        if train:
            grads = [(n, p.grad, q.grad) for (n, p), q in zip(
                compiled_model.named_parameters(), eager.parameters(), strict=True
            ) if q.grad is not None]  # fmt: skip
            scale = torch.stack([g0.norm() for _, _, g0 in grads]).norm()
            for name, g, g0 in grads:
                assert_relative_close(g, g0, tol, name, scale)
        for (name, b), c in zip(compiled_model.named_buffers(), eager.buffers(), strict=True):
            torch.testing.assert_close(b, c, rtol=buffer_tol, atol=buffer_tol, msg=name)
        frames = counter.frame_count if frames is None else frames
        if same_graph:
            assert counter.frame_count == frames, f"recompiled for the input shape {shape}"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_no_graph_break(train):
    cases = ((mixed_net(), _input(SHAPES_2D[0], 0)), (net_1d_3d(), _input(SHAPES_3D[0], 0)))
    for model, x in cases:
        explanation = torch._dynamo.explain(model.train(train))(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compiled_equals_eager(train):
    check_against_eager(mixed_net(), "aot_eager", train, SHAPES_2D)


def test_compiled_switchnorm_1d_and_3d():
    check_against_eager(net_1d_3d(), "aot_eager", True, SHAPES_3D)


def test_inductor():
    # Inductor specializes the first input's spatial size once (a guard on the convolution's
    # input), so a second graph is allowed here; aot_eager above shows the layers need none.
    # Its convolutions round differently from eager's (by ~1e-7), which the running
    # statistics inherit; on the same input they are bitwise equal (next test).
    check_against_eager(
        mixed_net(), "inductor", True, SHAPES_2D[:2], same_graph=False, buffer_tol=1e-6
    )


def test_inductor_running_statistics_are_bitwise_those_of_eager():
    norms = nn.Sequential(
        syncsn.SwitchNorm2d(3), nn.ReLU(), syncsn.SyncSwitchNorm2d(3), nn.ReLU(),
        syncsn.SyncBatchNorm(3), nn.ReLU(), syncsn.SparseSwitchNorm2d(3),
    )  # fmt: skip
    check_against_eager(norms, "inductor", True, SHAPES_2D[:2], same_graph=False)


def test_errors_are_the_same_under_compile():
    """A global batch of one sample is caught by the merge's check, compiled or not."""
    torch._dynamo.reset()
    model = conv_net(syncsn.SwitchNorm2d).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    compiled(_input((2, 3, 5, 5), 0))
    for run in (model, compiled):
        with pytest.raises(ValueError, match="expected more than 1 value per channel"):
            run(_input((1, 3, 5, 5), 1))


def test_non_finite_statistics_warn_and_skip_under_compile():
    torch._dynamo.reset()
    model = conv_net(syncsn.SyncBatchNorm).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = _input((2, 3, 5, 5), 0)
    compiled(x)
    before = [b.clone() for b in model.buffers()]
    x[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        compiled(x)
    for b, c in zip(model.buffers(), before, strict=True):
        if b.dtype != torch.long:
            torch.testing.assert_close(b, c, rtol=0, atol=0)


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = syncsn.SwitchNorm2d(4)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(
            lambda t: self.norm(self.conv(t)), x, use_reentrant=False
        )


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_checkpoint_recomputation_folds_once(compiled):
    """torch.utils.checkpoint re-runs the forward in backward; the statistics count once."""
    torch._dynamo.reset()
    model = Checkpointed().train()
    reference = copy.deepcopy(model)
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    x = _input((2, 3, 7, 8), 0)
    _loss(run(x)).backward()
    _loss(reference(x)).backward()
    torch.testing.assert_close(model.norm.running_var, reference.norm.running_var, rtol=0, atol=0)
    assert int(model.norm.num_batches_tracked) == 1
    torch.testing.assert_close(model.conv.weight.grad, reference.conv.weight.grad)


# --- export ---------------------------------------------------------------------------------

EXPORTED = {
    "SwitchNorm1d": (syncsn.SwitchNorm1d, 1),
    "SwitchNorm2d": (syncsn.SwitchNorm2d, 2),
    "SwitchNorm3d": (syncsn.SwitchNorm3d, 3),
    "SyncSwitchNorm2d": (syncsn.SyncSwitchNorm2d, 2),
    "SparseSwitchNorm2d": (syncsn.SparseSwitchNorm2d, 2),
    "SyncBatchNorm": (syncsn.SyncBatchNorm, 2),
}


def trained_eval_model(norm, dim: int) -> nn.Module:
    model = conv_net(norm, dim=dim).train()
    with torch.no_grad():
        for i in range(2):
            model(_input((4, 5) if dim == 1 else (4, 3, *([6] * dim)), 10 + i))
    return model.eval()


def _example(dim: int, n: int, size: int) -> torch.Tensor:
    return _input((n, 5) if dim == 1 else (n, 3, *([size] * dim)), n * size)


def _dynamic(dim: int):
    dims = {0: torch.export.Dim("batch", min=1, max=64)}
    if dim > 1:
        dims |= {i: torch.export.Dim(f"s{i}", min=2, max=128) for i in range(2, 2 + dim)}
    return (dims,)


def node_count(program: torch.export.ExportedProgram) -> int:
    """aten operations in an exported graph (inputs, outputs and tuple indexing not counted)."""
    return sum(
        1
        for n in program.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
    )


@pytest.mark.parametrize("name", EXPORTED)
def test_export_eval(name):
    norm, dim = EXPORTED[name]
    model = trained_eval_model(norm, dim)
    program = torch.export.export(model, (_example(dim, 2, 7),), dynamic_shapes=_dynamic(dim))
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            assert value.dtype != torch.float64, f"float64 node {node.format_node()}"
    with torch.no_grad():
        for n, size in [(3, 9), (1, 5)]:
            x = _example(dim, n, size)
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_frozen_ssn_exports():
    model = trained_eval_model(syncsn.SparseSwitchNorm2d, 2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, syncsn.SparseSwitchNorm2d):
                # Tied logits (the initial ones) are the uniform point and never freeze.
                m.mean_weight.copy_(torch.randn(3, generator=g))
                m.var_weight.copy_(torch.randn(3, generator=g))
    syncsn.set_radius(model, 1.0)
    model.train()
    with torch.no_grad():
        model(_example(2, 4, 6))
    model.eval()
    assert all(None not in m.frozen_scopes for m in model.modules() if hasattr(m, "frozen_scopes"))
    program = torch.export.export(model, (_example(2, 2, 7),), dynamic_shapes=_dynamic(2))
    x = _example(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["SwitchNorm2d", "SparseSwitchNorm2d", "SyncBatchNorm"])
def test_onnx_runs_in_onnxruntime(name, tmp_path):
    import onnxruntime as ort  # in the test extra: a missing install fails, not skips

    norm, dim = EXPORTED[name]
    model = trained_eval_model(norm, dim)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (_example(dim, 2, 7),), dynamic_shapes=_dynamic(dim), dynamo=True
        )
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, size in [(3, 9), (1, 6)]:
        x = _example(dim, n, size)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["SwitchNorm2d", "SyncBatchNorm"])
def test_jit_trace(name):
    norm, dim = EXPORTED[name]
    model = trained_eval_model(norm, dim)
    traced = torch.jit.trace(model, (_example(dim, 2, 7),))
    x = _example(dim, 3, 9)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


def test_switchnorm_eval_graph_is_small():
    """SN's exported eval graph has few more operations than SyncBatchNorm's."""
    sizes = {}
    for name in ("SwitchNorm2d", "SyncBatchNorm"):
        norm, _ = EXPORTED[name]
        layer = norm(6).eval()
        program = torch.export.export(layer, (_input((2, 6, 7, 7), 0),))
        sizes[name] = node_count(program)
    assert sizes["SwitchNorm2d"] <= 36, sizes


# --- on two gloo ranks ----------------------------------------------------------------------


def _compiled_on_ranks(rank, train):
    torch.manual_seed(0)
    if rank >= 2:
        return None
    # Process groups cannot be copied: build the eager twin from the same seed.
    model = mixed_net(subgroup(2)).train(train)
    torch.manual_seed(0)
    eager = mixed_net(subgroup(2)).train(train)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    x = _input((2 + rank, 3, 6, 5 + 2 * rank), rank)
    out = {}
    for label, run, params in (("compiled", compiled, model), ("eager", eager, eager)):
        _loss(run(x)).backward() if train else run(x)  # compile outside the counted region
        params.zero_grad(set_to_none=True)
        holder: dict = {}
        fwd = count_collectives(lambda run=run, holder=holder: holder.setdefault("y", run(x)))
        bwd = count_collectives(lambda h=holder: _loss(h["y"]).backward()) if train else {}
        out[label] = (
            holder["y"].detach(),
            [p.grad for p in params.parameters()] if train else [],
            [b.clone() for b in params.buffers()],
            sum(fwd.values()),
            sum(bwd.values()),
        )
    return out


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compiled_on_two_ranks(world, train):
    results = world.run(_compiled_on_ranks, train, timeout=300)
    for out in results[:2]:
        y, grads, buffers, fwd, bwd = out["compiled"]
        y0, grads0, buffers0, fwd0, bwd0 = out["eager"]
        torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
        for g, g0 in zip(grads, grads0, strict=True):
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-5)
        for b, b0 in zip(buffers, buffers0, strict=True):
            torch.testing.assert_close(b, b0, rtol=0, atol=0)
        assert (fwd, bwd) == (fwd0, bwd0)
        # Three synchronized layers: one collective each way each, in training only.
        assert (fwd, bwd) == ((3, 3) if train else (0, 0))
