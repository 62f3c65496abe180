"""No host synchronization in a training step, for every layer type.

On CUDA, ``.item()``, ``bool(tensor)``, ``int(tensor)``, whole-tensor comparisons
(``torch.equal``, ``torch.allclose``) and operations whose output size depends on the values
(``nonzero``, boolean masking, ``unique``) make the host wait until the device has caught up.
On CPU they do not wait, but they dispatch the same aten operations, and
:class:`NoHostSync` refuses those: a training step (forward, backward, optimizer step) that
runs under it makes none of them, on any device.

A layer's steps are ``syncsn`` custom ops, and a dispatch mode sees a custom op's call but
not the aten operations of its implementation. :class:`NoHostSync` therefore runs the Python
implementation of every ``syncsn`` op under itself, so that the operations inside are checked
too (test_a_sync_inside_a_syncsn_op_is_caught shows that a plain mode would miss them).

What no dispatch mode sees: ``Tensor.tolist()``, ``.numpy()`` and ``.cpu()`` of a CPU tensor
read its memory directly. The deferred reads of :mod:`syncsn.deferred` use them on purpose
(on CUDA they copy asynchronously and read the copy a step later).
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from dist_world import DistWorld, subgroup
from torch import nn
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

import syncsn
from syncsn.kernels import passes_backend
from syncsn.kernels import reference as reference_backend
from syncsn.kernels.reference import ReferenceBackend

pytestmark = pytest.mark.timeout(300)

# aten operations that read device values on the host, and what calls them. Inside a custom
# op's implementation (run below autograd) the composite ones (item, is_nonzero, argwhere...)
# arrive as they are; at the top level they arrive decomposed (item: _local_scalar_dense).
WAITS = {
    "_local_scalar_dense": ".item(), bool(), int() or float() of a tensor",
    "item": ".item(), int() or float() of a tensor",
    "is_nonzero": "bool() of a tensor",
    "equal": "torch.equal",
    "allclose": "torch.allclose",
    "nonzero": "nonzero: the output size depends on the values",
    "nonzero_numpy": "nonzero(as_tuple=True): the output size depends on the values",
    "argwhere": "argwhere: the output size depends on the values",
    "masked_select": "masked_select: the output size depends on the values",
    "_unique2": "unique: the output size depends on the values",
    "unique_dim": "unique: the output size depends on the values",
    "unique_consecutive": "unique_consecutive: the output size depends on the values",
    "bincount": "bincount: the output size depends on the values",
    "one_hot": "one_hot: checks the values' range on the host",
}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


class HostSyncError(AssertionError):
    """A training step did something that makes the host wait for the device."""


def _why_it_waits(func, args, kwargs) -> str | None:
    if func.namespace != "aten":
        return None
    op = func._opname
    if op in WAITS:
        return WAITS[op]
    if op in INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
            return "indexing with a boolean mask: the output size depends on the values"
    if op == "repeat_interleave" and kwargs.get("output_size") is None:
        if any(isinstance(a, torch.Tensor) for a in args):
            return "repeat_interleave with tensor repeats and no output_size"
    if op == "where" and len(args) == 1:
        return "where(condition): the output size depends on the values"
    if op == "narrow" and isinstance(args[2], torch.Tensor):
        return "narrow with a tensor start"
    return None


def _python_implementation(func) -> Callable:
    """The Python function a ``syncsn`` op was made from (torch.library.custom_op)."""
    opdef = _maybe_get_opdef(func._schema.name)
    implementation = getattr(opdef, "_init_fn", None)
    if implementation is None:
        raise HostSyncError(
            f"cannot look inside {func._schema.name}: no Python implementation registered "
            "with torch.library.custom_op; extend NoHostSync for it"
        )
    return implementation


class NoHostSync(TorchDispatchMode):
    """Fails on every aten operation that reads device values on the host.

    With ``look_inside`` (the default), each ``syncsn`` op runs as its Python implementation
    under this mode, so its own operations are checked; ``looked_inside`` counts those ops,
    ``checked`` the aten operations seen.
    """

    def __init__(self, look_inside: bool = True) -> None:
        super().__init__()
        self.look_inside = look_inside
        self.looked_inside: Counter[str] = Counter()
        self.checked = 0
        self._within: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if self.look_inside and func.namespace == "syncsn":
            implementation = _python_implementation(func)
            self.looked_inside[name] += 1
            self._within.append(name)
            try:
                with self:
                    return implementation(*args, **kwargs)
            finally:
                self._within.pop()
        self.checked += 1
        reason = _why_it_waits(func, args, kwargs)
        if reason is not None:
            where = f" inside {self._within[-1]}" if self._within else ""
            raise HostSyncError(f"{name}{where} reads device values on the host ({reason})")
        return func(*args, **kwargs)


# --- the mode itself -----------------------------------------------------------------------

x5 = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0])
SYNCS = {
    "item": lambda: x5.sum().item(),
    "bool": lambda: bool(x5.sum() > 0),
    "int": lambda: int(x5[0]),
    "if tensor": lambda: 1 if x5.max() > 1 else 0,
    "equal": lambda: torch.equal(x5, x5),
    "allclose": lambda: torch.allclose(x5, x5),
    "nonzero": lambda: x5.nonzero(),
    "mask": lambda: x5[x5 > 0],
    "masked assignment": lambda: x5.clone().__setitem__(x5 > 0, 0.0),
    "masked_select": lambda: torch.masked_select(x5, x5 > 0),
    "unique": lambda: torch.unique(x5),
}


@pytest.mark.parametrize("what", list(SYNCS))
def test_the_mode_fails_on_host_reads(what):
    with pytest.raises(HostSyncError, match="reads device values on the host"):
        with NoHostSync():
            SYNCS[what]()


def test_the_mode_lets_device_computations_through():
    x = x5.clone()
    with NoHostSync() as mode:
        y = torch.where(x > 0, x, 0).sum() + x.argmax() + torch.count_nonzero(x)
        x[torch.tensor([1, 3])] += 1.0  # integer indices: the size does not depend on values
    assert mode.checked > 0 and float(y) == 5.5 + 4 + 4
    assert x.tolist() == [0.5, 0.0, 2.0, 1.0, 3.0]


def _reading(method, sync):
    def wrapper(self, x, *args):
        sync()  # as a careless backend might
        return method(self, x, *args)

    return wrapper


@pytest.mark.parametrize("what", list(SYNCS))
def test_a_sync_inside_a_syncsn_op_is_caught(what, monkeypatch):
    monkeypatch.setenv("SYNCSN_BACKEND", "torch")
    stats = ReferenceBackend.sn_stats
    monkeypatch.setattr(ReferenceBackend, "sn_stats", _reading(stats, SYNCS[what]))
    model = conv_net(syncsn.SwitchNorm2d(4))
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(HostSyncError, match=r"inside syncsn::sn_stats reads device values"):
        with NoHostSync():
            model(x)
    # A dispatch mode that does not look inside the custom ops misses it.
    with NoHostSync(look_inside=False) as blind:
        model(x)
    assert blind.checked > 0 and not blind.looked_inside


# --- training steps --------------------------------------------------------------------------

TRITON_PRESENT = importlib.util.find_spec("syncsn.kernels.triton") is not None
BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(not TRITON_PRESENT, reason="triton backend not available"),
    ),
]


BACKEND_CLASSES = {"torch": "ReferenceBackend", "triton": "TritonBackend"}


def backend_env(backend: str) -> dict[str, str]:
    env = {"SYNCSN_BACKEND": backend}
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"  # CPU tensors run in Triton's interpreter
    return env


def backend_of(model: nn.Module, x: torch.Tensor) -> str:
    """The backend that ran the passes of ``model``'s norm layer on ``x``."""
    norm = model[1]
    return type(passes_backend(model[0](x), norm.weight, norm.bias)).__name__


def one_rank():
    """A process group of this process alone (None: no world, the layers compute locally)."""
    return subgroup(1) if dist.is_initialized() else None


def conv_net(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(4, 2, 1))


def mlp(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), norm, nn.ReLU(), nn.Linear(4, 2))


def set_logits_(layer: nn.Module, mean: list[float], var: list[float]) -> None:
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor(mean))
        layer.var_weight.copy_(torch.tensor(var))


def sparse_layer(make, state: str) -> nn.Module:
    """An SSN layer that stays sparse ("sparse"), or freezes in the first step: on IN / LN
    ("off_bn": no batch scope afterwards) or on BN / IN ("with_bn")."""
    layer = make()
    if state == "sparse":
        set_logits_(layer, [0.2, -0.1, 0.3], [0.0, 0.25, 0.1])
        syncsn.set_radius(layer, 0.3)
    elif state == "off_bn":
        set_logits_(layer, [0.4, 0.1, 0.05], [0.0, 0.4, 0.05])
        syncsn.set_radius(layer, 1.0)
    elif state == "with_bn":
        set_logits_(layer, [0.0, 0.1, 0.4], [0.4, 0.1, 0.05])
        syncsn.set_radius(layer, 1.0)
    else:
        raise ValueError(state)
    return layer


FROZEN = {"sparse": (None, None), "off_bn": ("in", "ln"), "with_bn": ("bn", "in")}


def train_under_the_mode(model: nn.Module, inputs: list[torch.Tensor]) -> NoHostSync:
    """Forward, backward and an SGD step per input, all under one :class:`NoHostSync`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    with NoHostSync() as mode:
        for x in inputs:
            out = model(x)
            loss = (out * out).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    return mode


def images(sizes: list[int], seed: int, features: int | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (features,) if features else (3, 5, 6)
    return [torch.randn(n, *shape, generator=g) for n in sizes]


SN_OPS = {"syncsn::sn_stats", "syncsn::sn_output", "syncsn::sn_backward_reduce"}
SN_OPS |= {"syncsn::sn_backward_input"}
BATCH_OPS = {"syncsn::merge", "syncsn::checked"}
BN_OPS = {"syncsn::bn_stats", "syncsn::bn_output", "syncsn::bn_backward_reduce"}
BN_OPS |= {"syncsn::bn_backward_input"} | BATCH_OPS

# name: (model, per-step batch sizes, the syncsn ops the steps must have made)
LOCAL_CASES = {
    "SwitchNorm2d": (lambda: conv_net(syncsn.SwitchNorm2d(4)), [2, 2, 2], SN_OPS | BATCH_OPS),
    # One image: legal without the batch scope.
    "SwitchNorm2d-no-bn": (
        lambda: conv_net(syncsn.SwitchNorm2d(4, using_bn=False)),
        [1, 1, 1],
        SN_OPS,
    ),
    "SyncSwitchNorm2d-world-1": (
        lambda: conv_net(syncsn.SyncSwitchNorm2d(4, process_group=one_rank())),
        [2, 2, 2],
        SN_OPS | BATCH_OPS,
    ),
    "SyncBatchNorm-world-1": (
        lambda: conv_net(syncsn.SyncBatchNorm(4, process_group=one_rank())),
        [2, 2, 2],
        BN_OPS,
    ),
    "SwitchNorm1d": (lambda: mlp(syncsn.SwitchNorm1d(4)), [2, 2, 2], SN_OPS | BATCH_OPS),
    "SparseSwitchNorm2d-sparse": (
        lambda: conv_net(sparse_layer(lambda: syncsn.SparseSwitchNorm2d(4), "sparse")),
        [2, 2, 2],
        SN_OPS | BATCH_OPS | {"syncsn::publish_frozen"},
    ),
    # Freezes in the first step (which still computes the batch scope, with weight 0), off
    # BN: one image per step from then on, which a batch scope would refuse.
    "SparseSwitchNorm2d-off-bn": (
        lambda: conv_net(sparse_layer(lambda: syncsn.SparseSwitchNorm2d(4), "off_bn")),
        [2, 1, 1],
        SN_OPS | BATCH_OPS | {"syncsn::publish_frozen"},
    ),
    "SparseSwitchNorm2d-with-bn": (
        lambda: conv_net(sparse_layer(lambda: syncsn.SparseSwitchNorm2d(4), "with_bn")),
        [2, 2, 2],
        SN_OPS | BATCH_OPS | {"syncsn::publish_frozen"},
    ),
}


def _local_case(rank, case):
    """One process's training steps of ``case``: the syncsn ops looked into, the aten
    operations checked, the frozen selections of the SSN layers."""
    if rank != 0:
        return None
    make, sizes, _ = LOCAL_CASES[case]
    torch.manual_seed(0)
    model = make()
    inputs = images(sizes, seed=1, features=3 if "1d" in case else None)
    mode = train_under_the_mode(model, inputs)
    frozen = [m.frozen_scopes for m in model.modules() if hasattr(m, "frozen_scopes")]
    return dict(mode.looked_inside), mode.checked, frozen, backend_of(model, inputs[0])


class InterpreterWorld(DistWorld):
    """Gloo ranks whose processes start with ``TRITON_INTERPRET=1``: Triton's interpreter
    must be on before Triton is first imported, so a process that started without it
    cannot run the Triton backend on CPU tensors. (The reference backend ignores it.)"""

    def _start(self) -> None:
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            super()._start()
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved


@pytest.fixture(scope="module")
def two_ranks():
    """Two gloo ranks (and a process with Triton's interpreter on, for the local cases)."""
    w = InterpreterWorld(2)
    yield w
    w.close()


def _with_backend(backend: str, fn, *args):
    saved = {key: os.environ.get(key) for key in ("SYNCSN_BACKEND", "TRITON_INTERPRET")}
    os.environ.update(backend_env(backend))
    try:
        return fn(*args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _local_case_on(rank, case, backend):
    return _with_backend(backend, _local_case, rank, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LOCAL_CASES))
def test_training_steps_make_no_host_sync(case, backend, monkeypatch, request):
    if backend == "torch":
        monkeypatch.setenv("SYNCSN_BACKEND", "torch")
        ops, checked, frozen, used = _local_case(0, case)
    else:  # in a process that started with Triton's interpreter on
        world = request.getfixturevalue("two_ranks")
        ops, checked, frozen, used = world.run(_local_case_on, case, backend, timeout=240)[0]
    assert used == BACKEND_CLASSES[backend]
    assert set(ops) == LOCAL_CASES[case][2]
    assert checked > 100
    if case.startswith("Sparse"):
        state = case.split("-", 1)[1].replace("-", "_")
        assert frozen == [FROZEN[state]]
        if state != "sparse":
            # Settled on the host in the first step: no sparsestmax, no read after it.
            assert ops["syncsn::publish_frozen"] == 1


# --- plain eager mode, which no dispatch mode sees ------------------------------------------
#
# In eager mode the layers call their steps directly (no custom op, no dispatcher), and any
# dispatch mode switches that path off. The profiler leaves it on: it records every aten
# operation the step dispatches, at any depth. Triton's interpreter copies the kernels'
# arguments with aten operations of its own; what runs inside a launch is left out, as the
# device would run it.

_WAIT_EVENTS = {f"aten::{op}" for op in WAITS}


def _host_reads(events, inside_launch: bool = False) -> list[str]:
    found = []
    for event in events:
        launch = inside_launch or event.name.startswith("triton:")
        if not launch and event.name in _WAIT_EVENTS:
            found.append(event.name)
        found += _host_reads(event.cpu_children, launch)
    return found


def _eager_case(rank, case):
    if rank != 0:
        return None
    from syncsn.kernels import triton_kernels

    launcher = type(triton_kernels.stats_kernel)
    original = launcher.run

    def run(self, *args, **kwargs):
        with torch.profiler.record_function("triton:" + self.__name__):
            return original(self, *args, **kwargs)

    launcher.run = run
    # The CUDA path: sparsestmax runs its rounds whole (on CPU it may stop early, reading a
    # device value that costs nothing there).
    reference_backend.STOP_EARLY_ON_CPU = False
    try:
        make, sizes, _ = LOCAL_CASES[case]
        torch.manual_seed(0)
        model = make()
        inputs = images(sizes, seed=1, features=3 if "1d" in case else None)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for x in inputs:
                loss = model(x).square().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        events = prof.events()
        roots = [e for e in events if e.cpu_parent is None]
        layer_ops = {e.name for e in events if e.name.startswith(("aten::", "triton:"))}
        return _host_reads(roots), len(layer_ops), backend_of(model, inputs[0])
    finally:
        launcher.run = original
        reference_backend.STOP_EARLY_ON_CPU = True


def _eager_case_on(rank, case, backend):
    return _with_backend(backend, _eager_case, rank, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LOCAL_CASES))
def test_eager_training_steps_make_no_host_sync(case, backend, two_ranks):
    """The same training steps in plain eager mode (the layers' direct path)."""
    reads, kinds, used = two_ranks.run(_eager_case_on, case, backend, timeout=240)[0]
    assert used == BACKEND_CLASSES[backend]
    assert kinds > 10  # the profiler saw the steps
    assert not reads, f"{case}: {reads}"


# --- on two gloo ranks, one image per rank -------------------------------------------------

RANK_CASES = {
    "SyncSwitchNorm2d": lambda g: syncsn.SyncSwitchNorm2d(4, process_group=g),
    "SyncBatchNorm": lambda g: syncsn.SyncBatchNorm(4, process_group=g),
    "SyncSparseSwitchNorm2d-sparse": lambda g: sparse_layer(
        lambda: syncsn.SyncSparseSwitchNorm2d(4, process_group=g), "sparse"
    ),
    "SyncSparseSwitchNorm2d-off-bn": lambda g: sparse_layer(
        lambda: syncsn.SyncSparseSwitchNorm2d(4, process_group=g), "off_bn"
    ),
}


def _rank_case(rank, k, case):
    if rank >= k:
        return None
    torch.manual_seed(0)  # the same parameters on every rank
    group = subgroup(k)
    net = conv_net(RANK_CASES[case](group))
    model = nn.parallel.DistributedDataParallel(net, process_group=group)
    inputs = images([1, 1, 1], seed=10 + rank)
    mode = train_under_the_mode(model, inputs)
    frozen = [m.frozen_scopes for m in net.modules() if hasattr(m, "frozen_scopes")]
    params = [p.detach() for p in net.parameters()]
    return dict(mode.looked_inside), frozen, params, backend_of(net, inputs[0])


def _rank_case_on(rank, k, case, backend):
    return _with_backend(backend, _rank_case, rank, k, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(RANK_CASES))
def test_training_steps_on_two_ranks_make_no_host_sync(two_ranks, case, backend):
    results = two_ranks.run(_rank_case_on, 2, case, backend, timeout=240)
    (ops, frozen, params, used), (ops_1, frozen_1, params_1, used_1) = results
    assert used == used_1 == BACKEND_CLASSES[backend]
    assert ops == ops_1 and frozen == frozen_1
    for a, b in zip(params, params_1, strict=True):
        assert torch.equal(a, b)  # DistributedDataParallel kept the ranks in step
    if case.endswith("off-bn"):
        # Frozen off BN in the first step (during the call, which still synchronizes its
        # batch scope); the host knows it after the step on CPU: no batch scope and no
        # collective in the other two.
        assert frozen == [("in", "ln")]
        assert ops["syncsn::publish_frozen"] == 1
        assert ops["syncsn::all_gather"] == ops["syncsn::all_reduce"] == ops["syncsn::merge"] == 1
    else:
        assert ops["syncsn::all_gather"] == 3 and ops["syncsn::all_reduce"] == 3
        assert frozen == ([(None, None)] if "Sparse" in case else [])
