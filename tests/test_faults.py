"""Layer edges in one process: the meta device and a batch of one in eval mode without
running statistics, each against what torch's BatchNorm does, and the one-sample error read
a step late (as on CUDA) through the custom ops that compiled code calls.

The distributed side of these (a process group on the meta device, eval-mode counts per
rank, the one-sample error read a step late) is in test_sync_reliability.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import syncsn
import syncsn.function as function_module
from syncsn.kernels import ops

# name -> (layer class, input shape); the torch BatchNorm of the input's dimensionality is
# the reference.
LAYERS = {
    "SwitchNorm1d": (syncsn.SwitchNorm1d, (4, 6)),
    "SwitchNorm2d": (syncsn.SwitchNorm2d, (4, 6, 5, 3)),
    "SwitchNorm3d": (syncsn.SwitchNorm3d, (4, 6, 2, 3, 2)),
    "SyncSwitchNorm1d": (syncsn.SyncSwitchNorm1d, (4, 6)),
    "SyncSwitchNorm2d": (syncsn.SyncSwitchNorm2d, (4, 6, 5, 3)),
    "SyncSwitchNorm3d": (syncsn.SyncSwitchNorm3d, (4, 6, 2, 3, 2)),
    "SparseSwitchNorm1d": (syncsn.SparseSwitchNorm1d, (4, 6)),
    "SparseSwitchNorm2d": (syncsn.SparseSwitchNorm2d, (4, 6, 5, 3)),
    "SparseSwitchNorm3d": (syncsn.SparseSwitchNorm3d, (4, 6, 2, 3, 2)),
    "SyncSparseSwitchNorm1d": (syncsn.SyncSparseSwitchNorm1d, (4, 6)),
    "SyncSparseSwitchNorm2d": (syncsn.SyncSparseSwitchNorm2d, (4, 6, 5, 3)),
    "SyncSparseSwitchNorm3d": (syncsn.SyncSparseSwitchNorm3d, (4, 6, 2, 3, 2)),
    "SyncBatchNorm-1d": (syncsn.SyncBatchNorm, (4, 6)),
    "SyncBatchNorm-1d-NCL": (syncsn.SyncBatchNorm, (4, 6, 7)),
    "SyncBatchNorm-2d": (syncsn.SyncBatchNorm, (4, 6, 5, 3)),
    "SyncBatchNorm-3d": (syncsn.SyncBatchNorm, (4, 6, 2, 3, 2)),
}
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _meta_run(layer: nn.Module, x: torch.Tensor) -> dict[str, object]:
    """What a training or eval call on the meta device gives: the output, the input's
    gradient and every parameter's and buffer's device, shape and dtype."""
    y = layer(x)
    y.sum().backward()
    assert x.grad is not None
    seen: dict[str, object] = {"y": (y.device, y.shape, y.dtype, y.stride())}
    seen["dx"] = (x.grad.device, x.grad.shape, x.grad.dtype)
    for name, p in layer.named_parameters():
        if p.grad is not None:
            seen[f"d{name}"] = (p.grad.device, p.grad.shape, p.grad.dtype)
    for name, b in layer.named_buffers():
        seen[name] = (b.device, b.shape, b.dtype)
    return seen


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_device_gives_a_meta_output_as_torch_batchnorm_does(name, training, dtype):
    """Deferred initialization and shape inference run layers on the meta device, where
    nothing can be read: every layer, training or not, gives what torch's BatchNorm gives
    there (a meta output of the input's shape, dtype and layout, meta gradients) and keeps
    its buffers on the meta device."""
    cls, shape = LAYERS[name]
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    x = torch.empty(shape, device="meta", dtype=dtype).contiguous(memory_format=fmt)
    ours = _meta_run(cls(6, device="meta").train(training), x.clone().requires_grad_())
    reference = TORCH_BN[len(shape)](6, device="meta").train(training)
    expected = _meta_run(reference, x.clone().requires_grad_())
    for key, value in expected.items():
        assert ours[key] == value, (key, ours[key], value)
    for key, value in ours.items():  # the switch logits and SSN's buffers: meta too
        assert value[0] == torch.device("meta"), (key, value)


def test_meta_layers_in_a_model_build_and_then_materialize():
    """The deferred-initialization pattern: build and run on meta, then ``to_empty`` and
    reset, and the layers compute on real tensors as a freshly built model does."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5)

    def model(device: str) -> nn.Module:
        return nn.Sequential(
            syncsn.SyncSwitchNorm2d(4, device=device),
            syncsn.SparseSwitchNorm2d(4, device=device),
            syncsn.SyncBatchNorm(4, device=device),
        )

    lazy = model("meta")
    assert lazy(torch.empty(x.shape, device="meta")).is_meta
    lazy = lazy.to_empty(device="cpu")
    for layer in lazy:
        layer.reset_parameters()
    torch.testing.assert_close(lazy(x), model("cpu")(x), rtol=0, atol=0)


# -- a batch of one in eval mode, without running statistics ------------------------------------

# name -> (layer without running statistics, the smallest input shape per kind of count)
EVAL_LAYERS = {
    "SyncBatchNorm-1d": (lambda: syncsn.SyncBatchNorm(3, track_running_stats=False), (1, 3)),
    "SyncBatchNorm-2d": (
        lambda: syncsn.SyncBatchNorm(3, track_running_stats=False),
        (1, 3, 1, 1),
    ),
    "SwitchNorm1d": (lambda: syncsn.SwitchNorm1d(3, track_running_stats=False), (1, 3)),
    "SwitchNorm2d": (lambda: syncsn.SwitchNorm2d(3, track_running_stats=False), (1, 3, 2, 2)),
    "SyncSwitchNorm3d": (
        lambda: syncsn.SyncSwitchNorm3d(3, track_running_stats=False),
        (1, 3, 2, 2, 2),
    ),
    "SparseSwitchNorm1d": (
        lambda: syncsn.SparseSwitchNorm1d(3, track_running_stats=False),
        (1, 3),
    ),
    "SyncSparseSwitchNorm2d": (
        lambda: syncsn.SyncSparseSwitchNorm2d(3, track_running_stats=False),
        (1, 3, 2, 2),
    ),
}


@pytest.mark.parametrize("name", EVAL_LAYERS)
def test_one_value_per_channel_in_eval_without_running_stats_raises_as_torch_does(name):
    """Without running statistics a layer normalizes with the batch's statistics in eval
    mode too, so a batch of one is the same error as in training (torch's BatchNorm raises
    ValueError; SN's batch scope counts samples). The count is known from the shape: the
    error comes at once, on any device, and larger or empty batches are fine."""
    make, shape = EVAL_LAYERS[name]
    x = torch.randn(shape)
    if name.startswith("SyncBatchNorm"):
        reference = TORCH_BN[len(shape)](3, track_running_stats=False).eval()
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            reference(x)
    layer = make().eval()
    with pytest.raises(ValueError, match="more than 1 value per channel") as caught:
        layer(x)
    message = str(caught.value)
    assert type(layer).__name__ in message and "eval mode" in message, message
    assert "track_running_stats=False" in message, message
    unit = "value per channel" if name.startswith("SyncBatchNorm") else "sample"
    assert f"got a batch of 1 {unit}" in message, message
    # Two samples, or none, are fine; so is eval with running statistics.
    assert torch.isfinite(layer(torch.randn(2, *shape[1:]))).all()
    assert layer(torch.randn(0, *shape[1:])).shape == (0, *shape[1:])
    assert torch.isfinite(type(layer)(3).eval()(x)).all()


# -- the one-sample error read a step late, through the custom ops ------------------------------


class LateRead:
    """:class:`syncsn.deferred.DeferredRead` as it behaves on CUDA, on CPU tensors: each
    publication returns the value published before it; ``collect`` returns (and clears)
    the one still pending."""

    def __init__(self) -> None:
        self._pending = None

    def publish(self, value: torch.Tensor):
        due = self.collect()
        self._pending = value.tolist()
        return due

    def collect(self):
        due, self._pending = self._pending, None
        return due


class _Watching(TorchDispatchMode):
    """A dispatch mode that changes nothing: with it the layers call their steps through the
    custom ops, as compiled code does, instead of directly."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["SyncBatchNorm", "SwitchNorm2d"])
def test_a_late_error_through_the_custom_ops_folds_nothing_when_it_raises(name, monkeypatch):
    """What compiled code runs (the checks as ``syncsn::checked`` ops): the batch of one read
    a step late raises at the next training call, whose batch is not folded either."""
    monkeypatch.setattr(function_module, "DeferredRead", LateRead)
    layer = syncsn.SyncBatchNorm(3) if name == "SyncBatchNorm" else syncsn.SwitchNorm2d(3)
    spatial = () if name == "SyncBatchNorm" else (2, 2)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, *spatial, generator=g) for n in (2, 1, 2, 2)]
    raised, states = [], []
    for x in batches:
        with _Watching():
            assert not ops.plain_eager()
            try:
                layer(x)
                raised.append(None)
            except ValueError as err:
                raised.append(str(err))
        states.append({k: b.clone() for k, b in layer.named_buffers()})
    assert raised[:2] == [None, None] and raised[3] is None, raised
    assert raised[2] is not None and "in the previous training step" in raised[2], raised
    for k, value in states[0].items():
        assert torch.equal(states[1][k], value) and torch.equal(states[2][k], value), k
    assert int(states[3]["num_batches_tracked"]) == 2
