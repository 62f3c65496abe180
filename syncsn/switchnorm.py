"""Switchable Normalization layers, local and synchronized (Luo et al., ICLR 2019).

The modules hold parameters and buffers and check their input; the math is in
:mod:`syncsn.functional` and :mod:`syncsn.function`, the communication in :mod:`syncsn.comm`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _args, comm
from . import functional as F
from .function import LayerCall, SwitchNormFunction, layer_call, next_layer_key
from .kernels import ops

__all__ = [
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "SyncSwitchNorm1d",
    "SyncSwitchNorm2d",
    "SyncSwitchNorm3d",
]


#: The input dtypes every layer computes in (float8 and integer inputs are refused).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ForwardWeights(NamedTuple):
    """What one call of a layer mixes its scopes with."""

    w: Tensor  # (K,) over the layer's scopes, for the means
    v: Tensor  # (K,) for the variances
    use_bn: bool  # whether the call has a BN scope (a subclass may know its weights are 0)
    logits: bool  # w, v are the logits of a softmax (:attr:`LayerCall.logits`)
    # For each vector the scope it is frozen on, -1 when not (:attr:`LayerCall.selected`).
    selected: tuple[int, int] = (-1, -1)
    # An SSN layer's (radius, frozen_mean, frozen_var) buffers: w, v are sparsestmax logits.
    sparse: tuple[Tensor, Tensor, Tensor] | None = None


def check_input(x: Tensor, layer: nn.Module, ndims: tuple[int, ...], layout: str) -> None:
    """ValueError / TypeError naming what ``layer`` expects and what it was given."""
    name = type(layer).__name__
    if x.dim() not in ndims:
        dims = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(
            f"{name} expects a {dims} input {layout}, got a {x.dim()}-D input of shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[1] != layer.num_features:
        raise ValueError(
            f"{name}(num_features={layer.num_features}) expects {layer.num_features} channels "
            f"in dimension 1, got an input of shape {tuple(x.shape)} with {x.shape[1]}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} expects a float16, bfloat16, float32 or float64 input, got {x.dtype}"
        )


def grad_anchor(x: Tensor, call: LayerCall) -> Tensor | None:
    """A tensor that makes a Sync layer's output require grad on every rank alike.

    The backward collective runs when a layer's backward runs, which autograd decides from
    requires_grad. Tying it to grad mode and training (the same on all ranks) instead of to
    this rank's input keeps ranks whose inputs differ in requires_grad from hanging.
    (torch.compile cannot create a leaf tensor in a graph: there the output requires grad
    whenever the layer has parameters or its input requires grad.)
    """
    if call.group is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return torch.empty(0, device=x.device, requires_grad=True)
    return None


def fold_running_now() -> bool:
    """False while torch.utils.checkpoint recomputes a forward inside the backward pass: that
    batch was already folded into the running statistics the first time. (Under
    torch.compile the recomputation is the compiler's and never re-runs the update.)"""
    return torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1


def exporting() -> bool:
    """True while torch.export, the ONNX exporter or torch.jit.trace records the model."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


ALL_SCOPES = ("in", "ln", "bn")


class _SwitchNorm(_BatchNorm):
    """Parameters, buffers and argument checks shared by the SN family.

    A :class:`torch.nn.modules.batchnorm._BatchNorm`, so that code that recognises batch
    normalization layers by that class (freezing them in eval mode, exempting their
    parameters from weight decay) treats these layers alike; the parameters, buffers, state
    dict and computation are this class's own.

    Parameters: ``weight``, ``bias`` (C,) (None when ``affine=False``) and the switch logits
    ``mean_weight``, ``var_weight`` (K,), one per scope, initialised to ones (1/K each).
    Buffers (with the BN scope and ``track_running_stats``): ``running_mean`` (C,) zeros,
    ``running_var`` (C,) ones, ``num_batches_tracked``; None otherwise.
    """

    _ndims: tuple[int, ...]
    _layout: str
    scopes: tuple[str, ...]

    mean_weight: nn.Parameter
    var_weight: nn.Parameter
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

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
        # nn.Module's constructor, not _NormBase's: that one creates BatchNorm's parameters
        # and calls reset_parameters before the switch logits exist, and its signature
        # differs between torch versions.
        nn.Module.__init__(self)
        name = type(self).__name__
        num_features = _args.check_num_features(name, num_features)
        self.num_features = num_features
        self.eps = _args.check_eps(name, eps)
        self.momentum = _args.check_momentum(name, momentum)
        self.using_moving_average = _args.check_bool(
            name, "using_moving_average", using_moving_average
        )
        self.using_bn = _args.check_bool(name, "using_bn", using_bn)
        self.last_gamma = _args.check_bool(name, "last_gamma", last_gamma)
        self.affine = _args.check_bool(name, "affine", affine)
        # Without the BN scope there is nothing to track: False then, whatever was asked.
        tracked = _args.check_bool(name, "track_running_stats", track_running_stats)
        self.track_running_stats = tracked and using_bn
        if not using_bn:
            self.scopes = tuple(s for s in self.scopes if s != "bn")
        _args.check_bool(name, "bias", bias)
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        k = len(self.scopes)
        self.mean_weight = nn.Parameter(torch.ones(k, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(torch.ones(k, device=device, dtype=dtype))
        if self.track_running_stats:
            self.register_buffer(
                "running_mean", torch.zeros(num_features, device=device, dtype=dtype)
            )
            self.register_buffer(
                "running_var", torch.ones(num_features, device=device, dtype=dtype)
            )
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._layer_key = next_layer_key()
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batch counted (when the layer has them)."""
        if self.running_mean is not None and self.running_var is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics reset, weight 1 (0 with ``last_gamma``), bias 0, logits 1."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.constant_(self.weight, 0.0 if self.last_gamma else 1.0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, "
            "using_moving_average={using_moving_average}, using_bn={using_bn}, "
            "last_gamma={last_gamma}, affine={affine}, bias={use_bias}, "
            "track_running_stats={track_running_stats}".format(
                **self.__dict__, use_bias=self.bias is not None
            )
        )

    def mixing_weights(self) -> tuple[Tensor, Tensor]:
        """The importance of each scope (K,) for the means and for the variances."""
        return torch.softmax(self.mean_weight, dim=0), torch.softmax(self.var_weight, dim=0)

    def _describe(self) -> str:
        """The layer as errors and warnings name it."""
        return f"{type(self).__name__}({self.num_features})"

    def _sync_target(self) -> tuple[str | None, int]:
        """(process group name, size) this call synchronizes over; (None, 1): none."""
        return None, 1

    def _layer_call(self, logits: bool, eager: bool, selected: tuple[int, int]) -> LayerCall:
        group, world = self._sync_target()
        return layer_call(
            self._describe(),
            self._layer_key,
            self.training,
            self.eps,
            self.momentum if self.using_moving_average else None,
            1 if self._ndims == (2,) else 0,
            group,
            world,
            fold_running_now(),
            eager,
            logits,
            F.scope_mask(self.scopes),
            selected,
        )

    def _check_input(self, x: Tensor) -> None:
        check_input(x, self, self._ndims, self._layout)

    def _forward_weights(self, x: Tensor, deploy: bool) -> ForwardWeights:
        """What this call on ``x`` mixes the scopes with (:class:`ForwardWeights`). SN passes
        its logits: the kernels compute the softmax (and its backward) as part of their
        passes. ``deploy``: the weights go to an exported graph's operations instead."""
        return ForwardWeights(self.mean_weight, self.var_weight, self.using_bn, True)

    def _switched(self, selection: Tensor, written: bool = True) -> None:
        """After a call with a :attr:`ForwardWeights.sparse` switch: the (2,) selection."""

    def _debug_check(self, x: Tensor) -> None:
        """With SYNCSN_DEBUG=1, what a Sync layer checks about the other ranks."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        self._debug_check(x)
        eager = ops.plain_eager()  # (no export or trace records an eager call)
        deploy = not eager and exporting() and not self.training
        w, v, use_bn, logits, selected, sparse = self._forward_weights(x, deploy)
        # torch's rule: without tracked running statistics the BN scope is the batch's, in
        # eval mode too (where it is local: eval never communicates).
        tracked = self.track_running_stats and self.running_mean is not None
        running_mean, running_var, num_batches = (
            (self.running_mean, self.running_var, self.num_batches_tracked)
            if tracked
            else (None, None, None)
        )
        if deploy and (tracked or not use_bn):
            # A deployable graph: plain torch operations in the model's dtype.
            w = F.one_hot_where_selected(w, selected[0])
            v = F.one_hot_where_selected(v, selected[1])
            w, v = F.switches_on_all_scopes(w, v, logits, F.scope_mask(self.scopes))
            if logits:
                w, v = torch.softmax(w, dim=0), torch.softmax(v, dim=0)
            return F.switch_norm_eval(
                x, w, v, running_mean if use_bn else None, running_var if use_bn else None,
                self.weight, self.bias, self.eps, ddof=1 if self._ndims == (2,) else 0,
            )  # fmt: skip
        call = self._layer_call(logits, eager, selected)
        out = SwitchNormFunction.apply(
            x, w, v, self.weight, self.bias, running_mean, running_var, num_batches,
            *(sparse or (None, None, None)), use_bn, call, grad_anchor(x, call),
        )  # fmt: skip
        if sparse is None:
            return out
        y, selection = out
        self._switched(selection)
        return y

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
        # The SN authors' layers store weight/bias as (1, C, 1, 1) or (1, C) and the running
        # statistics as (1, C, 1) or (1, C), and have no batch counter.
        for name in ("weight", "bias", "running_mean", "running_var"):
            key = prefix + name
            value = state_dict.get(key)
            if value is not None and value.dim() > 1 and value.numel() == self.num_features:
                state_dict[key] = value.reshape(self.num_features)
        counter = prefix + "num_batches_tracked"
        if (
            self.num_batches_tracked is not None
            and counter not in state_dict
            and prefix + "running_mean" in state_dict
        ):
            state_dict[counter] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


# --- docstrings ----------------------------------------------------------------------------
# The layers share their arguments; each class states its input, scopes and an example.

_ARGS = """
    Args:
        num_features: :math:`C` from an expected input of size {shape}.
        eps: a value added to the variances for numerical stability. Default: 1e-5
        momentum: the weight of the current batch in the running statistics,
            ``running = (1 - momentum) * running + momentum * batch`` (torch's convention;
            the SN/SSN authors' ``momentum=0.9`` is 0.1 here, their 0.997 is 0.003); None
            for the cumulative average over all batches. Default: 0.1
        using_moving_average: False gives the cumulative average whatever ``momentum``
            (the authors' "batch average"). Default: True
        using_bn: include the BN scope; False leaves {without_bn} and no running
            statistics. Default: True
        last_gamma: initialise ``weight`` to 0 instead of 1 (for the last normalization of
            a residual branch). Default: False
        affine: learnable per-channel ``weight`` and ``bias``. Default: True
        track_running_stats: keep running statistics of the BN scope and use them in eval
            mode; False: no running buffers, and the BN scope always comes from the current
            batch, in eval mode too (torch's meaning). Default: True
{process_group}        device: device of the parameters and buffers. Default: None
        dtype: dtype of the parameters and buffers. Default: None
        bias: (keyword-only) with ``affine``, a learnable ``bias``; False: ``bias`` is None,
            as in ``torch.nn.BatchNorm2d(..., bias=False)``. Default: True
"""

_PROCESS_GROUP = """\
        process_group: the ranks whose samples the BN scope is computed over; None: the
            whole world once ``torch.distributed`` is initialized (without a process group
            the layer computes locally). Default: None
"""

_STATE = """
    Parameters: ``weight``, ``bias`` :math:`(C)` (None without ``affine``; ``bias`` also
    with ``bias=False``) and the switch logits ``mean_weight``, ``var_weight`` :math:`(K)`,
    one per scope, initialised to ones.
    Buffers: ``running_mean`` :math:`(C)` (starts at 0), ``running_var`` :math:`(C)` (starts
    at 1), ``num_batches_tracked``; None without the BN scope or ``track_running_stats``.
"""

_SYNC = """
    Synchronized: the BN scope covers the samples of every rank of ``process_group``. For any
    split of a global batch over the ranks (uneven, empty ranks, different image sizes),
    outputs, input and parameter gradients (summed over ranks) and running statistics equal
    those of the local layer on the concatenated batch. One ``all_gather`` in forward and one
    ``all_reduce`` of 2C values in backward, in training mode only; none in eval mode, in a
    group of one rank, or without a process group.
"""


def layer_doc(summary: str, shape: str, without_bn: str, example: str, sync: bool) -> str:
    """The docstring of a switchable layer: ``summary``, arguments, shapes, ``example``."""
    args = _ARGS.format(
        shape=shape, without_bn=without_bn, process_group=_PROCESS_GROUP if sync else ""
    )
    shapes = f"""
    Shape:
        - Input: {shape}
        - Output: {shape} (same shape as input)
"""
    return (
        summary.rstrip()
        + "\n"
        + (_SYNC if sync else "")
        + args
        + _STATE
        + shapes
        + "\n    Examples::\n\n"
        + example.rstrip()
        + "\n"
    )


_SN_MATH = r"""
    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} * \gamma + \beta, \qquad
        \mu = \sum_k w_k \mu_k, \quad \sigma^2 = \sum_k v_k \sigma^2_k

    for each sample and channel, where :math:`\mu_k, \sigma^2_k` are the statistics of the
    scopes k and :math:`w = \mathrm{softmax}(\text{mean\_weight})`,
    :math:`v = \mathrm{softmax}(\text{var\_weight})` their importance, learned with the
    network. :math:`\gamma, \beta` are ``weight`` and ``bias``.
"""

_SN_SCOPES = """
    Scopes, from per-(sample, channel) statistics: IN over the {spatial} positions of each
    sample and channel (unbiased variance; over a single position, a 1x1 map, the mean is
    the value and the variance 0), LN over the channels and positions of each sample, BN
    over the samples and positions of the batch (in eval mode: the running statistics).
    Each sample counts once in BN, whatever its size.
"""


class _SwitchNormNd(_SwitchNorm):
    """SN over (N, C, *S): scopes IN, LN and (optionally) BN, from instance statistics."""

    scopes = ALL_SCOPES

    def _check_input(self, x: Tensor) -> None:
        super()._check_input(x)
        F.check_spatial_size(F.spatial_size(x), type(self).__name__)


class SwitchNorm1d(_SwitchNorm):
    __doc__ = layer_doc(
        """Switchable Normalization over a 2-D input :math:`(N, C)` (Luo et al., ICLR 2019).
"""
        + _SN_MATH
        + """
    Scopes: LN over the C features of each sample and BN over the N samples (in eval mode:
    the running statistics), both with the unbiased variance, as in the SN authors' code
    (over one feature the LN variance is 0).
""",
        "(N, C)",
        "LN alone",
        """        >>> m = syncsn.SwitchNorm1d(100)
        >>> output = m(torch.randn(20, 100))""",
        sync=False,
    )

    scopes = ("ln", "bn")
    _ndims = (2,)
    _layout = "(N, C)"


class SwitchNorm2d(_SwitchNormNd):
    __doc__ = layer_doc(
        """Switchable Normalization over a 4-D input :math:`(N, C, H, W)` (Luo et al., ICLR 2019).
"""
        + _SN_MATH
        + _SN_SCOPES.format(spatial="H x W"),
        "(N, C, H, W)",
        "IN and LN",
        """        >>> m = syncsn.SwitchNorm2d(100)
        >>> output = m(torch.randn(20, 100, 35, 45))
        >>> m.eval()(torch.randn(1, 100, 35, 45)).shape  # eval: BN from running statistics
        torch.Size([1, 100, 35, 45])""",
        sync=False,
    )

    _ndims = (4,)
    _layout = "(N, C, H, W)"


class SwitchNorm3d(_SwitchNormNd):
    __doc__ = layer_doc(
        """Switchable Normalization over a 5-D input :math:`(N, C, D, H, W)` (Luo et al.,
    ICLR 2019).
"""
        + _SN_MATH
        + _SN_SCOPES.format(spatial="D x H x W"),
        "(N, C, D, H, W)",
        "IN and LN",
        """        >>> m = syncsn.SwitchNorm3d(16)
        >>> output = m(torch.randn(4, 16, 8, 10, 10))""",
        sync=False,
    )

    _ndims = (5,)
    _layout = "(N, C, D, H, W)"


class _SyncMixin(_SwitchNorm):
    """Synchronizes the BN scope over ``process_group`` (default: the whole world).

    For any split of a global batch over the ranks, outputs, gradients and running statistics
    equal the local layer on the concatenated batch. One all_gather in forward, one
    all_reduce in backward (training only); nothing in eval or without a process group.
    """

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
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        _args.check_process_group(type(self).__name__, process_group)
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
        self.process_group = process_group
        self._sync_id = comm.next_layer_id()

    def _debug_check(self, x: Tensor) -> None:
        # Every call, train or eval, after the rank-local input checks and before anything
        # that communicates: see comm.check_same_layer.
        if comm.debug_enabled() and not torch.compiler.is_compiling():
            comm.check_same_layer(
                f"{type(self).__name__}({self.num_features})",
                comm.sync_identity(self),
                self.process_group,
                x.device,
                training=self.training,
            )

    def _describe(self) -> str:
        identity = comm.sync_identity(self)
        name = f"'{identity}'" if isinstance(identity, str) else f"#{identity}"
        return f"{super()._describe()} {name}"

    def _sync_target(self) -> tuple[str | None, int]:
        # Eval mode never communicates (the BN scope is the running statistics).
        return comm.sync_target(self.process_group) if self.training else (None, 1)


class SyncSwitchNorm1d(_SyncMixin, SwitchNorm1d):
    __doc__ = layer_doc(
        """:class:`SwitchNorm1d` over :math:`(N, C)` with the BN scope synchronized across
    ranks.
""",
        "(N, C)",
        "LN alone",
        """        >>> m = syncsn.SyncSwitchNorm1d(100)  # the whole world, once initialized
        >>> output = m(torch.randn(20, 100))""",
        sync=True,
    )


class SyncSwitchNorm2d(_SyncMixin, SwitchNorm2d):
    __doc__ = layer_doc(
        """:class:`SwitchNorm2d` over :math:`(N, C, H, W)` with the BN scope synchronized
    across ranks.
""",
        "(N, C, H, W)",
        "IN and LN",
        """        >>> # within groups of 8 consecutive ranks (one node), after init_process_group
        >>> m = syncsn.SyncSwitchNorm2d(100, process_group=syncsn.create_sync_groups(8))
        >>> output = m(torch.randn(2, 100, 35, 45))""",
        sync=True,
    )


class SyncSwitchNorm3d(_SyncMixin, SwitchNorm3d):
    __doc__ = layer_doc(
        """:class:`SwitchNorm3d` over :math:`(N, C, D, H, W)` with the BN scope synchronized
    across ranks.
""",
        "(N, C, D, H, W)",
        "IN and LN",
        """        >>> m = syncsn.SyncSwitchNorm3d(16)
        >>> output = m(torch.randn(2, 16, 8, 10, 10))""",
        sync=True,
    )
