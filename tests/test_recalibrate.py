"""recalibrate against a float64 hand computation of pooled batch statistics, on 1 and 2 ranks.

Pooled over B equal-size batches: running_mean = mean of the batch means, running_var = mean
of the batch variances + (population) variance of the batch means, where a "batch variance"
is what the layer itself tracks: the unbiased pixel variance for BatchNorm, var_bn of the
SN specification for SwitchNorm2d, the unbiased variance over N for SwitchNorm1d.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from dist_world import DistWorld
from torch import Tensor, nn

import syncsn
from syncsn.recalibration import recalibrate

# The module, not the function the package exports under the same name.
recalibrate_module = importlib.import_module("syncsn.recalibration")

TOL = 1e-10  # float64 throughout


@pytest.fixture(scope="module")
def world():
    """Two gloo ranks for this module's distributed cases."""
    w = DistWorld(2)
    yield w
    w.close()


# --- hand computation -----------------------------------------------------------------------


def bn_batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance over every element of (N, C, *S)."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(dim=1), flat.var(dim=1, unbiased=True)


def sn_batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """SN's BN scope: mean of the instance means; mean of the unbiased instance variances
    plus the mean squared deviation of the instance means."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    a, b = flat.mean(dim=2), flat.var(dim=2, unbiased=True)
    mu = a.mean(dim=0)
    return mu, b.mean(dim=0) + ((a - mu) ** 2).mean(dim=0)


def sn1d_batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.mean(dim=0), x.var(dim=0, unbiased=True)


def pooled(stats: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    means = torch.stack([m for m, _ in stats])
    variances = torch.stack([v for _, v in stats])
    mean = means.mean(dim=0)
    return mean, variances.mean(dim=0) + ((means - mean) ** 2).mean(dim=0)


def rel_err(got: Tensor, expected: Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


# --- one process ----------------------------------------------------------------------------


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=0.3),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        syncsn.SwitchNorm2d(5, momentum=None),
        nn.ReLU(),
        syncsn.SyncBatchNorm(5),  # no process group: a local BatchNorm
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 6),
        syncsn.SwitchNorm1d(6, using_moving_average=False),
    ).double()


NORMS = {1: bn_batch_stats, 4: sn_batch_stats, 6: bn_batch_stats, 10: sn1d_batch_stats}


def layer_inputs(model: nn.Module, batches: list[Tensor]) -> dict[int, list[Tensor]]:
    """What each norm layer of ``model`` receives in train mode, batch by batch (on a copy)."""
    probe = copy.deepcopy(model).train()
    seen: dict[int, list[Tensor]] = {i: [] for i in NORMS}
    for i in NORMS:
        probe[i].register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0]))
    with torch.no_grad():
        for x in batches:
            probe(x)
    return seen


def batches_of(n: int, seed: int, shape=(3, 3, 9, 9)) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * (1 + i) + i for i in range(n)]


def test_pooled_statistics_of_four_batches() -> None:
    model = small_model()
    with torch.no_grad():
        for i in NORMS:
            model[i].running_mean.fill_(5.0)
    model.eval()
    model[1].train()
    xs = batches_of(6, seed=1)
    targets = [torch.zeros(3) for _ in xs]
    inputs = layer_inputs(model, xs[:4])

    # (input, target) pairs contribute their input; only the first 4 batches are used.
    assert recalibrate(model, list(zip(xs, targets, strict=True)), num_batches=4) is model

    for i, stats in NORMS.items():
        mean, var = pooled([stats(x) for x in inputs[i]])
        layer = model[i]
        assert rel_err(layer.running_mean, mean) <= TOL, i
        assert rel_err(layer.running_var, var) <= TOL, i
        assert layer.num_batches_tracked.item() == 4
    # Every module's mode and every layer's momentum are as they were.
    assert [m.training for m in model] == [i == 1 for i in range(len(model))]
    assert (model[1].momentum, model[4].momentum, model[6].momentum) == (0.3, None, 0.1)
    assert model[10].using_moving_average is False and model[4].using_moving_average is True
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model)


def test_fewer_batches_than_asked_for_warns() -> None:
    model = small_model()
    xs = batches_of(3, seed=2)
    inputs = layer_inputs(model, xs)
    with pytest.warns(UserWarning, match=r"only 3 batches .* num_batches=5"):
        recalibrate(model, iter(xs), num_batches=5, progress=False)
    mean, var = pooled([sn_batch_stats(x) for x in inputs[4]])
    assert rel_err(model[4].running_var, var) <= TOL
    assert model[4].num_batches_tracked.item() == 3


def test_non_finite_batch_is_left_out() -> None:
    layer = syncsn.SwitchNorm2d(3).double()
    xs = batches_of(3, seed=3)
    bad = xs[1].clone()
    bad[0, 0, 0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the layer's own notice
        recalibrate(layer, [xs[0], bad, xs[2]], num_batches=3, progress=False)
    mean, var = pooled([sn_batch_stats(xs[0]), sn_batch_stats(xs[2])])
    assert rel_err(layer.running_mean, mean) <= TOL and rel_err(layer.running_var, var) <= TOL
    assert layer.num_batches_tracked.item() == 2


def test_an_error_midway_restores_everything() -> None:
    model = small_model().eval()
    before = copy.deepcopy(model.state_dict())

    def failing():
        yield from batches_of(2, seed=4)
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        recalibrate(model, failing(), num_batches=5, progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(m.training for m in model)
    assert model[1].momentum == 0.3 and model[4].momentum is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model)


def test_plain_progress_without_tqdm(monkeypatch, capsys) -> None:
    real = recalibrate_module.importlib.util.find_spec
    monkeypatch.setattr(
        recalibrate_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tqdm" else real(name, *a),
    )
    recalibrate(syncsn.SwitchNorm2d(3).double(), batches_of(20, seed=5), num_batches=20)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"recalibrate: {k}/20 batches" for k in range(2, 21, 2)]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_batches must be at least 1, got 0"):
        recalibrate(syncsn.SwitchNorm2d(3), [], num_batches=0)
    with pytest.warns(UserWarning, match="no normalization layer with running statistics"):
        recalibrate(nn.Sequential(nn.Linear(2, 2), syncsn.SwitchNorm2d(2, using_bn=False)), [])


# --- two ranks ------------------------------------------------------------------------------


class Branches(nn.Module):
    """Three norm layers side by side on the raw input, so their inputs are known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.local_bn = nn.BatchNorm2d(3)
        self.sync_sn = syncsn.SyncSwitchNorm2d(3)
        self.sync_bn = syncsn.SyncBatchNorm(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.local_bn(x) + self.sync_sn(x) + self.sync_bn(x)


def _recalibrate_case(rank: int, per_rank: list[list[Tensor]], synchronize: bool) -> dict:
    model = Branches().double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recalibrate(model, per_rank[rank], num_batches=10, synchronize=synchronize)
    return {
        "buffers": {name: b.clone() for name, b in model.named_buffers()},
        "warnings": [str(w.message) for w in caught],
    }


@pytest.mark.timeout(400)  # includes starting the world on a busy machine
@pytest.mark.parametrize("batches_per_rank", [(4, 4), (4, 3)])
def test_two_ranks_against_hand_computation(world, batches_per_rank) -> None:
    per_rank = [
        batches_of(n, seed=10 + r, shape=(2, 3, 5, 6)) for r, n in enumerate(batches_per_rank)
    ]
    steps = min(batches_per_rank)  # the ranks agree on the shortest
    results = world.run(_recalibrate_case, per_rank, True, timeout=100)

    global_batches = [torch.cat([per_rank[0][b], per_rank[1][b]]) for b in range(steps)]
    expected = {
        "sync_sn": pooled([sn_batch_stats(x) for x in global_batches]),
        "sync_bn": pooled([bn_batch_stats(x) for x in global_batches]),
        # Local layers pool every batch of every rank.
        "local_bn": pooled([bn_batch_stats(x) for r in (0, 1) for x in per_rank[r][:steps]]),
    }
    counts = {"sync_sn": steps, "sync_bn": steps, "local_bn": 2 * steps}
    for name, (mean, var) in expected.items():
        for res in results:
            buffers = res["buffers"]
            assert rel_err(buffers[f"{name}.running_mean"], mean) <= TOL, name
            assert rel_err(buffers[f"{name}.running_var"], var) <= TOL, name
            assert buffers[f"{name}.num_batches_tracked"].item() == counts[name]
    for res in results:
        assert any(f"only {steps} batches" in w for w in res["warnings"])


@pytest.mark.timeout(400)  # includes starting the world on a busy machine
def test_two_ranks_without_synchronizing_local_layers(world) -> None:
    per_rank = [batches_of(4, seed=20 + r, shape=(2, 3, 5, 6)) for r in range(2)]
    results = world.run(_recalibrate_case, per_rank, False, timeout=100)
    for r, res in enumerate(results):
        mean, var = pooled([bn_batch_stats(x) for x in per_rank[r]])
        assert rel_err(res["buffers"]["local_bn.running_var"], var) <= TOL
        assert res["buffers"]["local_bn.num_batches_tracked"].item() == 4
    assert torch.equal(
        results[0]["buffers"]["sync_sn.running_var"], results[1]["buffers"]["sync_sn.running_var"]
    )
