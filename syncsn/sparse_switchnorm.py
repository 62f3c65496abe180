"""Sparse Switchable Normalization layers, local and synchronized (Shao et al., CVPR 2019).

SSN is SN with the softmax over the switch logits replaced by
``sparsestmax(logits, radius)`` (:mod:`syncsn.sparsemax`). The radius grows from 0 to 1
over training (:class:`RadiusSchedule`), which drives every layer's importance weights to a
single scope. A weight vector that has become one-hot is *frozen*: the layer records the
selected scope in a buffer and from then on uses it alone. A layer whose means and
variances are both frozen on IN or LN no longer needs the batch scope, so its Sync form
makes no collective at all; a layer that keeps BN for either keeps one collective each way.

Freezing is decided in training mode from the switch logits and the radius, which must be
identical on every rank of a synchronized layer's group (DistributedDataParallel keeps the
parameters in step; call :func:`set_radius` or :meth:`RadiusSchedule.step` on every rank).
With ``SYNCSN_DEBUG=1`` the ranks compare their decisions and raise instead of hanging.
"""

from __future__ import annotations

import itertools
import math
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import comm
from . import functional as F
from .deferred import DeferredRead
from .kernels import ops, passes_backend, reference
from .switchnorm import (
    ForwardWeights,
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    _SwitchNorm,
    _SyncMixin,
    layer_doc,
)

__all__ = [
    "SparseSwitchNorm1d",
    "SparseSwitchNorm2d",
    "SparseSwitchNorm3d",
    "SyncSparseSwitchNorm1d",
    "SyncSparseSwitchNorm2d",
    "SyncSparseSwitchNorm3d",
    "set_radius",
    "RadiusSchedule",
]

NOT_FROZEN = -1


def _check_frozen(layer: str, scopes: tuple[str, ...], mean: int, var: int) -> None:
    for name, value in (("frozen_mean", mean), ("frozen_var", var)):
        if not NOT_FROZEN <= value < len(scopes):
            raise ValueError(
                f"{layer}: buffer {name} must be -1 (not frozen) or an index into scopes "
                f"{scopes}, got {value}"
            )


class _FrozenReads:
    """What the host knows of one layer's ``frozen_mean`` / ``frozen_var`` buffers.

    The buffers change on the device, in the training step that finds a vector one-hot (the
    kernels write them). After each training step the layer publishes them to the host
    through :class:`~syncsn.deferred.DeferredRead` (at once on CPU, one step late on CUDA;
    every rank publishes at the same steps, so every rank learns at the same step) until the
    host has read both as frozen: the layer is then *settled*. A settled layer builds its
    one-hot weights without sparsestmax and, frozen off BN, skips the batch scope and its
    collectives. Before, the weights come from the buffers on the device, so they are the
    same either way; the host's knowledge only decides what need not be computed. Under
    torch.compile the graph is specialized on ``settled`` (a Python value): a layer that
    settles is recompiled once, at its next call, and until then (also on CPU) computes the
    batch scope with weight 0.

    Only a training step writes the buffers by itself. Whatever else writes them
    (``reset_parameters``, ``load_state_dict``) must make the layer start over with a new
    instance (:meth:`_SparseSwitchMixin._frozen_changed`); so do deep copies and pickles.
    Writing a settled layer's buffers by hand is not seen (DistributedDataParallel's buffer
    broadcast writes them too, with the values they have, so writes cannot be told apart
    without reading the values).
    """

    def __init__(self) -> None:
        self.key = next(_read_keys)
        self.reader = DeferredRead()
        # (mean, var) scope indices once the host has read both as frozen, else None.
        self.settled: tuple[int, int] | None = None
        _frozen_reads[self.key] = self

    def __deepcopy__(self, memo: dict) -> _FrozenReads:
        return _FrozenReads()

    def __reduce__(self) -> tuple:
        return (_FrozenReads, ())

    def learn(self, values: list[int], layer: str, scopes: tuple[str, ...]) -> None:
        mean, var = (int(value) for value in values)
        _check_frozen(layer, scopes, mean, var)
        if mean >= 0 and var >= 0:
            self.settled = (mean, var)


_read_keys = itertools.count()
_frozen_reads: weakref.WeakValueDictionary[int, _FrozenReads] = weakref.WeakValueDictionary()


@torch.library.custom_op("syncsn::publish_frozen", mutates_args=())
def _publish_frozen(frozen: Tensor, key: int, layer: str, scopes: str) -> Tensor:
    """Publish a training step's ``frozen`` (2,) to the host and learn what is due; returns a
    copy for the buffers, so that no compiler drops the op."""
    _learn_frozen(frozen, key, layer, scopes)
    return frozen.clone()


def _learn_frozen(frozen: Tensor, key: int, layer: str, scopes: str) -> None:
    reads = _frozen_reads.get(key)
    if reads is not None:
        due = reads.reader.publish(frozen)
        if due is not None:
            reads.learn(due, layer, tuple(scopes.split(",")))


@_publish_frozen.register_fake
def _(frozen, key, layer, scopes):
    return torch.empty_like(frozen)


def _check_same_selection(
    layer: str, selection: list[int], group: dist.ProcessGroup | None, device: torch.device
) -> None:
    """SYNCSN_DEBUG: raise on every rank when the ranks disagree on what is frozen.

    One call on the debug side channel (see :func:`syncsn.comm.check_same_layer`) per training
    step until the layer is fully frozen. Without it a rank that stopped synchronizing its
    batch scope would leave the others waiting. ``device`` is unused.
    """
    details = comm.check_same_call(group, "the switch-weight check of", layer, str(selection))
    if len(set(details)) > 1:
        per_rank = [tuple(int(i) for i in d.strip("[]").split(",")) for d in details]
        raise comm.DebugCheckError(
            f"SYNCSN_DEBUG: {layer}: the ranks disagree on which switch weights are frozen; "
            f"(mean, var) scope index per rank, -1 = not frozen: {per_rank}. The switch logits "
            "(mean_weight, var_weight) and the radius must be identical on every rank: train "
            "with DistributedDataParallel (or broadcast the parameters) and call set_radius / "
            "RadiusSchedule.step on every rank."
        )


class _SparseSwitchMixin(_SwitchNorm):
    """Sparsestmax switch weights, the radius and the frozen selections of an SSN layer.

    Buffers (in the state dict, identical on every rank):

    * ``radius`` (0-d, the parameters' dtype): the sparsestmax radius, set by
      :func:`set_radius` / :class:`RadiusSchedule`; 0 at construction (SSN then equals
      sparsemax-SN).
    * ``frozen_mean``, ``frozen_var`` (0-d long): index into ``scopes`` of the scope the
      means / variances are frozen on, ``-1`` while not frozen.

    A frozen layer's running statistics are still updated while BN is one of its frozen
    scopes; a layer frozen off BN no longer computes the batch scope, so they stay as
    they were (they are never used again) from the step at which the host knows of the
    freezing: the kernels decide it during the call that freezes, so the host knows at the
    next call on CPU and one call later on CUDA and under torch.compile.

    Under ``torch.compile`` a layer's switch to "no BN scope" is a new graph, so a model
    whose layers freeze off BN at many different steps recompiles at each of them; raise
    ``torch._dynamo.config.recompile_limit`` for such models (``fullgraph=True`` fails past
    the limit).
    """

    radius: Tensor
    frozen_mean: Tensor
    frozen_var: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        using_moving_average: bool = True,
        using_bn: bool = True,
        last_gamma: bool = False,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            using_moving_average,
            using_bn,
            last_gamma,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
        )
        where = self.mean_weight.device
        self.register_buffer("radius", torch.zeros((), dtype=self.mean_weight.dtype, device=where))
        for name in ("frozen_mean", "frozen_var"):
            self.register_buffer(name, torch.full((), NOT_FROZEN, dtype=torch.long, device=where))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The SSN authors' layers flag a frozen vector with ``mean_fixed`` / ``var_fixed``
        # (one-element long tensors, 0 or 1) and, when freezing it, overwrite its logits with
        # the one-hot selection, so the frozen scope is the largest logit. Their radius is a
        # one-element vector.
        for flag, ours, logits in (
            ("mean_fixed", "frozen_mean", "mean_weight"),
            ("var_fixed", "frozen_var", "var_weight"),
        ):
            fixed = state_dict.pop(prefix + flag, None)
            if fixed is None or prefix + ours in state_dict:
                continue
            selection = state_dict.get(prefix + logits)
            index = NOT_FROZEN
            if bool(fixed.reshape(-1)[0]) and selection is not None:
                index = int(selection.argmax())
            state_dict[prefix + ours] = torch.tensor(index, dtype=torch.long)
        radius = state_dict.get(prefix + "radius")
        if radius is not None and radius.dim() == 1 and radius.numel() == 1:
            state_dict[prefix + "radius"] = radius.reshape(())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._frozen_loaded()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # The frozen selections describe the logits, so resetting those unfreezes the layer
        # (the base constructor calls this before the buffers exist).
        if "frozen_mean" in self._buffers:
            self.frozen_mean.fill_(NOT_FROZEN)
            self.frozen_var.fill_(NOT_FROZEN)
        self._frozen_changed()

    def _frozen_changed(self) -> None:
        """Make the host forget what it knew of the frozen buffers: call this whenever they
        are written outside a training step (the next training step reads them again)."""
        self._frozen_reads = _FrozenReads()

    def _frozen_loaded(self) -> None:
        """After load_state_dict: check the loaded selections and let the host know them
        (a host read, outside any training step: a layer loaded frozen is settled at once)."""
        self._frozen_changed()
        if not self.frozen_mean.is_meta:
            self._reads().learn(list(self._frozen_indices()), type(self).__name__, self.scopes)

    def _reads(self) -> _FrozenReads:
        reads = getattr(self, "_frozen_reads", None)
        if reads is None:  # a layer unpickled from an older version of the class
            reads = self._frozen_reads = _FrozenReads()
        return reads

    def _frozen_indices(self) -> tuple[int, int]:
        """(mean, var) frozen scope indices, -1 when not frozen, read from the buffers.

        A device read: for inspecting a layer, not for its training step (which never reads
        the buffers on the host, see :class:`_FrozenReads`).
        """
        mean, var = int(self.frozen_mean), int(self.frozen_var)
        _check_frozen(type(self).__name__, self.scopes, mean, var)
        return mean, var

    @property
    def frozen_scopes(self) -> tuple[str | None, str | None]:
        """Names of the scopes the (means, variances) are frozen on; None when not frozen."""
        mean, var = self._frozen_indices()
        return (self.scopes[mean] if mean >= 0 else None, self.scopes[var] if var >= 0 else None)

    def mixing_weights(self) -> tuple[Tensor, Tensor]:
        """The importance of each scope (K,) for the means and for the variances:
        ``sparsestmax(logits, radius)``, or the one-hot selection once frozen. Computed on
        the device from the logits and the ``frozen_*`` buffers (no host read); float32 for
        float16 / bfloat16 parameters."""
        weights = self._weights(self._reads().settled is not None)
        return weights[0], weights[1]

    def _weights(self, settled: bool) -> Tensor:
        """(2, K) weights of the means and the variances in torch operations."""
        if settled:
            logits = torch.stack([self.mean_weight, self.var_weight])
            frozen = torch.stack([self.frozen_mean, self.frozen_var])
            scope = torch.arange(len(self.scopes), device=frozen.device)
            dtype = F.sparse_weights_dtype(logits.dtype)
            return (scope == frozen.unsqueeze(-1)).to(dtype)
        weights, _, _ = F.sparse_switches(
            self.mean_weight, self.var_weight, self.radius, self.frozen_mean, self.frozen_var
        )
        return weights

    def _forward_weights(self, x: Tensor, deploy: bool) -> ForwardWeights:
        settled = self._reads().settled
        if settled is not None:
            # The kernels use the frozen scopes' one-hot weights and give the logits a zero
            # gradient (DistributedDataParallel expects one for every parameter that
            # requires grad): no operation around the layer's passes.
            return ForwardWeights(
                self.mean_weight, self.var_weight, self._uses_bn(settled), False, settled
            )
        if deploy:  # an exported graph: plain operations
            weights = self._weights(False)
            return ForwardWeights(weights[0], weights[1], self.using_bn, False)
        if self.training and self._debug_checked():
            self._frozen_before = self._frozen_indices()
        buffers = (self.radius, self.frozen_mean, self.frozen_var)
        if not ops.plain_eager() or passes_backend(x, self.weight, self.bias).fuses_sparse_switch:
            # The kernels compute sparsestmax, the freezing and their gradient (the host
            # learns of the freezing after the call, see _switched).
            return ForwardWeights(
                self.mean_weight, self.var_weight, self.using_bn, False, sparse=buffers
            )
        # Backends without the fused switch (CPU): torch operations, which autograd
        # differentiates; cheaper than the same math run again in backward where an
        # operation costs no kernel launch.
        weights, _, selection = reference.sparse_switches(
            self.mean_weight, self.var_weight, *buffers
        )
        self._switched(selection, written=False)
        return ForwardWeights(weights[0], weights[1], self.using_bn, False)

    def _debug_checked(self) -> bool:
        """Whether the ranks compare their freezing (SYNCSN_DEBUG, a synchronizing call that
        is not shape inference on the meta device)."""
        group, _ = self._sync_target()
        if group is None or self.frozen_mean.is_meta:
            return False
        return comm.debug_enabled() and not torch.compiler.is_compiling()

    def _uses_bn(self, settled: tuple[int, int]) -> bool:
        if "bn" in self.scopes:
            # Frozen off BN: without the BN scope the Function neither computes the batch
            # statistics nor communicates (its weights are exactly 0). Until the host knows,
            # the batch scope is computed with weight 0, which gives the same output.
            return self.using_bn and self.scopes.index("bn") in settled
        return self.using_bn

    def _switched(self, selection: Tensor, written: bool = True) -> None:
        """In training, publish the selection (2,) of a call to the host, and write it into
        the buffers unless the backend has (``written``: in plain eager mode)."""
        if not self.training:
            return
        reads = self._reads()
        if self._debug_checked():
            try:
                _check_same_selection(
                    self._describe(), selection.tolist(), getattr(self, "process_group", None),
                    selection.device,
                )  # fmt: skip
            except comm.DebugCheckError:
                # Record nothing, so that the ranks stay consistent.
                with torch.no_grad():
                    self.frozen_mean.fill_(self._frozen_before[0])
                    self.frozen_var.fill_(self._frozen_before[1])
                raise
        layer, scopes = type(self).__name__, ",".join(self.scopes)
        eager = ops.plain_eager()
        if eager:  # nothing can drop the read: no op around it
            _learn_frozen(selection, reads.key, layer, scopes)
            if written:
                return
        else:
            selection = torch.ops.syncsn.publish_frozen(selection, reads.key, layer, scopes)
        with torch.no_grad():
            self.frozen_mean.copy_(selection[0])
            self.frozen_var.copy_(selection[1])


_SSN_SUMMARY = r"""Sparse Switchable Normalization over {what} (Shao et al., CVPR 2019).

    :class:`~syncsn.{sn}` with the importance weights of the scopes computed by
    :math:`w = \mathrm{{sparsestmax}}(\text{{mean\_weight}}, r)`,
    :math:`v = \mathrm{{sparsestmax}}(\text{{var\_weight}}, r)` instead of softmax
    (:func:`~syncsn.sparsestmax`). The radius :math:`r` (buffer ``radius``, set by
    :func:`set_radius` or :class:`RadiusSchedule`) grows from 0 to 1 over training and drives
    each weight vector to a single scope: every vector whose logits are not tied is one-hot
    from :math:`r = {onehot}` on. A vector that has become one-hot in training is frozen
    (buffers ``frozen_mean``, ``frozen_var``: the index into ``scopes``, -1 while not frozen)
    and the layer computes only its selected scope from then on.{sync_note}

    State dicts of the SSN authors' layers (``mean_fixed`` / ``var_fixed`` flags, a
    one-element ``radius``, (1, C, 1, 1) parameters) load directly, frozen selections
    included.
"""

_SYNC_NOTE = """ One collective each way while BN
    may be selected; none once the means and the variances are both frozen on IN or LN."""


def _ssn_doc(what: str, sn: str, shape: str, without_bn: str, example: str, sync: bool) -> str:
    onehot = "sqrt(1/2)" if shape == "(N, C)" else "sqrt(2/3)"
    summary = _SSN_SUMMARY.format(
        what=what, sn=sn, onehot=onehot, sync_note=_SYNC_NOTE if sync else ""
    )
    return layer_doc(summary, shape, without_bn, example, sync)


class SparseSwitchNorm1d(_SparseSwitchMixin, SwitchNorm1d):
    __doc__ = _ssn_doc(
        "a 2-D input :math:`(N, C)`; scopes LN and BN",
        "SwitchNorm1d",
        "(N, C)",
        "LN alone",
        """        >>> m = syncsn.SparseSwitchNorm1d(100)
        >>> schedule = syncsn.RadiusSchedule(m, total_steps=1000)
        >>> output = m(torch.randn(20, 100)); schedule.step()""",
        sync=False,
    )


class SparseSwitchNorm2d(_SparseSwitchMixin, SwitchNorm2d):
    __doc__ = _ssn_doc(
        "a 4-D input :math:`(N, C, H, W)`; scopes IN, LN and BN",
        "SwitchNorm2d",
        "(N, C, H, W)",
        "IN and LN",
        """        >>> model = nn.Sequential(nn.Conv2d(3, 64, 3), syncsn.SparseSwitchNorm2d(64))
        >>> schedule = syncsn.RadiusSchedule(model, total_steps=1000)
        >>> output = model(torch.randn(8, 3, 32, 32)); schedule.step()  # once per step""",
        sync=False,
    )


class SparseSwitchNorm3d(_SparseSwitchMixin, SwitchNorm3d):
    __doc__ = _ssn_doc(
        "a 5-D input :math:`(N, C, D, H, W)`; scopes IN, LN and BN",
        "SwitchNorm3d",
        "(N, C, D, H, W)",
        "IN and LN",
        """        >>> m = syncsn.SparseSwitchNorm3d(16)
        >>> output = m(torch.randn(4, 16, 8, 10, 10))""",
        sync=False,
    )


class SyncSparseSwitchNorm1d(_SyncMixin, SparseSwitchNorm1d):
    __doc__ = _ssn_doc(
        "a 2-D input :math:`(N, C)`, BN synchronized across ranks",
        "SyncSwitchNorm1d",
        "(N, C)",
        "LN alone",
        """        >>> m = syncsn.SyncSparseSwitchNorm1d(100)
        >>> output = m(torch.randn(20, 100))""",
        sync=True,
    )


class SyncSparseSwitchNorm2d(_SyncMixin, SparseSwitchNorm2d):
    __doc__ = _ssn_doc(
        "a 4-D input :math:`(N, C, H, W)`, BN synchronized across ranks",
        "SyncSwitchNorm2d",
        "(N, C, H, W)",
        "IN and LN",
        """        >>> group = syncsn.create_sync_groups(8)  # after init_process_group
        >>> m = syncsn.SyncSparseSwitchNorm2d(64, process_group=group)
        >>> output = m(torch.randn(2, 64, 32, 32))""",
        sync=True,
    )


class SyncSparseSwitchNorm3d(_SyncMixin, SparseSwitchNorm3d):
    __doc__ = _ssn_doc(
        "a 5-D input :math:`(N, C, D, H, W)`, BN synchronized across ranks",
        "SyncSwitchNorm3d",
        "(N, C, D, H, W)",
        "IN and LN",
        """        >>> m = syncsn.SyncSparseSwitchNorm3d(16)
        >>> output = m(torch.randn(2, 16, 8, 10, 10))""",
        sync=True,
    )


def _check_radius(radius: float) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)):
        raise TypeError(f"set_radius: radius must be a number, got {type(radius).__name__}")
    if not math.isfinite(radius) or radius < 0:
        raise ValueError(f"set_radius: radius must be finite and >= 0, got {radius}")
    return float(radius)


def set_radius(model: nn.Module, radius: float) -> int:
    """Set the sparsestmax radius of every SSN layer in ``model``; returns how many.

    Call it on every rank with the same value (the radius decides when layers freeze, and
    a Sync layer's ranks must freeze together).

    Args:
        model: a module containing SSN layers (any others are left alone).
        radius: the new radius, finite and >= 0 (the schedule goes from 0 to 1).

    Returns:
        The number of SSN layers set.

    Example::

        >>> set_radius(model, 0.5)  # every rank, before the step
        12
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_radius: model must be a torch.nn.Module, got {type(model).__name__}")
    radius = _check_radius(radius)
    layers = [m for m in model.modules() if isinstance(m, _SparseSwitchMixin)]
    with torch.no_grad():
        for layer in layers:
            layer.radius.fill_(radius)
    return len(layers)


class RadiusSchedule:
    """The SSN authors' schedule: the radius grows linearly from 0 to 1 over training.

    After ``k`` calls of :meth:`step` every SSN layer of ``model`` has radius
    ``min(k / total_steps, 1)``. Call :meth:`step` once per optimizer step, on every rank.
    Construction sets the radius to 0, as at the start of training; to resume, load the
    saved :meth:`state_dict` with :meth:`load_state_dict`, which sets the radius again.

    With three scopes every layer whose logits are not tied is one-hot (and frozen at its
    next training step) once the radius reaches sqrt(2/3), i.e. after 82% of
    ``total_steps``; with two scopes (SparseSwitchNorm1d) after 71%.

    Args:
        model: a module containing SSN layers.
        total_steps: number of :meth:`step` calls over which the radius reaches 1.

    Example::

        >>> schedule = RadiusSchedule(model, total_steps=epochs * len(loader))
        >>> for x, y in loader:
        ...     loss_fn(model(x), y).backward(); optimizer.step(); schedule.step()
        >>> checkpoint["radius_schedule"] = schedule.state_dict()
    """

    def __init__(self, model: nn.Module, total_steps: int) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(
                f"RadiusSchedule: total_steps must be an int >= 1, got {total_steps!r}"
            )
        self.model = model
        self.total_steps = total_steps
        self.last_step = 0
        if set_radius(model, 0.0) == 0:
            raise ValueError(
                "RadiusSchedule: the model has no Sparse Switchable Normalization layer "
                "(SparseSwitchNorm1d/2d/3d or their Sync variants); nothing to schedule"
            )

    @property
    def radius(self) -> float:
        """The radius after :attr:`last_step` steps."""
        return min(self.last_step / self.total_steps, 1.0)

    def step(self) -> float:
        """Advance one step and set the new radius on every SSN layer; returns it."""
        self.last_step += 1
        set_radius(self.model, self.radius)
        return self.radius

    def state_dict(self) -> dict[str, int]:
        return {"last_step": self.last_step, "total_steps": self.total_steps}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restore ``last_step`` and ``total_steps`` and set the corresponding radius."""
        missing = {"last_step", "total_steps"} - set(state_dict)
        if missing:
            raise KeyError(
                f"RadiusSchedule.load_state_dict: expected keys last_step and total_steps, "
                f"missing {sorted(missing)}"
            )
        total, last = int(state_dict["total_steps"]), int(state_dict["last_step"])
        if total < 1 or last < 0:
            raise ValueError(
                f"RadiusSchedule.load_state_dict: need total_steps >= 1 and last_step >= 0, "
                f"got total_steps={total}, last_step={last}"
            )
        self.total_steps, self.last_step = total, last
        set_radius(self.model, self.radius)
