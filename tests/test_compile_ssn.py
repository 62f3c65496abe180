"""Sparse Switchable Normalization under torch.compile(fullgraph=True), before and after its
switch weights freeze.

Freezing is decided and recorded on the device, so it traces into the graph. What the host
needs (whether a layer is frozen off BN, to skip the batch scope) it learns through a read
that the compiled graph makes as an op; the graph is specialized on it, so a layer that
settles causes one recompile, at the step after: until then the compiled model computes the
batch scope with weight exactly 0, which gives the same output.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import syncsn

pytestmark = pytest.mark.timeout(300)


def net() -> nn.Module:
    """conv, SSN, relu, twice. The first SSN freezes on (IN, LN) at radius 1, off BN; the
    second on (BN, IN), keeping the batch scope; at radius 0.3 neither is one-hot."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), syncsn.SparseSwitchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), syncsn.SparseSwitchNorm2d(4), nn.ReLU(),
    )  # fmt: skip
    logits = {1: ([0.4, 0.1, 0.05], [0.0, 0.4, 0.05]), 4: ([0.0, 0.1, 0.4], [0.4, 0.1, 0.05])}
    with torch.no_grad():
        for index, (mean, var) in logits.items():
            model[index].mean_weight.copy_(torch.tensor(mean))
            model[index].var_weight.copy_(torch.tensor(var))
    syncsn.set_radius(model, 0.3)
    return model


def step(model: nn.Module, run, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 5, 6, generator=g)
    model.zero_grad(set_to_none=True)
    y = run(x)
    (y * torch.randn(y.shape, generator=g)).sum().backward()
    return y.detach()


def assert_graph_whole(model: nn.Module) -> None:
    probe = copy.deepcopy(model)
    probe(torch.randn(2, 3, 5, 6))  # an eager step: the copy's host learns its frozen state
    explanation = torch._dynamo.explain(probe)(torch.randn(2, 3, 5, 6))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def compare(eager: nn.Module, compiled: nn.Module, y_eager, y_compiled, skip=()) -> None:
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
    for (name, b), c in zip(compiled.named_buffers(), eager.buffers(), strict=True):
        if name not in skip:
            torch.testing.assert_close(b, c, rtol=0, atol=1e-6 if b.is_floating_point() else 0)


def test_ssn_freezing_compiles_whole_and_matches_eager():
    torch._dynamo.reset()
    eager = net()
    compiled_model = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)

    # Before freezing: sparsestmax weights, the batch scope, the freezing check.
    assert_graph_whole(eager)
    for seed in (0, 1):
        compare(
            eager, compiled_model, step(eager, eager, seed), step(compiled_model, compiled, seed)
        )
    assert [m.frozen_scopes for m in (compiled_model[1], compiled_model[4])] == [(None, None)] * 2

    # The freezing step: both layers' weights become one-hot and are recorded on the device.
    syncsn.set_radius(eager, 1.0)
    syncsn.set_radius(compiled_model, 1.0)
    before = compiled_model[1].num_batches_tracked.clone()
    # The kernels freeze during the call, so eager and compiled alike still fold this batch
    # into the (from now on unused) running statistics of the layer that froze off BN.
    off_bn = {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    compare(eager, compiled_model, step(eager, eager, 2), step(compiled_model, compiled, 2))
    assert compiled_model[1].num_batches_tracked == before + 1
    assert eager[1].num_batches_tracked == before + 1
    for layer, expected in ((compiled_model[1], ("in", "ln")), (compiled_model[4], ("bn", "in"))):
        assert layer.frozen_scopes == expected
    assert counter.frame_count == 1

    # Frozen: one recompile for the settled layers, then the off-BN layer has no batch scope.
    assert_graph_whole(eager)
    running = {n: b.clone() for n, b in compiled_model.named_buffers() if n in off_bn}
    for seed in (3, 4):
        y_eager, y_compiled = step(eager, eager, seed), step(compiled_model, compiled, seed)
        compare(eager, compiled_model, y_eager, y_compiled, off_bn)
    for name, b in compiled_model.named_buffers():
        if name in running:
            assert torch.equal(b, running[name]), name
    assert counter.frame_count == 2
