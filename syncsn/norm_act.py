"""Normalization followed by a drop path and an activation, in one layer (timm's norm-act).

timm builds EfficientNet, RegNet and every model made with ``norm_act_layer`` from
``BatchNormAct2d``: a ``torch.nn.BatchNorm2d`` subclass that applies ``self.drop`` and then
``self.act`` to its output, keeping BatchNorm's state-dict keys. The layers here are the
same for each of syncsn's norms: the norm's parameters, buffers and state dict, plus the
``drop`` and ``act`` modules (``nn.Identity`` when not used), applied in that order.

The converters turn timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` into these (the
activation and drop modules are moved over, the same objects), and :func:`syncsn.revert_sync`
turns the synchronized ones into their local twins. For a timm model, build the model with
timm, then convert it: timm's factories do not take these classes
(``timm.create_model(..., norm_layer=syncsn.SwitchNormAct2d)`` fails in timm's
``get_norm_act_layer``, and wrapping one in a partial loses the ``act_layer`` timm passes)::

    >>> model = syncsn.convert_sync_switchnorm(timm.create_model("efficientnet_b0"))

They take timm's norm-act keyword arguments, so they can be built directly::

    >>> layer = syncsn.SyncSwitchNormAct2d(64, act_layer=nn.SiLU, drop_layer=None)
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .batchnorm import SyncBatchNorm
from .sparse_switchnorm import SparseSwitchNorm2d, SyncSparseSwitchNorm2d
from .switchnorm import SwitchNorm2d, SyncSwitchNorm2d

__all__ = [
    "BatchNormAct2d",
    "SyncBatchNormAct",
    "SwitchNormAct2d",
    "SyncSwitchNormAct2d",
    "SparseSwitchNormAct2d",
    "SyncSparseSwitchNormAct2d",
    "NormActMixin",
    "with_act",
]


def make_act(
    act_layer: Callable[..., nn.Module] | None,
    act_kwargs: dict[str, Any] | None = None,
    inplace: bool = True,
    apply_act: bool = True,
) -> nn.Module:
    """The activation module, as timm makes it: ``act_layer(**act_kwargs, inplace=inplace)``
    when ``inplace`` (``act_layer(**act_kwargs)`` otherwise), ``nn.Identity()`` without one."""
    if act_layer is None or not apply_act:
        return nn.Identity()
    if isinstance(act_layer, str):
        raise TypeError(
            f"act_layer must be a module class or a callable returning a module, got the string "
            f"{act_layer!r} (with timm: timm.layers.get_act_layer({act_layer!r}))"
        )
    kwargs = dict(act_kwargs or {})
    if inplace:
        kwargs["inplace"] = True
    return act_layer(**kwargs)


_ACT_ARGS = """        apply_act: use ``act_layer``; False: no activation. Default: True
        act_layer: the activation's class (or a callable returning a module); None: none.
            Default: ``nn.ReLU``
        act_kwargs: keyword arguments for ``act_layer``. Default: None
        inplace: pass ``inplace=True`` to ``act_layer``. Default: True
        drop_layer: a callable returning the drop module (timm's ``DropBlock2d``, say) applied
            before the activation; None: none. Default: None
"""


class NormActMixin(nn.Module):
    __doc__ = (
        "``drop`` then ``act`` after the norm's own forward, with timm's keyword arguments.\n\n"
        "    Keyword arguments (the rest go to the norm):\n" + _ACT_ARGS
    )

    drop: nn.Module
    act: nn.Module

    def __init__(
        self,
        *args: Any,
        apply_act: bool = True,
        act_layer: Callable[..., nn.Module] | None = nn.ReLU,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: Callable[[], nn.Module] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = make_act(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def _described(cls: type[NormActMixin]) -> type[NormActMixin]:
    """Gives a norm-act class the signature and docstring of its norm plus the mixin's
    keyword arguments (its ``__init__`` takes ``*args, **kwargs``)."""
    norm = cls.__mro__[2]
    own = list(inspect.signature(norm).parameters.values())
    added = inspect.signature(NormActMixin.__init__).parameters.values()
    keyword = [p for p in added if p.kind is inspect.Parameter.KEYWORD_ONLY]
    cls.__signature__ = inspect.Signature(own + keyword)  # type: ignore[attr-defined]
    package = "torch.nn" if norm.__module__.startswith("torch.") else "syncsn"
    norm_args = textwrap.fill(
        ", ".join(f"``{p.name}``" for p in own) + f": as in :class:`{norm.__name__}`.",
        width=88,
        subsequent_indent=" " * 12,
    )
    cls.__doc__ = f""":class:`{package}.{norm.__name__}` followed by ``drop`` and ``act``.

    Same parameters, buffers and state-dict keys as :class:`{norm.__name__}` (plus those of
    ``act`` and ``drop``, if they have any).

    Args:
        {norm_args}
{_ACT_ARGS}
    Shape:
        - Input: :math:`(N, C, H, W)`
        - Output: :math:`(N, C, H, W)` (same shape as input)

    Example::

        >>> layer = syncsn.{cls.__name__}(64, act_layer=nn.SiLU)
        >>> y = layer(torch.randn(4, 64, 8, 8))  # silu({norm.__name__}(x))
    """
    return cls


@_described
class BatchNormAct2d(NormActMixin, nn.BatchNorm2d):
    pass


@_described
class SyncBatchNormAct(NormActMixin, SyncBatchNorm):
    # It stands for a BatchNormAct2d (see syncsn.convert.mark_dim).
    _syncsn_dim = 2


@_described
class SwitchNormAct2d(NormActMixin, SwitchNorm2d):
    pass


@_described
class SyncSwitchNormAct2d(NormActMixin, SyncSwitchNorm2d):
    pass


@_described
class SparseSwitchNormAct2d(NormActMixin, SparseSwitchNorm2d):
    pass


@_described
class SyncSparseSwitchNormAct2d(NormActMixin, SyncSparseSwitchNorm2d):
    pass


# norm class -> the same norm with drop and act.
_WITH_ACT: dict[type[nn.Module], type[NormActMixin]] = {
    nn.BatchNorm2d: BatchNormAct2d,
    SyncBatchNorm: SyncBatchNormAct,
    SwitchNorm2d: SwitchNormAct2d,
    SyncSwitchNorm2d: SyncSwitchNormAct2d,
    SparseSwitchNorm2d: SparseSwitchNormAct2d,
    SyncSparseSwitchNorm2d: SyncSparseSwitchNormAct2d,
}


def with_act(norm: type[nn.Module]) -> type[NormActMixin]:
    """The norm-act layer of ``norm`` (a norm over 4-D input: the norm-act layers are 2d)."""
    if norm not in _WITH_ACT:
        raise ValueError(
            f"there is no norm-act layer for {norm.__name__}: norm-act layers are 2d "
            f"({', '.join(cls.__name__ for cls in _WITH_ACT)})"
        )
    return _WITH_ACT[norm]
