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

import math

import torch
from torch import Tensor, nn

from . import comm
from .sparsemax import is_one_hot, sparsestmax
from .switchnorm import (
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    _SyncMixin,
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


def _sparse_weights(logits: Tensor, radius: Tensor) -> Tensor:
    """sparsestmax(logits, radius) (K,), computed in at least float32: float16 resolves
    the push too coarsely to tell a vertex from a point near it."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return sparsestmax(logits, radius)


def _frozen_weights(logits: Tensor, index: int) -> Tensor:
    """The one-hot vector (K,) selecting scope ``index``.

    The logits stay in the autograd graph with a zero gradient: the weights of a one-hot
    sparsestmax have a zero gradient anyway, and DistributedDataParallel expects every
    parameter that requires grad to receive one in each step.
    """
    one_hot = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    one_hot[index] = 1
    if torch.is_grad_enabled() and logits.requires_grad:
        one_hot = one_hot + logits * 0
    return one_hot


def _check_same_selection(
    layer: str, selection: list[int], group: object, device: torch.device
) -> None:
    """SYNCSN_DEBUG: raise on every rank when the ranks disagree on what is frozen.

    Costs one small collective per training step until the layer is fully frozen. Without it
    a rank that stopped synchronizing its batch scope would leave the others waiting.
    """
    mine = torch.tensor(selection, dtype=torch.float64, device=device)
    everyone = comm.all_gather_stacked(mine, group)
    if not bool((everyone == mine).all()):
        per_rank = [tuple(int(i) for i in row) for row in everyone.tolist()]
        raise RuntimeError(
            f"SYNCSN_DEBUG: {layer}: the ranks disagree on which switch weights are frozen; "
            f"(mean, var) scope index per rank, -1 = not frozen: {per_rank}. The switch logits "
            "(mean_weight, var_weight) and the radius must be identical on every rank: train "
            "with DistributedDataParallel (or broadcast the parameters) and call set_radius / "
            "RadiusSchedule.step on every rank."
        )


class _SparseSwitchMixin:
    """Sparsestmax switch weights, the radius and the frozen selections of an SSN layer.

    Buffers (in the state dict, identical on every rank):

    * ``radius`` (0-d, the parameters' dtype): the sparsestmax radius, set by
      :func:`set_radius` / :class:`RadiusSchedule`; 0 at construction (SSN then equals
      sparsemax-SN).
    * ``frozen_mean``, ``frozen_var`` (0-d long): index into ``scopes`` of the scope the
      means / variances are frozen on, ``-1`` while not frozen.

    A frozen layer's running statistics are still updated while BN is one of its frozen
    scopes; a layer frozen off BN no longer computes the batch scope, so they stay as
    they were (they are never used again).
    """

    scopes: tuple[str, ...]
    training: bool
    mean_weight: nn.Parameter
    var_weight: nn.Parameter
    radius: Tensor
    frozen_mean: Tensor
    frozen_var: Tensor

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        factory = {"device": self.mean_weight.device}
        self.register_buffer("radius", torch.zeros((), dtype=self.mean_weight.dtype, **factory))
        for name in ("frozen_mean", "frozen_var"):
            self.register_buffer(name, torch.full((), NOT_FROZEN, dtype=torch.long, **factory))
        # Host copy of the frozen indices, refreshed when a buffer is replaced or written to
        # (load_state_dict, .to(), fill_): reading a GPU buffer on every step would stall it.
        self._frozen_key: tuple | None = None
        self._frozen_cache = (NOT_FROZEN, NOT_FROZEN)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # The frozen selections describe the logits, so resetting those unfreezes the layer
        # (the base constructor calls this before the buffers exist).
        if "frozen_mean" in self._buffers:
            self.frozen_mean.fill_(NOT_FROZEN)
            self.frozen_var.fill_(NOT_FROZEN)

    def _frozen_indices(self) -> tuple[int, int]:
        """(mean, var) frozen scope indices, -1 when not frozen; no device read when unchanged."""
        buffers = (self.frozen_mean, self.frozen_var)
        key = tuple((id(b), b._version) for b in buffers)
        if key != self._frozen_key:
            values = tuple(int(b) for b in buffers)
            for name, value in zip(("frozen_mean", "frozen_var"), values, strict=True):
                if not NOT_FROZEN <= value < len(self.scopes):
                    raise ValueError(
                        f"{type(self).__name__}: buffer {name} must be -1 (not frozen) or an "
                        f"index into scopes {self.scopes}, got {value}"
                    )
            self._frozen_cache = values
            self._frozen_key = key
        return self._frozen_cache

    @property
    def frozen_scopes(self) -> tuple[str | None, str | None]:
        """Names of the scopes the (means, variances) are frozen on; None when not frozen."""
        return tuple(self.scopes[i] if i >= 0 else None for i in self._frozen_indices())

    def mixing_weights(self) -> tuple[Tensor, Tensor]:
        """The importance of each scope (K,) for the means and for the variances:
        ``sparsestmax(logits, radius)``, or the one-hot selection once frozen."""
        weights = []
        for logits, index in zip(
            (self.mean_weight, self.var_weight), self._frozen_indices(), strict=True
        ):
            if index >= 0:
                weights.append(_frozen_weights(logits, index))
            else:
                weights.append(_sparse_weights(logits, self.radius))
        return weights[0], weights[1]

    def _forward_weights(self) -> tuple[Tensor, Tensor]:
        w, v = self.mixing_weights()
        if self.training:
            self._freeze_one_hot(w, v)
        mean_index, var_index = self._frozen_indices()
        if "bn" in self.scopes and mean_index >= 0 and var_index >= 0:
            bn = self.scopes.index("bn")
            if bn not in (mean_index, var_index):
                # BN is the last scope: without it the Function neither computes the batch
                # statistics nor communicates (the dropped weights are exactly 0).
                return w[:bn], v[:bn]
        return w, v

    def _freeze_one_hot(self, w: Tensor, v: Tensor) -> None:
        """Record the vectors that have become one-hot (training mode only)."""
        before = self._frozen_indices()
        if min(before) >= 0:
            return
        selection = list(before)
        for i, weights in enumerate((w, v)):
            if selection[i] < 0 and is_one_hot(weights.detach()):
                selection[i] = int(weights.detach().argmax())
        sync = self._sync_spec()
        if sync.active and comm.debug_enabled():
            identity = sync.identity
            name = f"'{identity}'" if isinstance(identity, str) else f"#{identity}"
            _check_same_selection(f"{sync.layer} {name}", selection, sync.group, w.device)
        if tuple(selection) != before:
            self.frozen_mean.fill_(selection[0])
            self.frozen_var.fill_(selection[1])


class SparseSwitchNorm1d(_SparseSwitchMixin, SwitchNorm1d):
    """Sparse Switchable Normalization over (N, C) features: scopes LN and BN.

    Same constructor, parameters and state as :class:`~syncsn.SwitchNorm1d`, plus the
    ``radius``, ``frozen_mean`` and ``frozen_var`` buffers. Every vector is one-hot from
    radius sqrt(1/2) on.
    """


class SparseSwitchNorm2d(_SparseSwitchMixin, SwitchNorm2d):
    """Sparse Switchable Normalization over (N, C, H, W): scopes IN, LN and BN.

    Same constructor, parameters and state as :class:`~syncsn.SwitchNorm2d`, plus the
    ``radius``, ``frozen_mean`` and ``frozen_var`` buffers. Every vector whose logits are not
    tied is one-hot from radius sqrt(2/3) on.
    """


class SparseSwitchNorm3d(_SparseSwitchMixin, SwitchNorm3d):
    """Sparse Switchable Normalization over (N, C, D, H, W): scopes IN, LN and BN."""


class SyncSparseSwitchNorm1d(_SyncMixin, SparseSwitchNorm1d):
    """:class:`SparseSwitchNorm1d` with the BN scope synchronized across ranks."""


class SyncSparseSwitchNorm2d(_SyncMixin, SparseSwitchNorm2d):
    """:class:`SparseSwitchNorm2d` with the BN scope synchronized across ranks.

    One collective each way while BN may be selected; none once both the means and the
    variances are frozen on IN or LN.
    """


class SyncSparseSwitchNorm3d(_SyncMixin, SparseSwitchNorm3d):
    """:class:`SparseSwitchNorm3d` with the BN scope synchronized across ranks."""


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
