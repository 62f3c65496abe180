"""What the switchable layers learned: the importance of IN, LN and BN per layer.

This is the quantity the SN paper plots per layer: which normalizer each layer chose, for its
means and for its variances.
"""

from __future__ import annotations

from torch import nn

from .switchnorm import _SwitchNorm

__all__ = ["switch_weights", "format_switch_weights"]

SCOPES = ("in", "ln", "bn")

Importances = tuple[float | None, float | None, float | None]


def switch_weights(model: nn.Module) -> dict[str, dict[str, Importances]]:
    """Per switchable layer, the importance of each scope for the means and the variances.

    Returns ``{layer_name: {"mean": (in, ln, bn), "var": (in, ln, bn)}}`` in module order,
    with the layer's mixing weights (softmax of the logits, or sparsestmax for the sparse
    layers) as Python floats. A scope the layer does not have (IN in a SwitchNorm1d, BN with
    ``using_bn=False``) is None. The root, when it is itself a switchable layer, is ``""``.

    Args:
        model: any module; its switchable layers are found with ``named_modules()``.

    Example::

        >>> syncsn.switch_weights(nn.Sequential(syncsn.SwitchNorm2d(4)))
        {'0': {'mean': (0.333..., 0.333..., 0.333...), 'var': (0.333..., 0.333..., 0.333...)}}
    """
    out: dict[str, dict[str, Importances]] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, _SwitchNorm):
            continue
        mean_w, var_w = layer.mixing_weights()
        out[name] = {
            "mean": _by_scope(layer.scopes, mean_w.tolist()),
            "var": _by_scope(layer.scopes, var_w.tolist()),
        }
    return out


def _by_scope(scopes: tuple[str, ...], values: list[float]) -> Importances:
    found = dict(zip(scopes, values, strict=True))
    return tuple(found.get(s) for s in SCOPES)  # type: ignore[return-value]


def format_switch_weights(weights: dict[str, dict[str, Importances]], digits: int = 3) -> str:
    """A plain-text table of :func:`switch_weights`' result, one row per layer.

    Args:
        weights: the result of :func:`switch_weights`.
        digits: decimals shown.

    Example::

        layer                mean IN  mean LN  mean BN | var IN  var LN  var BN
        backbone.bn1           0.333    0.333    0.333 |  0.333   0.333   0.333

    A scope the layer does not have shows as ``-``.
    """
    header = ["layer", "mean IN", "mean LN", "mean BN", "|", "var IN", "var LN", "var BN"]
    rows = [header]
    for name, w in weights.items():
        cells = [_cell(v, digits) for v in w["mean"]] + ["|"] + [_cell(v, digits) for v in w["var"]]
        rows.append([name or "(root)", *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join([first, *rest]).rstrip())
    return "\n".join(lines)


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
