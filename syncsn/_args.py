"""Constructor argument checks shared by the layers.

Each check raises TypeError for a value of the wrong kind and ValueError for one out of range,
with a message that names the layer, the argument, what it accepts and what it was given.
``bool`` is rejected where a number is expected (``momentum=True`` is a typo, not 1.0).
"""

from __future__ import annotations

import math
import numbers

import torch.distributed as dist

__all__ = [
    "check_bool",
    "check_eps",
    "check_momentum",
    "check_num_features",
    "check_process_group",
]


def _given(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_num_features(layer: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{layer}: num_features must be an int, got {_given(value)}")
    if value < minimum:
        raise ValueError(f"{layer}: num_features must be at least {minimum}, got {value}")
    return int(value)


def check_eps(layer: str, value: object) -> float:
    if not _is_real(value):
        raise TypeError(f"{layer}: eps must be a positive number, got {_given(value)}")
    eps = float(value)  # type: ignore[arg-type]
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{layer}: eps must be finite and > 0, got {value}")
    return eps


def check_momentum(layer: str, value: object) -> float | None:
    """None (cumulative average) or a real number in [0, 1]."""
    if value is None:
        return None
    if not _is_real(value):
        raise TypeError(
            f"{layer}: momentum must be None (cumulative average) or a number in [0, 1], "
            f"got {_given(value)}"
        )
    momentum = float(value)  # type: ignore[arg-type]
    if not 0.0 <= momentum <= 1.0:  # also rejects NaN
        raise ValueError(
            f"{layer}: momentum must be in [0, 1] (the weight of the new batch in the running "
            f"average, as in torch.nn.BatchNorm2d), got {value}"
        )
    return momentum


def check_bool(layer: str, name: str, value: object) -> bool:
    # A string such as "False" from a hand-written config would silently count as True.
    if not isinstance(value, bool):
        raise TypeError(f"{layer}: {name} must be True or False, got {_given(value)}")
    return value


def check_process_group(layer: str, value: object) -> None:
    if value is None:
        return
    if not (dist.is_available() and isinstance(value, dist.ProcessGroup)):
        raise TypeError(
            f"{layer}: process_group must be None (the whole world) or a "
            f"torch.distributed.ProcessGroup, got {_given(value)}"
        )
