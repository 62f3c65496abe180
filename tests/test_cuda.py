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
from torch.utils._python_dispatch import TorchDispatchMode

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


# --- the Triton backend on CUDA: selection, launches, no host synchronization, CUDA graphs ---


def _small_net(kind: str, channels: int = 8) -> torch.nn.Module:
    """A conv net with two normalization layers of ``kind`` (the unit of the graph checks)."""
    from syncsn.sparse_switchnorm import SparseSwitchNorm2d

    norm = {
        "sn": lambda: syncsn.SwitchNorm2d(channels),
        "sync_sn": lambda: syncsn.SyncSwitchNorm2d(channels),  # no process group: world 1
        "sync_bn": lambda: syncsn.SyncBatchNorm(channels),
        "ssn": lambda: SparseSwitchNorm2d(channels),
    }[kind]
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, channels, 3, padding=1, bias=False),
        norm(),
        torch.nn.ReLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        norm(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(channels, 4),
    )


NET_KINDS = ["sn", "sync_sn", "sync_bn", "ssn"]


def _train_step(net, opt, x, target):
    opt.zero_grad(set_to_none=False)
    loss = torch.nn.functional.cross_entropy(net(x), target)
    loss.backward()
    opt.step()
    return loss


def _batch(n: int, seed: int = 0, size: int = 12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g).cuda()
    return x, torch.randint(0, 4, (n,), generator=g).cuda()


def test_triton_backend_is_selected_on_cuda(monkeypatch):
    from syncsn import kernels

    monkeypatch.delenv("SYNCSN_BACKEND", raising=False)
    monkeypatch.delenv("SYNCSN_NATIVE", raising=False)
    x = torch.randn(2, 3, 4, 4, device="cuda")
    assert kernels.passes_backend(x).name == "triton"
    assert (
        kernels.passes_backend(x.half().contiguous(memory_format=torch.channels_last)).name
        == "triton"
    )
    assert kernels.shared_backend("cuda").name == "triton"
    assert kernels.passes_backend(x.double()).name == "torch"


def _cuda_kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA" and "emcpy" not in e.name]


FORWARD_KERNELS = {"stats_kernel", "merge_kernel", "sn_output_kernel", "bn_output_kernel"}
BACKWARD_KERNELS = {"sn_reduce_kernel", "bn_reduce_kernel", "sn_input_kernel", "bn_input_kernel"}


@pytest.mark.parametrize("kind", ["sn", "sync_bn", "ssn"])
def test_layer_kernels_per_training_call_on_cuda(kind):
    """The layer's own kernels: statistics, merge, output forward; reduction, input
    gradient backward (the profiler also lists torch's kernels around them: the softmax of
    the switch logits, the clone of the merge's check, the gradient accumulation)."""
    layer = _small_net(kind)[1].cuda()
    x = torch.randn(2, 8, 16, 16, device="cuda", requires_grad=True)
    layer(x).sum().backward()  # compile and warm up
    holder = {}
    fwd = _cuda_kernels(lambda: holder.update(y=layer(x)))
    bwd = _cuda_kernels(lambda: holder["y"].backward(torch.ones_like(holder["y"])))
    # (Older Triton releases append the specialization to a kernel's name.)
    ours_f = [k for k in fwd if any(k == n or k.startswith(n + "_") for n in FORWARD_KERNELS)]
    ours_b = [k for k in bwd if any(k == n or k.startswith(n + "_") for n in BACKWARD_KERNELS)]
    print(f"{kind}: forward kernels {fwd}; backward kernels {bwd}")
    assert len(ours_f) == 3, fwd
    assert len(ours_b) == 2, bwd


WHOLE_CALL = {
    "sn": (lambda: syncsn.SwitchNorm2d(8), (2, 8, 16, 16)),
    "sn1d": (lambda: syncsn.SwitchNorm1d(8), (4, 8)),  # two scopes
    "sn_no_bn": (lambda: syncsn.SwitchNorm2d(8, using_bn=False), (2, 8, 16, 16)),
    "sync_sn": (lambda: syncsn.SyncSwitchNorm2d(8), (2, 8, 16, 16)),
    "sync_bn": (lambda: syncsn.SyncBatchNorm(8), (2, 8, 16, 16)),
    "ssn_frozen": (lambda: _frozen_ssn(8), (2, 8, 16, 16)),  # settled on (BN, IN)
    "ssn": (lambda: _pushed_ssn(syncsn.SparseSwitchNorm2d(8)), (2, 8, 16, 16)),  # not settled
    "sync_ssn": (lambda: _pushed_ssn(syncsn.SyncSparseSwitchNorm2d(8)), (2, 8, 16, 16)),
}


def _pushed_ssn(layer: torch.nn.Module) -> torch.nn.Module:
    """An SSN layer whose sparsestmax weights are pushed but not one-hot (radius 0.3)."""
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.3, 0.1, -0.2]))
        layer.var_weight.copy_(torch.tensor([0.0, 0.5, 0.45]))
    syncsn.set_radius(layer, 0.3)
    return layer


def _frozen_ssn(channels: int) -> torch.nn.Module:
    """An SSN layer whose weights become one-hot in its first training call."""
    from syncsn.sparse_switchnorm import SparseSwitchNorm2d

    layer = SparseSwitchNorm2d(channels)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.0, 0.1, 0.4]))
        layer.var_weight.copy_(torch.tensor([0.4, 0.1, 0.05]))
    syncsn.set_radius(layer, 1.0)
    return layer


@pytest.mark.parametrize("kind", WHOLE_CALL)
def test_whole_layer_call_is_at_most_three_kernels_each_way_on_cuda(kind):
    """Every kernel a training call launches, the layer's and any torch op around it (the
    host copy of the merge's flags is a memcpy, not counted): at most three each way."""
    make, shape = WHOLE_CALL[kind]
    layer = make().cuda()
    x = torch.randn(shape, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    for _ in range(3):  # compile and warm up (an SSN layer's host learns it froze a step late)
        layer(x).backward(dy)
    if kind == "ssn_frozen":
        assert layer._reads().settled is not None, layer.frozen_scopes
    elif "ssn" in kind:
        assert layer.frozen_scopes == (None, None)
    layer.zero_grad(set_to_none=True)  # as an optimizer does: no accumulation kernels
    x.grad = None
    holder = {}
    fwd = _cuda_kernels(lambda: holder.update(y=layer(x)))
    bwd = _cuda_kernels(lambda: holder["y"].backward(dy))
    print(f"{kind}: forward kernels {fwd}; backward kernels {bwd}")
    assert len(fwd) <= 3, fwd
    assert len(bwd) <= 3, bwd


class _NoHostReads(TorchDispatchMode):
    """Fails on the ops that read a device value on the host."""

    FORBIDDEN = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().split(".")[0] in self.FORBIDDEN:
            raise AssertionError(f"host read of a device value: {func.name()}")
        return func(*args, **(kwargs or {}))


def _no_sync(steps):
    """Run ``steps()`` with torch's CUDA sync debug mode on "error" and host reads refused."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with _NoHostReads():
            steps()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("batch", [2, 1], ids=["2-images", "1-image"])
@pytest.mark.parametrize("kind", NET_KINDS)
def test_training_steps_make_no_host_synchronization(kind, batch):
    """Training steps on the GPU never wait for it. With one image, the BN scope of SN has a
    global count of 1: the error comes from the device check, one step late."""
    from syncsn.sparse_switchnorm import set_radius

    torch.manual_seed(0)
    net = _small_net(kind).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, target = _batch(batch)
    too_few = batch == 1 and kind != "sync_bn"
    if too_few:
        _no_sync(lambda: _train_step(net, opt, x, target))  # the flag is read a step late
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            _train_step(net, opt, x, target)
        return
    _train_step(net, opt, x, target)  # compilation and first allocations

    def steps():
        for _ in range(3):
            _train_step(net, opt, x, target)
        if kind == "ssn":  # then freeze every SSN layer (a one-hot selection) and go on
            set_radius(net, 1.0)
            for _ in range(3):
                _train_step(net, opt, x, target)

    _no_sync(steps)
    if kind == "ssn":
        frozen = [int(m.frozen_mean) for m in net.modules() if hasattr(m, "frozen_mean")]
        assert all(f >= 0 for f in frozen), frozen


@pytest.mark.parametrize("kind", NET_KINDS)
def test_training_step_in_a_cuda_graph_matches_eager(kind, monkeypatch):
    """A whole training step (forward, backward, SGD step) captured once and replayed gives
    the parameters and running statistics of the same steps run eagerly."""
    import copy

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch.manual_seed(0)
    net = _small_net(kind).cuda()
    eager = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    batches = [_batch(4, seed) for seed in range(6)]
    static_x, static_t = batches[0][0].clone(), batches[0][1].clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as CUDA graphs require
        for x, t in batches[:3]:
            static_x.copy_(x)
            static_t.copy_(t)
            _train_step(net, opt, static_x, static_t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _train_step(net, opt, static_x, static_t)
    for x, t in batches[3:]:
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
    torch.cuda.synchronize()

    for x, t in batches:
        loss = _train_step(eager, eager_opt, x, t)
    assert torch.allclose(static_loss, loss, rtol=1e-4, atol=1e-5), (static_loss, loss)
    for (name, a), (_, b) in zip(net.state_dict().items(), eager.state_dict().items(), strict=True):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
        else:
            assert torch.equal(a, b), name


def test_compile_reduce_overhead_matches_eager():
    """torch.compile(mode="reduce-overhead") (CUDA graphs through inductor) of a net with
    every layer type: the same losses and parameters as eager, three steps."""
    import copy

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), syncsn.SwitchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), syncsn.SyncSwitchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), syncsn.SyncBatchNorm(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), _small_net("ssn")[1], torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    ).cuda()  # fmt: skip
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, mode="reduce-overhead")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.05)
    for seed in range(4):
        x, t = _batch(4, seed)
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(compiled(x), t)
        loss.backward()
        opt.step()
        ref = _train_step(eager, eager_opt, x, t)
        assert torch.allclose(loss, ref, rtol=1e-3, atol=1e-4), (seed, loss, ref)
    for (name, a), (_, b) in zip(net.state_dict().items(), eager.state_dict().items(), strict=True):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
