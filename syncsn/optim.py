"""Optimizer parameter groups that treat the switch logits of SN / SSN layers apart."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["SWITCH_PARAMETER_NAMES", "param_groups"]

#: Names of the switch logits (importance-weight logits over IN / LN / BN) in SN and SSN.
SWITCH_PARAMETER_NAMES = ("mean_weight", "var_weight")


def _check_non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"param_groups: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"param_groups: {name} must be finite and >= 0, got {value}")


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    switch_lr_scale: float = 0.1,
    switch_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Splits ``model``'s trainable parameters into a default group and a switch group.

    Every parameter whose own name (the last component of its dotted name) is
    ``mean_weight`` or ``var_weight`` goes into the group ``"switch"`` with learning rate
    ``lr * switch_lr_scale`` and weight decay ``switch_weight_decay``; all the others go into
    the group ``"default"`` with ``lr`` and ``weight_decay``. Parameters with
    ``requires_grad=False`` are left out, as are empty groups; shared parameters are listed
    once. Each group carries a ``"name"`` key, e.g. for logging or a scheduler.

    Conventions of the two papers:

    * SSN authors (the defaults): switch logits at a tenth of the learning rate and without
      weight decay, ``param_groups(model, lr, wd)``. Decay would pull the logits towards
      equality, against sparsestmax driving them to a single scope.
    * SN authors: switch logits trained like every other parameter, weight decay included,
      ``param_groups(model, lr, wd, switch_lr_scale=1.0, switch_weight_decay=wd)``.

    Args:
        model: any module; its parameters are found with ``named_parameters()``.
        lr: learning rate of the default group.
        weight_decay: weight decay of the default group.
        switch_lr_scale: the switch group's learning rate is ``lr * switch_lr_scale``.
        switch_weight_decay: weight decay of the switch group.

    Returns:
        A list of dicts ``{"name", "params", "lr", "weight_decay"}`` to pass to a
        ``torch.optim`` optimizer, default group first.

    Example::

        >>> optimizer = torch.optim.SGD(param_groups(model, lr=0.02, weight_decay=1e-4),
        ...                             momentum=0.9)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"param_groups: model must be a torch.nn.Module, got {type(model).__name__}"
        )
    _check_non_negative("lr", lr)
    _check_non_negative("weight_decay", weight_decay)
    _check_non_negative("switch_lr_scale", switch_lr_scale)
    _check_non_negative("switch_weight_decay", switch_weight_decay)

    default: list[nn.Parameter] = []
    switch: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_switch = name.rsplit(".", 1)[-1] in SWITCH_PARAMETER_NAMES
        (switch if is_switch else default).append(param)

    groups = [
        {"name": "default", "params": default, "lr": lr, "weight_decay": weight_decay},
        {
            "name": "switch",
            "params": switch,
            "lr": lr * switch_lr_scale,
            "weight_decay": switch_weight_decay,
        },
    ]
    return [group for group in groups if group["params"]]
