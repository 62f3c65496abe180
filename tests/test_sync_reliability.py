"""Faults and corner cases of the synchronized layers on a 4-rank gloo world.

Every case runs on all four ranks as two independent pairs, {0, 1} and {2, 3}, made by
``create_sync_groups(2)``: each pair plays the scenario on its own data (often with the roles
of its two ranks swapped), so every case also checks that the pairs do not synchronize with
each other. A case that must raise catches the error on every rank and returns it, so the
parent sees what each rank raised and the world stays usable; a case that hangs fails by its
timeout instead of blocking the run.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from dist_world import count_collectives
from test_faults import LateRead
from test_sync import compare_to_concatenated, layer_results, make_batch, randomize_, rel_err
from torch.utils.checkpoint import checkpoint

import syncsn
import syncsn.function as function_module

pytestmark = pytest.mark.timeout(120)

CASE_TIMEOUT = 30.0  # seconds for one case on the world; every case here takes well under 1 s
C = 3
# kind -> (Sync layer, local layer on the concatenated batch, spatial shape of one sample)
KINDS = {
    "sn1d": (syncsn.SyncSwitchNorm1d, syncsn.SwitchNorm1d, ()),
    "sn2d": (syncsn.SyncSwitchNorm2d, syncsn.SwitchNorm2d, (4, 3)),
    "sn3d": (syncsn.SyncSwitchNorm3d, syncsn.SwitchNorm3d, (2, 2, 3)),
    "bn": (syncsn.SyncBatchNorm, torch.nn.BatchNorm2d, (4, 3)),
}

_pair_group: list = []


def pair(rank: int) -> tuple[dist.ProcessGroup, int, int]:
    """This rank's pair group, the pair's index (0 or 1) and the rank's index in its pair.

    Created on first use, which is a case that every rank runs, as group creation needs.
    """
    if not _pair_group:
        _pair_group.append(syncsn.create_sync_groups(2))
    return _pair_group[0], rank // 2, rank % 2


def sync_layer(kind: str, group: dist.ProcessGroup, num_features: int = C, **kw):
    return KINDS[kind][0](num_features, process_group=group, **kw).double()


def buffers(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in layer.named_buffers()}


@contextmanager
def debug_switch(value: str = "1"):
    """SYNCSN_DEBUG set for the block, restored afterwards (the world's processes are reused)."""
    old = os.environ.get("SYNCSN_DEBUG")
    os.environ["SYNCSN_DEBUG"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["SYNCSN_DEBUG"]
        else:
            os.environ["SYNCSN_DEBUG"] = old


def assert_pairs_agree(results: list, key) -> None:
    """Within each pair, ``key(result)`` is identical (bitwise) on both ranks."""
    for p in (0, 1):
        a, b = key(results[2 * p]), key(results[2 * p + 1])
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (p, name)


# -- empty global batch ------------------------------------------------------------------------


def _empty_case(rank, kind):
    group, _, _ = pair(rank)
    layer = sync_layer(kind, group)
    randomize_(layer, 1)
    with torch.no_grad():  # non-trivial running statistics, the same on every rank
        layer.running_mean.copy_(torch.linspace(-1, 1, C))
        layer.running_var.copy_(torch.linspace(0.5, 2, C))
        layer.num_batches_tracked.fill_(7)
    before = buffers(layer)
    x = torch.zeros(0, C, *KINDS[kind][2], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    after = buffers(layer)
    return {"y": y.detach(), "dx": x.grad, "grads": grads, "before": before, "after": after}


@pytest.mark.parametrize("kind", ["sn1d", "sn2d", "sn3d", "bn"])
def test_all_ranks_empty_gives_empty_output_and_leaves_running_stats(world, kind):
    for res in world.run(_empty_case, kind, timeout=CASE_TIMEOUT):
        assert res["y"].shape == (0, C, *KINDS[kind][2])
        assert res["dx"] is not None and res["dx"].shape == res["y"].shape
        for name, b in res["before"].items():
            assert torch.equal(res["after"][name], b), name  # num_batches_tracked too
        for name, g in res["grads"].items():
            # The loss is an empty sum: every parameter gradient is exactly zero, not NaN.
            assert g is not None and torch.equal(g, torch.zeros_like(g)), (name, g)


# -- a global batch of one -------------------------------------------------------------------


def _count_case(rank, kind, sizes):
    group, p, i = pair(rank)
    # Pair 1 swaps the roles, so both the rank with the sample and the empty rank are tested
    # in either position of the group.
    n = sizes[i if p == 0 else 1 - i]
    spatial = () if kind == "bn" else KINDS[kind][2]  # SyncBatchNorm: one value per channel
    layer = sync_layer(kind, group)
    x = torch.randn(n, C, *spatial, dtype=torch.float64)
    try:
        layer(x)
    except ValueError as err:
        return str(err), int(layer.num_batches_tracked)
    return None, int(layer.num_batches_tracked)


@pytest.mark.parametrize("kind", ["sn1d", "sn2d", "bn"])
def test_global_count_of_one_raises_on_every_rank(world, kind):
    for message, tracked in world.run(_count_case, kind, (1, 0), timeout=CASE_TIMEOUT):
        assert message is not None, "a global batch of one value per channel must raise"
        assert "more than 1" in message and "got a global batch of 1" in message, message
        assert tracked == 0
    # Control: one sample on each rank is a global batch of two, which is fine.
    for message, tracked in world.run(_count_case, kind, (1, 1), timeout=CASE_TIMEOUT):
        assert message is None and tracked == 1, message


def _late_count_case(rank, kind, late):
    """Four training steps: a good batch, a global batch of one sample (value), two good
    batches; what each step raised and the running statistics after it."""
    group, p, i = pair(rank)
    spatial = () if kind == "bn" else KINDS[kind][2]
    saved = function_module.DeferredRead
    if late:
        function_module.DeferredRead = LateRead  # the layer's flags, read as on CUDA
    try:
        layer = sync_layer(kind, group)
        g = torch.Generator().manual_seed(rank)
        batches = [torch.randn(2, C, *spatial, dtype=torch.float64, generator=g) for _ in range(4)]
        batches[1] = batches[1][: 1 if i == p else 0]  # one sample on one rank of the pair
        errors, states = [], []
        for x in batches:
            try:
                layer(x).square().sum().backward()
                errors.append(None)
            except ValueError as err:
                errors.append(str(err))
            states.append(buffers(layer))
        return errors, states
    finally:
        function_module.DeferredRead = saved


@pytest.mark.parametrize("kind", ["sn1d", "sn2d", "bn"])
def test_a_global_count_of_one_read_a_step_late_folds_nothing_when_it_raises(world, kind):
    """On CUDA the merge's flags reach the host a step late: the global batch of one raises
    at the layer's next training call, on every rank. That call raises before it gathers or
    folds, so the running statistics when the error comes are those a CPU run has when it
    raises at once (the batch of one is never folded), bitwise on every rank; the step
    after the error trains normally."""
    at_once = world.run(_late_count_case, kind, False, timeout=CASE_TIMEOUT)
    late = world.run(_late_count_case, kind, True, timeout=CASE_TIMEOUT)
    for (errors, states), (late_errors, late_states) in zip(at_once, late, strict=True):
        assert errors[0] is None and errors[2:] == [None, None], errors
        assert "in this training step" in errors[1], errors[1]
        assert late_errors[:2] == [None, None] and late_errors[3] is None, late_errors
        assert "in the previous training step" in late_errors[2], late_errors[2]
        for message in (errors[1], late_errors[2]):
            assert "got a global batch of 1" in message, message
        # When the error comes, on either device: the statistics of the first step alone.
        for name, value in states[0].items():
            assert torch.equal(states[1][name], value), name
            assert torch.equal(late_states[1][name], value), name
            assert torch.equal(late_states[2][name], value), name
        assert int(states[0]["num_batches_tracked"]) == 1
        assert int(late_states[3]["num_batches_tracked"]) == 2
    for results in (at_once, late):
        assert_pairs_agree(
            results, lambda r: {f"{k}{s}": v for s, st in enumerate(r[1]) for k, v in st.items()}
        )


def _eval_count_case(rank, kind):
    """Eval mode without running statistics on the pair: one rank holds one sample (value),
    the other three; eval never communicates, so each rank checks its own batch."""
    group, p, i = pair(rank)
    spatial = () if kind == "bn" else KINDS[kind][2]
    layer = sync_layer(kind, group, track_running_stats=False).eval()
    x = torch.randn(1 if i == p else 3, C, *spatial, dtype=torch.float64)
    error = None
    calls = None
    try:
        calls = count_collectives(lambda: layer(x))
    except ValueError as err:
        error = str(err)
    return x.shape[0], error, calls


@pytest.mark.parametrize("kind", ["sn1d", "sn2d", "bn"])
def test_eval_without_running_stats_checks_each_ranks_own_batch(world, kind):
    for n, error, calls in world.run(_eval_count_case, kind, timeout=CASE_TIMEOUT):
        if n == 1:
            assert error is not None and "got a batch of 1" in error, error
            assert "eval mode" in error, error
        else:
            assert error is None and calls == {}, (error, calls)


# -- the meta device -----------------------------------------------------------------------------


def _meta_case(rank, kind):
    group, _, _ = pair(rank)
    spatial = KINDS[kind][2]
    layer = KINDS[kind][0](C, process_group=group, device="meta")
    x = torch.empty(2, C, *spatial, device="meta", requires_grad=True)
    holder = {}
    calls = count_collectives(lambda: holder.setdefault("y", layer(x)).sum().backward())
    y = holder["y"]
    return y.device.type, tuple(y.shape), x.grad.device.type, calls


@pytest.mark.parametrize("kind", ["sn1d", "sn2d", "sn3d", "bn"])
def test_sync_layers_on_the_meta_device_make_no_collective(world, kind):
    """Shape inference with a process group: a meta output and meta gradients, as on one
    rank, and no collective (there is nothing to exchange; gloo cannot send meta tensors)."""
    for y_device, shape, dx_device, calls in world.run(_meta_case, kind, timeout=CASE_TIMEOUT):
        assert (y_device, dx_device) == ("meta", "meta")
        assert shape == (2, C, *KINDS[kind][2])
        assert calls == {}, calls


# -- non-finite batch statistics ---------------------------------------------------------------


def _nonfinite_case(rank, kind, xs):
    group, p, i = pair(rank)
    net = torch.nn.Sequential(sync_layer(kind, group), sync_layer(kind, group))
    bad = p  # pair 0: its first rank holds the inf; pair 1: its second
    states = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            x = xs[i].clone()
            if i == bad:
                x.view(-1)[1] = float("inf")
            net(x.requires_grad_()).square().sum().backward()
            states.append([buffers(layer) for layer in net])
    # A finite step afterwards updates the statistics as if it were the first step.
    with torch.no_grad():
        net(xs[i])
    names = [type(layer).__name__ for layer in net]
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return {"states": states, "warned": warned, "names": names, "final": net.state_dict()}


@pytest.mark.parametrize("kind", ["sn1d", "sn2d", "bn"])
def test_nonfinite_statistics_skip_the_update_and_warn_once_per_layer(world, kind):
    sizes, spatial = [2, 3], KINDS[kind][2]
    xs, _ = make_batch(sizes, [spatial] * 2, C, torch.float64, seed=4)
    results = world.run(_nonfinite_case, kind, xs, timeout=CASE_TIMEOUT)
    fresh = sync_layer(kind, None)  # initial buffers: zeros, ones, 0
    for res in results:
        for state in res["states"]:
            for layer_state in state:
                for name, b in buffers(fresh).items():
                    assert torch.equal(layer_state[name], b), name
        # Both layers see non-finite statistics on both steps (the first layer's NaN output
        # feeds the second): one warning per layer, each naming its layer, is two in all.
        assert len(res["warned"]) == 2, res["warned"]
        for message in res["warned"]:
            assert res["names"][0] in message and "non-finite" in message, message
    assert_pairs_agree(results, lambda r: r["final"])

    local_cls = KINDS[kind][1]
    reference = torch.nn.Sequential(local_cls(C), local_cls(C)).double()
    with torch.no_grad():
        reference(torch.cat(xs))
    for res in results:
        got = res["final"]
        for name, ref in reference.state_dict().items():
            if name.endswith("num_batches_tracked"):
                assert int(got[name]) == 1, name
            elif name.endswith(("running_mean", "running_var")):
                # Absolute floor: after a BN layer the batch mean is zero up to rounding.
                torch.testing.assert_close(got[name], ref, rtol=1e-10, atol=1e-14, msg=name)


# -- SYNCSN_DEBUG: ranks that disagree on the layer ----------------------------------------------


def _debug_features_case(rank, kind):
    group, _, i = pair(rank)
    channels = C + i  # the second rank of each pair built its layer for one more channel
    layer = sync_layer(kind, group, channels)
    x = torch.randn(2, channels, *KINDS[kind][2], dtype=torch.float64)
    with debug_switch():
        try:
            layer(x)
        except RuntimeError as err:
            return f"{type(layer).__name__}({channels})", str(err)
    return f"{type(layer).__name__}({channels})", None


@pytest.mark.parametrize("kind", ["sn1d", "sn2d", "bn"])
def test_debug_different_num_features_raises_on_every_rank(world, kind):
    for layer_name, message in world.run(_debug_features_case, kind, timeout=CASE_TIMEOUT):
        assert message is not None, f"{layer_name}: no error on this rank"
        assert layer_name in message and "SYNCSN_DEBUG" in message, message


def _debug_order_case(rank, kind, swap):
    group, _, i = pair(rank)
    first, second = sync_layer(kind, group), sync_layer(kind, group)
    x = torch.randn(2, C, *KINDS[kind][2], dtype=torch.float64)
    order = [second, first] if swap and i == 1 else [first, second]
    plain = [layer(x) for layer in order]  # without the switch: no check
    with debug_switch():
        try:
            checked = [layer(x) for layer in order]
        except RuntimeError as err:
            return str(err)
    assert os.environ.get("SYNCSN_DEBUG") != "1"
    # The debug check changes nothing in the result.
    return [torch.equal(a, b) for a, b in zip(plain, checked, strict=True)]


@pytest.mark.parametrize("kind", ["sn2d", "bn"])
def test_debug_layers_called_in_a_different_order_raise_on_every_rank(world, kind):
    # Control: the same layers in the same order pass the check.
    for res in world.run(_debug_order_case, kind, False, timeout=CASE_TIMEOUT):
        assert res == [True, True], res
    name = type(sync_layer(kind, None)).__name__
    for message in world.run(_debug_order_case, kind, True, timeout=CASE_TIMEOUT):
        assert isinstance(message, str), "layers called in a different order were not detected"
        assert f"{name}({C})" in message and "SYNCSN_DEBUG" in message, message


def _debug_extra_layer_case(rank):
    group, _, i = pair(rank)
    if i == 0:
        # This rank builds one more Sync layer first (say, a model for evaluation or for
        # counting FLOPs, as training scripts often do on one rank only); it is never called.
        sync_layer("sn2d", None)
    model = torch.nn.Sequential(sync_layer("sn2d", group))
    if i == 1:
        sync_layer("sn2d", None)  # the same number of layers built on every rank again
    # Creation numbers now differ between the ranks; names identify the layers instead.
    syncsn.name_sync_layers(model)
    layer = model[0]
    x = torch.randn(2, C, 4, 3, dtype=torch.float64)
    with debug_switch():
        try:
            layer(x)
        except RuntimeError as err:
            return str(err)
    return None


def test_debug_accepts_the_same_layers_when_a_rank_built_an_extra_one(world):
    # The ranks call the same named layer (same type, same num_features); the debug check
    # must not report a disagreement although the creation numbers differ.
    for message in world.run(_debug_extra_layer_case, timeout=CASE_TIMEOUT):
        assert message is None, message


# -- SYNCSN_DEBUG: ranks that do not come, or come to a different call ----------------------------
#
# Each case makes fresh pair groups: a timeout leaves its group failed for good (every later
# check raises), as it should in a real run. The ranks play the scenario on a two-layer net; in
# pair 0 the first rank is the odd one out, in pair 1 the second.

DEBUG_TIMEOUT = 2.0  # seconds; SYNCSN_DEBUG_TIMEOUT for these cases (default 30)
SLACK = 3.0  # seconds past the timeout by which every rank must have raised (a busy machine)


@contextmanager
def debug_mode(timeout: float = DEBUG_TIMEOUT):
    """SYNCSN_DEBUG=1 with a short SYNCSN_DEBUG_TIMEOUT for the block."""
    old = os.environ.get("SYNCSN_DEBUG_TIMEOUT")
    os.environ["SYNCSN_DEBUG_TIMEOUT"] = str(timeout)
    try:
        with debug_switch():
            yield
    finally:
        if old is None:
            del os.environ["SYNCSN_DEBUG_TIMEOUT"]
        else:
            os.environ["SYNCSN_DEBUG_TIMEOUT"] = old


def fresh_pair_net(rank: int) -> tuple[torch.nn.Sequential, bool]:
    """SyncSwitchNorm2d '0' then SyncBatchNorm '1' on a new pair group, and whether this rank
    is the odd one out of its pair."""
    group = syncsn.create_sync_groups(2)
    net = torch.nn.Sequential(sync_layer("sn2d", group), sync_layer("bn", group))
    syncsn.name_sync_layers(net)
    return net, odd_one_out(rank)


def odd_one_out(rank: int) -> bool:
    return rank % 2 == rank // 2


def _input() -> torch.Tensor:
    return torch.randn(2, C, 4, 3, dtype=torch.float64)


def _outcome(fn) -> tuple[str | None, float]:
    """(the error fn raised, or None; seconds it took)."""
    start = time.monotonic()
    try:
        fn()
    except RuntimeError as err:
        return str(err), time.monotonic() - start
    return None, time.monotonic() - start


SN_LABEL, BN_LABEL = f"SyncSwitchNorm2d({C}) '0'", f"SyncBatchNorm({C}) '1'"


def _eval_train_case(rank):
    net, odd = fresh_pair_net(rank)
    x = _input()
    with debug_mode():
        if not odd:
            return _outcome(lambda: net(x.requires_grad_()).sum().backward())
        net.eval()  # forgotten model.train() after an evaluation on this rank

        def steps() -> None:
            # It goes on with its training steps in eval mode: no collective holds it up.
            deadline = time.monotonic() + 5 * DEBUG_TIMEOUT
            while time.monotonic() < deadline:
                net(x.requires_grad_()).sum().backward()
                time.sleep(0.05)

        return _outcome(steps)


def test_debug_eval_train_mismatch_raises_on_every_rank_in_bounded_time(world):
    for rank, (message, seconds) in enumerate(world.run(_eval_train_case, timeout=CASE_TIMEOUT)):
        odd = odd_one_out(rank)
        assert message is not None, f"rank {rank}: no error"
        # Both: the layer, the rank that did not come and the cause.
        evaluating = rank if odd else rank ^ 1
        assert SN_LABEL in message and f"rank {evaluating} did not come" in message, message
        assert "eval/train mismatch" in message and "eval mode" in message, message
        # The training rank gives up after the timeout; the evaluating one learns it at its
        # next Sync layer call after that (the two started within moments of each other).
        assert DEBUG_TIMEOUT - 0.5 <= seconds < DEBUG_TIMEOUT + SLACK, (rank, seconds)
        if odd:
            assert f"This rank (rank {rank}) had not come to call #0" in message, message


def _skip_case(rank, then):
    net, odd = fresh_pair_net(rank)
    x = _input()
    with debug_mode():
        if not odd:
            if then == "backward":
                return _outcome(lambda: net(x.requires_grad_()).sum().backward())
            with torch.no_grad():  # forward-only steps (recalibrating statistics, say)
                return _outcome(lambda: [net(x) for _ in range(2)])

        def skipping() -> None:
            # This rank does not call the last layer (its output is unused here).
            if then == "backward":
                net[0](x.requires_grad_()).sum().backward()
            elif then == "next step":
                with torch.no_grad():
                    for _ in range(2):
                        net[0](x)
            else:
                with torch.no_grad():
                    net[0](x)
                    time.sleep(DEBUG_TIMEOUT + 1)  # busy where no check sees it (data loading)
                    net[0](x)  # the next step's first layer

        return _outcome(skipping)


@pytest.mark.parametrize("then", ["backward", "next step"])
def test_debug_skipped_layer_is_reported_at_once_by_the_next_call(world, then):
    # The rank that skipped the last layer goes on to a call of its own: the backward
    # all-reduce of the first layer, or the next step's first layer. The ranks' calls #1
    # differ, so both raise at once, each naming every rank's call.
    for rank, (message, seconds) in enumerate(world.run(_skip_case, then, timeout=CASE_TIMEOUT)):
        assert message is not None, f"rank {rank}: no error"
        skipper = rank if odd_one_out(rank) else rank ^ 1
        calling = skipper ^ 1
        assert "not at the same Sync layer call (#1" in message, message
        assert f"rank {calling}: the training forward of {BN_LABEL}" in message, message
        if then == "backward":
            assert f"rank {skipper}: the backward all-reduce of" in message, message
            assert f"Rank {skipper} went on to the backward pass" in message, message
        else:
            assert f"rank {skipper}: the training forward of {SN_LABEL}" in message, message
        assert seconds < DEBUG_TIMEOUT, (rank, seconds)


def test_debug_skipped_layer_times_out_and_the_skipping_rank_learns_it_next(world):
    # The rank that skipped the last layer is busy where no check sees it: the waiting rank
    # gives up after the timeout naming it, and its next Sync layer call raises at once.
    results = world.run(_skip_case, "later", timeout=CASE_TIMEOUT)
    for rank, (message, seconds) in enumerate(results):
        odd = odd_one_out(rank)
        skipper = rank if odd else rank ^ 1
        assert message is not None, f"rank {rank}: no error"
        assert f"{BN_LABEL}: rank {skipper} did not come to this call (#1" in message, message
        assert "a skipped call" in message and "find_unused_parameters" in message, message
        if odd:
            learns = f"had not come to call #1; it is now at the training forward of {SN_LABEL}"
            assert learns in message, message
            assert DEBUG_TIMEOUT + 1 <= seconds < DEBUG_TIMEOUT + 1 + SLACK, (rank, seconds)
        else:
            assert DEBUG_TIMEOUT <= seconds < DEBUG_TIMEOUT + SLACK, (rank, seconds)


def _caught_case(rank):
    net, odd = fresh_pair_net(rank)
    x = _input()
    with debug_mode():
        if not odd:
            return _outcome(lambda: net(x))

        def carry_on() -> None:
            try:
                net[0](x[:, :-1])  # one channel short: this rank's own ValueError
            except ValueError:
                pass  # ...caught and ignored
            net[1](x)

        return _outcome(carry_on)


def test_debug_rank_that_catches_its_layers_error_and_moves_on(world):
    for rank, (message, seconds) in enumerate(world.run(_caught_case, timeout=CASE_TIMEOUT)):
        odd = odd_one_out(rank)
        me, other = (BN_LABEL, SN_LABEL) if odd else (SN_LABEL, BN_LABEL)
        assert message is not None, f"rank {rank}: no error"
        assert "not at the same Sync layer call (#0" in message, message
        assert f"rank {rank}: the training forward of {me}" in message, message
        assert f"rank {rank ^ 1}: the training forward of {other}" in message, message
        assert "exception caught" in message, message
        assert seconds < DEBUG_TIMEOUT, (rank, seconds)


def _solo_eval_case(rank):
    net, odd = fresh_pair_net(rank)
    x = _input()
    with debug_mode():
        start = time.monotonic()
        if odd:
            net.eval()
            with torch.no_grad():  # this rank evaluates alone
                for _ in range(3):
                    net(x)
            net.train()
        else:
            time.sleep(DEBUG_TIMEOUT / 2)  # the others are busy meanwhile
        evaluated = time.monotonic() - start
        net(x.requires_grad_()).sum().backward()  # then all train together
    return evaluated, x.grad


def test_debug_accepts_a_rank_that_evaluates_alone(world):
    results = world.run(_solo_eval_case, timeout=CASE_TIMEOUT)
    for rank, (evaluated, grad) in enumerate(results):
        if odd_one_out(rank):
            assert evaluated < DEBUG_TIMEOUT / 4, evaluated  # eval calls wait for no one
        assert grad is not None and torch.isfinite(grad).all()


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_debug_timeout_must_be_a_positive_number(monkeypatch, value):
    monkeypatch.setenv("SYNCSN_DEBUG_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"SYNCSN_DEBUG_TIMEOUT .* got '{value}'"):
        syncsn.comm.debug_timeout()
    monkeypatch.setenv("SYNCSN_DEBUG_TIMEOUT", "2.5")
    assert syncsn.comm.debug_timeout() == 2.5
    monkeypatch.delenv("SYNCSN_DEBUG_TIMEOUT")
    assert syncsn.comm.debug_timeout() == syncsn.comm.DEFAULT_DEBUG_TIMEOUT


# -- inputs that differ in requires_grad -------------------------------------------------------


def _requires_grad_case(rank, kind, xs, gs):
    group, p, i = pair(rank)
    layer = sync_layer(kind, group, affine=False)
    wants_grad = i == p  # pair 0: the first rank's input requires grad; pair 1: the second's
    x = xs[i].clone().requires_grad_(wants_grad)
    loss = (layer(x) * gs[i]).sum()
    if loss.requires_grad:  # what a generic training loop does
        loss.backward()
    return x.grad


@pytest.mark.parametrize("kind", ["bn", "sn2d"])
def test_inputs_differing_in_requires_grad_do_not_hang(world, kind):
    # SyncBatchNorm with affine=False has no parameter: nothing but the layer itself makes
    # the rank whose input does not require grad take part in the backward collective.
    xs, gs = make_batch([3, 2], [KINDS[kind][2]] * 2, C, torch.float64, seed=8)
    results = world.run(_requires_grad_case, kind, xs, gs, timeout=CASE_TIMEOUT)
    local = KINDS[kind][1](C, affine=False).double()
    x = torch.cat(xs).requires_grad_()
    (local(x) * torch.cat(gs)).sum().backward()
    expected = [x.grad[:3], x.grad[3:]]
    for rank, dx in enumerate(results):
        p, i = rank // 2, rank % 2
        if i == p:
            assert dx is not None and rel_err(dx, expected[i]) <= 1e-10, rank
        else:
            assert dx is None


# -- torch.utils.checkpoint ------------------------------------------------------------------


def _checkpoint_case(rank, kind, reentrant, xs, gs):
    group, _, i = pair(rank)
    out = {}
    for use_checkpoint in (False, True):
        layer = sync_layer(kind, group)
        randomize_(layer, 3)
        for _ in range(2):
            x = xs[i].clone().requires_grad_()
            if use_checkpoint:
                y = checkpoint(layer, x, use_reentrant=reentrant)
            else:
                y = layer(x)
            (y * gs[i]).sum().backward()
        grads = {name: p.grad for name, p in layer.named_parameters()}
        out[use_checkpoint] = {"dx": x.grad, **grads, **buffers(layer)}
    return out


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("kind", ["sn2d", "bn"])
def test_checkpoint_updates_running_stats_once_per_step(world, kind, reentrant):
    xs, gs = make_batch([2, 3], [KINDS[kind][2]] * 2, C, torch.float64, seed=9)
    for res in world.run(_checkpoint_case, kind, reentrant, xs, gs, timeout=CASE_TIMEOUT):
        plain, recomputed = res[False], res[True]
        assert int(plain["num_batches_tracked"]) == 2
        assert plain.keys() == recomputed.keys()
        for name in plain:
            if name.startswith(("running_", "num_batches")):
                assert torch.equal(recomputed[name], plain[name]), name
            else:
                assert rel_err(recomputed[name], plain[name]) <= 1e-10, name


# -- create_sync_groups --------------------------------------------------------------------------


def _groups_case(rank, kind, data):
    group, p, i = pair(rank)
    xs, gs = data[p]
    layer = sync_layer(kind, group)
    randomize_(layer, 5)
    out = None
    for _ in range(2):
        layer.zero_grad()
        out = layer_results(layer, xs[i], gs[i])
    return dist.get_world_size(group), dist.get_rank(group), out


@pytest.mark.parametrize("kind", ["sn2d", "bn"])
def test_create_sync_groups_syncs_within_each_pair(world, kind):
    spatial = KINDS[kind][2]
    # Different sizes and a different mean per pair: syncing across pairs could not pass.
    data = [
        make_batch([2, 1], [spatial] * 2, C, torch.float64, seed=20),
        make_batch([1, 3], [spatial] * 2, C, torch.float64, seed=21, mean=3.0),
    ]
    results = world.run(_groups_case, kind, data, timeout=CASE_TIMEOUT)
    assert [(size, r) for size, r, _ in results] == [(2, 0), (2, 1)] * 2
    for p in (0, 1):
        local = KINDS[kind][1](C).double()
        randomize_(local, 5)
        xs, gs = data[p]
        pair_results = [out for _, _, out in results[2 * p : 2 * p + 2]]
        compare_to_concatenated(pair_results, local, xs, gs, torch.float64, steps=2)
    assert not torch.allclose(results[0][2]["running_mean"], results[2][2]["running_mean"])


def _bad_group_size_case(rank, size):
    try:
        syncsn.create_sync_groups(size)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("size", [0, 3])
def test_create_sync_groups_rejects_a_size_that_does_not_divide_the_world(world, size):
    for message in world.run(_bad_group_size_case, size, timeout=CASE_TIMEOUT):
        assert message is not None and f"got {size}" in message and "4" in message, message
