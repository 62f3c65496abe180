"""Communication for the synchronized layers: process groups and the one collective per pass.

Every collective a Sync layer makes goes through this module, so a reader can see at a glance
what crosses the wire: one ``all_gather`` of a fixed-size statistics buffer in the forward
pass and one ``all_reduce`` of ``2 * C`` values in the backward pass. The checks of
``SYNCSN_DEBUG=1`` use a side channel instead, the default store (see
:func:`check_same_layer`).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from . import _env

__all__ = [
    "group_size",
    "all_gather_stacked",
    "all_reduce_sum_",
    "create_sync_groups",
    "debug_enabled",
    "debug_timeout",
    "DebugCheckError",
    "check_same_layer",
    "check_same_call",
    "layer_label",
    "next_layer_id",
    "name_sync_layers",
]

# torch renamed all_gather_into_tensor to all_gather_single; keep working on both.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_layer_ids = itertools.count()


def group_size(group: dist.ProcessGroup | None) -> int:
    """Number of ranks a Sync layer synchronizes over; 1 when torch.distributed is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_gather_stacked(buffer: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Gather a 1-D ``buffer`` (K,) from every rank into a (world, K) tensor, rank order.

    With a group of one rank this is ``buffer[None]`` and nothing is communicated.
    """
    world = group_size(group)
    if world == 1:
        return buffer.unsqueeze(0)
    out = buffer.new_empty(world * buffer.numel())
    _all_gather_flat(out, buffer.contiguous(), group=group)
    return out.view(world, buffer.numel())


def all_reduce_sum_(buffer: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum ``buffer`` over the group in place (no-op for a group of one rank)."""
    if group_size(group) > 1:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer


def create_sync_groups(group_size: int) -> dist.ProcessGroup:
    """Split the world into groups of ``group_size`` consecutive ranks; return this rank's.

    Must be called by every rank (creating a group is itself a collective). Typical use:
    synchronize normalization within a node of 8 GPUs, ``create_sync_groups(8)``.

    Args:
        group_size: ranks per group; a positive divisor of the world size.

    Returns:
        The group of ``group_size`` consecutive ranks that contains this rank.

    Example::

        >>> group = syncsn.create_sync_groups(8)  # after init_process_group, on every rank
        >>> model = syncsn.convert_sync_switchnorm(model, process_group=group)
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "create_sync_groups needs an initialized process group; call "
            "syncsn.distributed.init_distributed() (or torch.distributed.init_process_group) first"
        )
    world = dist.get_world_size()
    if group_size < 1 or world % group_size != 0:
        raise ValueError(
            f"group_size must be a positive divisor of the world size {world}, got {group_size}"
        )
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, group_size):
        group = dist.new_group(list(range(start, start + group_size)))
        if start <= rank < start + group_size:
            mine = group
    assert mine is not None
    return mine


def debug_enabled() -> bool:
    """True when ``SYNCSN_DEBUG=1``: Sync layers then cross-check their calls across ranks."""
    return _env.get("SYNCSN_DEBUG", "0") not in ("", "0")


DEFAULT_DEBUG_TIMEOUT = 30.0


def debug_timeout() -> float:
    """Seconds a SYNCSN_DEBUG check waits for the other ranks (``SYNCSN_DEBUG_TIMEOUT``).

    Default 30. Raise it when ranks legitimately drift further apart between Sync layer calls
    (one rank evaluating alone while the others already start the next step, say).
    """
    raw = os.environ.get("SYNCSN_DEBUG_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_DEBUG_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"SYNCSN_DEBUG_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def next_layer_id() -> int:
    """Creation number of a Sync layer in this process (its identity for SYNCSN_DEBUG)."""
    return next(_layer_ids)


def name_sync_layers(model: torch.nn.Module, prefix: str = "") -> torch.nn.Module:
    """Give every Sync layer in ``model`` its qualified name as identity for SYNCSN_DEBUG.

    Unnamed layers are identified by their creation number, which differs between ranks when
    one rank built extra Sync layers (an evaluation copy of the model, say). The converters
    name the layers of the model they return.

    Args:
        model: the model whose Sync layers are named (in place).
        prefix: prepended to every name, as in ``model.named_modules(prefix=...)``.

    Returns:
        ``model``.

    Example::

        >>> model = syncsn.name_sync_layers(build_model())  # before the first forward
    """
    for name, module in model.named_modules(prefix=prefix):
        if hasattr(module, "_sync_id"):
            module.sync_name = name or type(module).__name__
    return model


def sync_identity(layer: torch.nn.Module) -> str | int:
    """What reports call a Sync layer: its :func:`name_sync_layers` name, else its number."""
    # (From the instance's dict: a missing attribute would cost an AttributeError per call.)
    return vars(layer).get("sync_name", layer._sync_id)


# -- SYNCSN_DEBUG: matching up the ranks' calls through the store -----------------------------
#
# With SYNCSN_DEBUG=1 every training call of a Sync layer, every backward all-reduce and SSN's
# switch-weight check is a numbered call of its process group. Rank r posts its call #k in the
# default store (key s{k}/{r}: what it calls), waits until every rank of the group has posted #k
# and compares. The store, not the group's backend, carries this: a check is never paired with
# a statistics collective of another layer, it can give up after a timeout and say who is
# missing, and it works the same under gloo and NCCL (no device work, no host sync).
#
# Invariants that keep it correct and the store small: a rank posts #k only after every rank has
# posted #k-1, so every rank has finished reading #k-2 and the poster may delete its own #k-2
# entry. The verdict key v{k} settles atomically (compare_set) whether #k completed ("ok") or
# timed out, so no rank goes on into a collective while another gives up. A timeout leaves a
# "failed" record: the group's calls can no longer be matched up, and every later check of the
# group, in any mode, raises with it instead of waiting. Eval-mode calls make no collective and
# wait for no one (one rank may evaluate alone); they only leave a note (key e{r}) that a
# waiting rank quotes, and raise if the group has failed.

_SEP = "\x1f"
_FORWARD = "the training forward of"
_BACKWARD = "the backward all-reduce of"
_FAILED = "failed"
_POLL_MAX = 0.01  # seconds between two looks at the store while waiting


class DebugCheckError(RuntimeError):
    """Raised by a SYNCSN_DEBUG check: the ranks are not at the same call, or one is missing."""


@dataclass
class _Channel:
    """One process group's side channel: a prefixed view of the default store, and a count."""

    base: dist.Store
    store: dist.Store
    rank: int  # this rank's index in the group
    ranks: list[int]  # global rank of each index, for messages
    calls: int = 0  # calls this rank has posted: the number of its next one
    lock: threading.RLock = field(default_factory=threading.RLock)

    def name(self, index: int) -> str:
        return f"rank {self.ranks[index]}"


_channels: dict[str, _Channel] = {}


def _channel(group: dist.ProcessGroup | str | None) -> _Channel:
    if isinstance(group, str):  # a name, as the collective ops take it
        group = _resolve(group)
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    base = dist.distributed_c10d._get_default_store()
    chan = _channels.get(pg.group_name)
    # A new default store means a new process group with a reused name: start afresh.
    if chan is None or chan.base is not base:
        chan = _Channel(
            base,
            dist.PrefixStore(f"syncsn_debug/{pg.group_name}/", base),
            dist.get_rank(pg),
            dist.get_process_group_ranks(pg),
        )
        _channels[pg.group_name] = chan
    return chan


def layer_label(description: str, identity: int | str) -> str:
    """How SYNCSN_DEBUG names a layer: ``"SyncSwitchNorm2d(64) 'layer1.0.bn1'"`` or ``"... #3"``."""
    return (
        f"{description} '{identity}'" if isinstance(identity, str) else f"{description} #{identity}"
    )


def check_same_layer(
    description: str,
    identity: int | str,
    group: dist.ProcessGroup | str | None,
    device: torch.device | None = None,
    *,
    training: bool = True,
) -> None:
    """SYNCSN_DEBUG: raise on every rank, within a timeout, when the ranks are out of step.

    A Sync layer calls this, with ``SYNCSN_DEBUG=1`` only, on every call, before its forward
    collective and after its input checks. In training every rank of ``group`` must make the
    same call next: the same layer (description, name or creation number, see
    :func:`name_sync_layers`), in the same order, interleaved with the same backward
    all-reduces. The call waits up to :func:`debug_timeout` seconds for the others; ranks at a
    different call raise :class:`DebugCheckError` at once, naming every rank's call, and a rank
    that does not come raises it on the waiting ranks after the timeout, naming the missing
    ranks, what each did last (an eval-mode call: the eval/train mismatch) and the likely cause.
    After a timeout every later check of the group raises too, so a rank that skipped the
    layer learns it at its next Sync layer call instead of hanging. In eval mode (no
    collective) nothing waits: the call is noted for those messages.

    Without SYNCSN_DEBUG the same faults hang in the next collective until the process group's
    timeout. The checks go through the default store (one round trip or a few per call), not
    through ``device``; a call on the meta device (shape inference) makes no collective and
    is not checked.

    Args:
        description: the layer's type and width, e.g. ``"SyncSwitchNorm2d(64)"``.
        identity: its qualified name, or its creation number when unnamed.
        group: the process group it synchronizes over in training (None: the world), or
            its name (:func:`group_name`); the same in eval mode.
        device: the input's device (meta: nothing is checked).
        training: whether the layer is in training mode (and so synchronizes).

    Example::

        if comm.debug_enabled():
            comm.check_same_layer("SyncBatchNorm(64)", "layer1.0.bn1", group, x.device,
                                  training=self.training)
    """
    if torch.compiler.is_compiling() or (device is not None and device.type == "meta"):
        return  # (a meta input is shape inference: it makes no collective either)
    if isinstance(group, str):
        group = _resolve(group)
    if group_size(group) == 1:
        return
    layer = layer_label(description, identity)
    chan = _channel(group)
    if training:
        check_same_call(group, _FORWARD, layer)
        return
    with chan.lock:
        doing = f"at a call of {layer} in eval mode"
        _raise_if_failed(chan, doing, posted=None)
        chan.store.set(f"e{chan.rank}", f"{chan.calls}{_SEP}{layer}")


def check_same_call(
    group: dist.ProcessGroup | str | None, what: str, layer: str, detail: str = ""
) -> list[str]:
    """Post this rank's next call ``what layer`` on the side channel and wait for the others.

    Raises :class:`DebugCheckError` on every rank when the ranks' calls differ in ``what`` or
    ``layer``, or when a rank does not come within :func:`debug_timeout` seconds. Returns
    every rank's ``detail`` (group rank order) for the caller to compare.
    """
    chan = _channel(group)
    with chan.lock:
        return _exchange(chan, what, layer, detail)


def _exchange(chan: _Channel, what: str, layer: str, detail: str) -> list[str]:
    store, k, me = chan.store, chan.calls, chan.rank
    call = f"{what} {layer}"
    _raise_if_failed(chan, f"at {call}", posted=None)
    store.set(f"s{k}/{me}", f"{what}{_SEP}{layer}{_SEP}{detail}")
    if k >= 2:
        store.delete_key(f"s{k - 2}/{me}")
        if me == 0:
            store.delete_key(f"v{k - 2}")
    chan.calls = k + 1
    keys = [f"s{k}/{r}" for r in range(len(chan.ranks))]
    timeout = debug_timeout()
    deadline = time.monotonic() + timeout
    pause = 1e-4
    while not store.check(keys):
        if store.check([_FAILED]):
            _raise_if_failed(chan, f"at {call}", posted=k)
        if time.monotonic() >= deadline:
            mine = f"timeout {me}"
            verdict = store.compare_set(f"v{k}", "", mine).decode()
            if verdict == mine:
                message = _timeout_message(chan, k, call, timeout)
                store.set(_FAILED, f"{k}{_SEP}{message}")
                raise DebugCheckError(message)
            if verdict != "ok":
                _raise_if_failed(chan, f"at {call}", posted=k, wait=True)
            break  # the last rank came in the meantime
        time.sleep(pause)
        pause = min(2 * pause, _POLL_MAX)
    if store.compare_set(f"v{k}", "", "ok").decode() != "ok":
        # A rank gave up just before the last one came: fail with it.
        _raise_if_failed(chan, f"at {call}", posted=k, wait=True)
    multi_get = getattr(store, "multi_get", None)
    raw = multi_get(keys) if multi_get else [store.get(key) for key in keys]
    entries = [value.decode().split(_SEP, 2) for value in raw]
    if any((w, lay) != (what, layer) for w, lay, _ in entries):
        raise DebugCheckError(_mismatch_message(chan, k, call, entries))
    return [d for _, _, d in entries]


def _raise_if_failed(chan: _Channel, doing: str, posted: int | None, wait: bool = False) -> None:
    """Raise the group's failure record, if any, with what this rank is doing now.

    ``posted``: the call this rank is waiting at (None when it is not waiting). ``wait``: the
    verdict says a rank gave up; its record follows within moments.
    """
    if wait:
        give_up = time.monotonic() + 10.0
        while not chan.store.check([_FAILED]) and time.monotonic() < give_up:
            time.sleep(_POLL_MAX)
    if not chan.store.check([_FAILED]):
        if wait:
            raise DebugCheckError(
                "SYNCSN_DEBUG: another rank gave up waiting for the ranks of this process group "
                "but left no report (did it die?)"
            )
        return
    at, message = chan.store.get(_FAILED).decode().split(_SEP, 1)
    here = chan.name(chan.rank)
    if posted == int(at):
        context = f"This rank ({here}) was waiting at that call too."
    elif posted is None and chan.calls == int(at):
        context = f"This rank ({here}) had not come to call #{at}; it is now {doing}."
    else:
        context = f"This rank ({here}) is now {doing}."
    raise DebugCheckError(
        f"{message}\n{context} The Sync layer calls of this process group can no longer be "
        "matched up; every further check of the group raises this error: fix the cause and "
        "restart."
    )


def _timeout_message(chan: _Channel, k: int, call: str, timeout: float) -> str:
    store = chan.store
    everyone = range(len(chan.ranks))
    missing = [r for r in everyone if not store.check([f"s{k}/{r}"])]
    details, causes = [], set()
    for r in missing:
        note = f"e{r}"
        if store.check([note]):
            at, layer = store.get(note).decode().split(_SEP, 1)
            if int(at) == k:
                details.append(f"{chan.name(r)} last called {layer} in eval mode")
                causes.add("eval")
                continue
        previous = f"s{k - 1}/{r}"
        if k > 0 and store.check([previous]):
            what, layer = store.get(previous).decode().split(_SEP, 2)[:2]
            details.append(
                f"{chan.name(r)} last made call #{k - 1} ({what} {layer}), as this rank did"
            )
        else:
            details.append(f"{chan.name(r)} has made no call in this process group yet")
        causes.add("skip")
    why = []
    if "eval" in causes:
        why.append(
            "an eval/train mismatch: a rank calls the layers in eval mode (no collective) "
            "while the others train; put the model in the same mode on every rank (model.train() "
            "again after an evaluation on one rank)"
        )
    if "skip" in causes:
        why.append(
            "a skipped call: the rank did not call this layer (a branch some ranks do not take, a "
            "layer left unused under DistributedDataParallel(find_unused_parameters=True)), or "
            "raised an exception in a Sync layer that it caught and went on from; or it is busy "
            "elsewhere (inside another collective, or evaluating alone: wait for it with a "
            "barrier, or raise SYNCSN_DEBUG_TIMEOUT)"
        )
    ranks = ", ".join(chan.name(r) for r in missing)
    if not missing:  # the last rank came just after this one gave up
        ranks, details, why = "a rank", ["it came only as this rank gave up"], ["a slow rank"]
    return (
        f"SYNCSN_DEBUG: {call}: {ranks} did not come to this call (#{k} of the process "
        f"group) within {timeout:g} s (SYNCSN_DEBUG_TIMEOUT); {'; '.join(details)}. "
        f"Likely cause: {'; or '.join(why)}."
    )


def _mismatch_message(chan: _Channel, k: int, call: str, entries: list[list[str]]) -> str:
    per_rank = "; ".join(f"{chan.name(r)}: {w} {lay}" for r, (w, lay, _) in enumerate(entries))
    hint = ""
    ahead = [chan.name(r) for r, (w, _, _) in enumerate(entries) if w == _BACKWARD]
    if ahead and len(ahead) < len(entries):
        who = ", ".join(ahead)
        hint = (
            f" {who[0].upper()}{who[1:]} went on to the backward pass without the forward call the "
            "others make: a layer skipped there (under DistributedDataParallel(find_unused_"
            "parameters=True), say) or an exception in it caught and ignored."
        )
    return (
        f"SYNCSN_DEBUG: the ranks are not at the same Sync layer call (#{k} of the process "
        f"group): {per_rank}. This rank ({chan.name(chan.rank)}) is at {call}.{hint} Every rank of "
        "the process group must call the same Sync layers, with the same num_features, in the "
        "same order; a rank that skips a layer (a branch not taken, an exception caught and "
        "ignored) or builds the model differently breaks this. (Unnamed layers are told apart "
        "by creation number '#k'; if ranks build different numbers of Sync layers, name them "
        "with syncsn.name_sync_layers(model).)"
    )


# --- the layers' collectives, as ops the compiler traces ----------------------------------
#
# A layer names its process group by ``group_name`` (a string, which torch.compile and
# torch.export carry as a constant); the ops resolve it at run time. In plain eager mode the
# same functions run without the op around them.


def group_name(group: dist.ProcessGroup | None) -> str:
    """The name the collective ops below resolve ``group`` by (None: the default group)."""
    if group is None:
        group = dist.distributed_c10d._get_default_group()
    return group.group_name


def _resolve(name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(name)  # type: ignore[arg-type]


def _gather(buffer: Tensor, group: str, world: int) -> Tensor:
    out = buffer.new_empty(world * buffer.numel())
    _all_gather_flat(out, buffer.contiguous(), group=_resolve(group))
    return out.view(world, buffer.numel())


def _sum(buffer: Tensor, group: str) -> Tensor:
    out = buffer.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=_resolve(group))
    return out


@torch.library.custom_op("syncsn::all_gather", mutates_args=())
def _all_gather(buffer: Tensor, group: str, world: int) -> Tensor:
    return _gather(buffer, group, world)


@_all_gather.register_fake
def _(buffer, group, world):
    return buffer.new_empty((world, buffer.numel()))


@torch.library.custom_op("syncsn::all_reduce", mutates_args=())
def _all_reduce(buffer: Tensor, group: str) -> Tensor:
    return _sum(buffer, group)


@_all_reduce.register_fake
def _(buffer, group):
    return torch.empty_like(buffer)


def gather_partials(
    buffer: Tensor, group: str | None, world: int, *, eager: bool = False
) -> Tensor:
    """The forward collective: every rank's (K,) partials as (world, K), in rank order.

    ``group`` None (a layer that does not synchronize) gives ``buffer`` itself, which every
    merge takes as a world of one. ``eager``
    (plain eager mode, :func:`syncsn.kernels.ops.plain_eager`) calls the collective directly:
    the op's dispatch costs about as much as a small layer's math.
    """
    if group is None or world == 1:
        return buffer
    if buffer.is_meta:  # shape inference: no values to exchange
        return buffer.new_empty((world, buffer.numel()))
    if eager:
        return _gather(buffer, group, world)
    return torch.ops.syncsn.all_gather(buffer, group, world)


def sum_totals(
    buffer: Tensor, group: str | None, *, layer: str | None = None, eager: bool = False
) -> Tensor:
    """The backward collective: ``buffer`` summed over the ranks (a new tensor).

    With ``SYNCSN_DEBUG=1`` the ranks first match up this call like a layer's forward (see
    :func:`check_same_layer`; ``layer`` names it in the reports), so a rank that skipped a
    forward and went on to the backward pass is reported instead of hanging. ``eager`` as for
    :func:`gather_partials`.
    """
    if group is None:
        return buffer
    if buffer.is_meta:  # shape inference: no values to exchange
        return torch.empty_like(buffer)
    if debug_enabled() and not torch.compiler.is_compiling():
        name = layer or f"a Sync layer ({buffer.numel()} values)"
        check_same_call(group, _BACKWARD, name, str(buffer.numel()))
    if eager:
        return _sum(buffer, group)
    return torch.ops.syncsn.all_reduce(buffer, group)


def sync_target(group: dist.ProcessGroup | None) -> tuple[str | None, int]:
    """(name, size) of the group a Sync layer's training call synchronizes over, or
    (None, 1) when there is nothing to synchronize with (no process group, or one rank).

    A constant for torch.compile: process groups do not change within a run.
    """
    world = group_size(group)
    if world == 1:
        return None, 1
    return group_name(group), world


# What torch.compiler.assume_constant_result(sync_target) does, without importing dynamo
# (seconds) whenever syncsn is imported.
sync_target._dynamo_marked_constant = True  # type: ignore[attr-defined]
