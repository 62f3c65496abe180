"""Training a small conv net in DistributedDataParallel with synchronized normalization.

Two gloo ranks with uneven per-rank batches train five SGD steps; after every step the
parameters and buffers must be identical on both ranks and equal (float64, 1e-10) to
single-process training of the same net, with the local layer, on the full batch.

Loss scaling. The reference minimizes the mean cross-entropy over the N samples of the full
batch. A Sync layer's contract is that the gradients of the per-rank losses *sum* over the
ranks to the gradient of their sum, and DDP *averages* the per-rank gradients over the W
ranks. So rank r uses loss_r = W / N * (sum of its samples' cross-entropies): the average
over ranks of grad(loss_r) is 1 / N * grad(sum over all samples) = the full-batch gradient,
whatever the split (a plain per-rank mean would weight the lone sample of a 3 + 1 split
three times as much as each of the others).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as TF
from dist_world import DistWorld, subgroup
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import syncsn

pytestmark = pytest.mark.timeout(180)

WORLD = 2
STEPS = 5
CHANNELS, CLASSES, SIZE = 3, 4, 6
# name -> (synchronized layer, the local layer it must match on the full batch)
NORMS = {
    "switchnorm": (syncsn.SyncSwitchNorm2d, syncsn.SwitchNorm2d),
    "batchnorm": (syncsn.SyncBatchNorm, nn.BatchNorm2d),
}
# No buffer broadcast before each forward: the running statistics must agree because the
# layers synchronize them, not because DDP copies rank 0's over the others every step.
# (Newer torch renames broadcast_buffers; both keep the one sync at construction.)
if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
    NO_BUFFER_SYNC = {"forward_sync_buffers": False}
else:
    NO_BUFFER_SYNC = {"broadcast_buffers": False}


@pytest.fixture(scope="module")
def world2():
    """Two gloo ranks for this module (DDP here needs no more)."""
    w = DistWorld(WORLD)
    yield w
    w.close()


def make_net(norm, **norm_kw) -> nn.Module:
    """conv - norm - relu - conv - norm - global average pool - linear, on (N, 3, 6, 6)."""
    return nn.Sequential(
        nn.Conv2d(CHANNELS, 5, 3, padding=1),
        norm(5, **norm_kw),
        nn.ReLU(),
        nn.Conv2d(5, 6, 3, padding=1),
        norm(6, **norm_kw),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, CLASSES),
    ).double()


def make_data(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(4, CHANNELS, SIZE, SIZE, generator=g, dtype=torch.float64) * 2 + 1,
            torch.randint(0, CLASSES, (4,), generator=g),
        )
        for _ in range(STEPS)
    ]


def make_optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in net.state_dict().items()}


def _train_case(rank, norm_name, init, data, split):
    group = subgroup(WORLD)
    net = make_net(NORMS[norm_name][0], process_group=group)
    net.load_state_dict(init)
    model = DistributedDataParallel(net, process_group=group, **NO_BUFFER_SYNC)
    opt = make_optimizer(model)
    lo = sum(split[:rank])
    hi = lo + split[rank]
    total = sum(split)
    states = []
    for x, target in data:
        opt.zero_grad()
        logits = model(x[lo:hi])
        loss = TF.cross_entropy(logits, target[lo:hi], reduction="sum") * (WORLD / total)
        loss.backward()
        opt.step()
        states.append(snapshot(net))
    return states


def train_reference(norm_name, init, data):
    net = make_net(NORMS[norm_name][1])
    net.load_state_dict(init)
    opt = make_optimizer(net)
    states = []
    for x, target in data:
        opt.zero_grad()
        TF.cross_entropy(net(x), target).backward()
        opt.step()
        states.append(snapshot(net))
    return states


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("split", [(3, 1), (4, 0)], ids=["3+1", "4+0"])
@pytest.mark.parametrize("norm_name", ["switchnorm", "batchnorm"])
def test_ddp_training_matches_single_process_full_batch(world2, norm_name, split):
    torch.manual_seed(0)
    init = snapshot(make_net(NORMS[norm_name][1]))
    data = make_data(seed=1)
    results = world2.run(_train_case, norm_name, init, data, split, timeout=120)
    expected = train_reference(norm_name, init, data)
    assert len(results[0]) == len(results[1]) == STEPS
    worst = 0.0
    for step, (mine, other, ref) in enumerate(zip(*results, expected, strict=True)):
        assert mine.keys() == other.keys() == ref.keys()
        for name in ref:
            assert torch.equal(mine[name], other[name]), (step, name)  # identical on both ranks
            if name.endswith("num_batches_tracked"):
                assert int(mine[name]) == int(ref[name]) == step + 1, (step, name)
            else:
                err = rel_err(mine[name], ref[name])
                worst = max(worst, err)
                assert err <= 1e-10, (step, name, err)
    # The net has really trained: the parameters moved well away from their start.
    assert rel_err(expected[-1]["0.weight"], init["0.weight"]) > 1e-2
    print(f"{norm_name} split {split}: worst relative error over {STEPS} steps {worst:.2e}")
