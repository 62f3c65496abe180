"""The synchronized layers on CUDA tensors: the equivalence and collective-count checks of
test_sync.py, with NCCL and with gloo.

Three set-ups, on a 2-process world started once for the module:

- ``nccl``: two ranks on two GPUs (skipped with fewer than two; NCCL refuses two ranks on
  one device);
- ``gloo``: two ranks sharing the first GPU, gloo moving the CUDA tensors through the host;
- ``nccl-1``: an NCCL group of rank 0 alone, where a Sync layer must equal the local layer
  and make no collective call.

Results come back to the parent as CPU tensors and are compared with the local layer on the
concatenated batch, on the CPU. Collectives are counted by the profiler's ``c10d::`` events,
which every backend records the same way.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist
from dist_world import DistWorld, subgroup
from test_sync import compare_to_concatenated, layer_results, make_batch, randomize_

import syncsn

pytestmark = [
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="CUDA tests need a GPU: torch.cuda.is_available() is False",
    ),
    pytest.mark.gpu,
    pytest.mark.timeout(300),
]

CASE_TIMEOUT = 120.0  # the first NCCL collective sets up a communicator: allow for it
C = 3
SPATIAL = (4, 5)
TWO_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL between two ranks needs two GPUs"
)
BACKENDS = [pytest.param("nccl", marks=TWO_GPUS), "gloo"]
SYNC = {"sn2d": syncsn.SyncSwitchNorm2d, "bn": syncsn.SyncBatchNorm}
LOCAL = {"sn2d": syncsn.SwitchNorm2d, "bn": torch.nn.BatchNorm2d}


@pytest.fixture(scope="module")
def world2():
    w = DistWorld(2)
    yield w
    w.close()


_groups: dict[str, dist.ProcessGroup] = {}


def setup(rank: int, backend: str) -> tuple[dist.ProcessGroup, torch.device] | None:
    """This rank's group and device for ``backend``; None when the rank is not in the group.

    Groups are made on first use, in a case that both ranks run, as group creation needs.
    """
    if backend == "nccl":
        device, members = torch.device("cuda", rank), [0, 1]
    elif backend == "gloo":
        device, members = torch.device("cuda", 0), None
    elif backend == "nccl-1":
        device, members = torch.device("cuda", 0), [0]
    else:
        raise ValueError(f"unknown backend {backend!r}")
    member = rank in (members or [0, 1])
    if member:
        torch.cuda.set_device(device)  # before NCCL sets up its communicator
    if backend not in _groups:
        if members is None:
            _groups[backend] = subgroup(2)  # the world's own gloo group
        else:
            _groups[backend] = dist.new_group(members, backend="nccl")
    return (_groups[backend], device) if member else None


def count_collectives(fn) -> Counter:
    """Run ``fn()`` and count the ``c10d::`` collectives it made (any backend)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return Counter(e.name for e in prof.events() if e.name.startswith("c10d::"))


def _equivalence_case(rank, backend, kind, xs, gs):
    where = setup(rank, backend)
    if where is None:
        return None
    group, device = where
    layer = SYNC[kind](C, process_group=group).to(device=device, dtype=xs[0].dtype)
    randomize_(layer, 7)
    out = None
    for _ in range(2):
        layer.zero_grad()
        out = layer_results(layer, xs[rank].to(device), gs[rank].to(device))
    assert out["y"].device == device
    return {name: t.cpu() for name, t in out.items()}


@pytest.mark.parametrize("split", [(3, 2), (4, 0)], ids=["3+2", "4+0"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["sn2d", "bn"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_on_cuda_equals_local_on_concatenated_batch(world2, backend, kind, dtype, split):
    xs, gs = make_batch(split, [SPATIAL] * 2, C, dtype, seed=len(kind) + split[1])
    results = world2.run(_equivalence_case, backend, kind, xs, gs, timeout=CASE_TIMEOUT)
    local = LOCAL[kind](C).to(dtype)
    randomize_(local, 7)
    compare_to_concatenated(results, local, xs, gs, dtype, steps=2)


@pytest.mark.parametrize("kind", ["sn2d", "bn"])
def test_nccl_group_of_one_equals_local_layer(world2, kind):
    xs, gs = make_batch([5, 0], [SPATIAL] * 2, C, torch.float64, seed=3)
    results = world2.run(_equivalence_case, "nccl-1", kind, xs, gs, timeout=CASE_TIMEOUT)
    assert results[1] is None
    local = LOCAL[kind](C).double()
    randomize_(local, 7)
    compare_to_concatenated(results[:1], local, xs[:1], gs[:1], torch.float64, steps=2)


def _count_case(rank, backend, kind, training):
    where = setup(rank, backend)
    if where is None:
        return None
    group, device = where
    layer = SYNC[kind](C, process_group=group).to(device).train(training)
    x = torch.randn(2, C, *SPATIAL, device=device, requires_grad=True)
    holder = {}
    fwd = count_collectives(lambda: holder.update(y=layer(x)))
    bwd = count_collectives(lambda: holder["y"].sum().backward())
    return dict(fwd), dict(bwd)


@pytest.mark.parametrize("kind", ["sn2d", "bn"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_collective_each_way_on_cuda(world2, backend, kind):
    for fwd, bwd in world2.run(_count_case, backend, kind, True, timeout=CASE_TIMEOUT):
        assert sum(fwd.values()) == 1 and "gather" in next(iter(fwd)), fwd
        assert sum(bwd.values()) == 1 and "allreduce" in next(iter(bwd)), bwd
    for fwd, bwd in world2.run(_count_case, backend, kind, False, timeout=CASE_TIMEOUT):
        assert fwd == {} and bwd == {}, (fwd, bwd)  # eval: no collective


@pytest.mark.parametrize("kind", ["sn2d", "bn"])
def test_no_collective_in_an_nccl_group_of_one(world2, kind):
    fwd, bwd = world2.run(_count_case, "nccl-1", kind, True, timeout=CASE_TIMEOUT)[0]
    assert fwd == {} and bwd == {}, (fwd, bwd)
