"""The Triton backend: the kernel interface on CUDA tensors in a few fused launches.

One layer call in training is three kernels forward (statistics, merge, output) and two
backward (reduction, input gradient), besides the collectives: the small per-(n, c) and
per-channel steps run inside those kernels (see :mod:`syncsn.kernels.triton_kernels`), and
nothing here reads a device value on the host, so a training step can be captured in a
CUDA graph.

The kernels cover float32, float16 and bfloat16 input whose spatial dimensions collapse
into one stride (contiguous, channels-last, most views), with parameters of any floating
dtype on the same device; float64 input and empty batches go to the reference backend.
On CPU tensors the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` (set
before Triton is first imported): that is how they are tested without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import functional as F
from .interface import Backend, BatchMoments, BNSaved, SNGrads, SNMixed, SNStats, SparseSwitch

try:
    from . import triton_kernels as K
except Exception as error:  # noqa: BLE001 - any failure to import Triton disables the backend
    K = None  # type: ignore[assignment]
    _IMPORT_ERROR: Exception | None = error
else:
    _IMPORT_ERROR = None

__all__ = ["TritonBackend", "Tuning", "TUNING", "interpreting"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_F32, _F64 = torch.float32, torch.float64


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Tuning:
    """How the full-size passes are cut into programs (a module-level knob for tests).

    Attributes:
        tile: elements a program reads per step (BLOCK_C * BLOCK_L).
        programs: programs a pass aims for (more chunks of the spatial axis when the
            channel blocks and samples give fewer); None: 4 per multiprocessor on CUDA,
            4 under the interpreter.
        finalize: elements per step of the finalizing program.
        max_chunks: at most this many chunks per sample.
        group: channels per finalize group (at least one channel block).
    """

    tile: int = 2048
    programs: int | None = None
    finalize: int = 2048
    max_chunks: int = 64
    group: int = 64


TUNING = Tuning()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class _Plan:
    """How one pass over an (N, C, L) input is cut into programs."""

    block_c: int
    block_l: int
    pilot: int
    num_cb: int
    rows: int
    num_rb: int
    chunks: int
    chunk_len: int
    group: int
    num_groups: int
    fin_n: int
    fin_ch: int
    num_warps: int
    even_c: bool  # C is a multiple of BLOCK_C: full tiles need no mask

    @property
    def programs(self) -> int:
        return self.num_rb * self.num_cb * self.chunks

    def grid(self) -> tuple[int]:
        return (self.programs,)

    def launch_args(self) -> tuple[int, ...]:
        return (self.num_cb, self.rows, self.num_rb, self.chunks, self.chunk_len)

    def blocks(self) -> dict[str, int]:
        return {
            "BLOCK_C": self.block_c,
            "BLOCK_L": self.block_l,
            "num_warps": self.num_warps,
            "EVEN_C": self.even_c,
            # Triton's default (contracting a * b + c into one rounding), stated so that
            # Triton 3.9 does not warn about its coming change of default.
            "enable_fp_fusion": True,
        }

    def finalize(self) -> dict[str, int]:
        return {"GROUP": self.group, "FIN_N": self.fin_n, "FIN_CH": self.fin_ch}


@functools.lru_cache(maxsize=512)
def _make_plan(
    n: int, c: int, length: int, channels_fast: bool, target: int, tuning: tuple
) -> _Plan:
    tile, _, finalize, max_chunks, group_width = tuning
    if length == 1:
        block_l, block_c = 1, min(_pow2(c), 128, tile)
    elif channels_fast:
        # 32 channels: a 128-byte (float32) or 64-byte row of each position per tile row.
        block_c = min(_pow2(c), 32, tile)
        block_l = min(_pow2(length), max(1, tile // block_c))
    else:
        block_l = min(_pow2(length), tile)
        block_c = min(_pow2(c), max(1, tile // block_l))
    num_cb = _cdiv(c, block_c)
    # Several samples per program when one sample's share is small, as long as the pass
    # keeps its target number of programs.
    rows = max(1, min(n, 4 * tile // (block_c * length)))
    rows = max(1, min(rows, n * num_cb // max(target, 1)))
    num_rb = _cdiv(n, rows)
    steps = _cdiv(length, block_l)
    chunks = 1
    if num_rb * num_cb < target and steps > 1:
        chunks = min(_cdiv(target, num_rb * num_cb), max_chunks, max(1, steps // 2))
    per_chunk = _cdiv(steps, chunks)
    chunks = _cdiv(steps, per_chunk)
    # The finalizing program of a group reads samples x chunks x group values: narrow groups
    # where there are many chunks (channels-last) or one value per instance (2-D input).
    if channels_fast or length == 1:
        group = block_c
    else:
        group = max(block_c, min(_pow2(c), group_width))
    fin_ch = _pow2(chunks)
    fin_n = max(1, min(_pow2(n), finalize // (fin_ch * group)))
    return _Plan(
        block_c=block_c,
        block_l=block_l,
        pilot=min(16, _pow2(length)),
        num_cb=num_cb,
        rows=rows,
        num_rb=num_rb,
        chunks=chunks,
        chunk_len=per_chunk * block_l,
        group=group,
        num_groups=_cdiv(c, group),
        fin_n=fin_n,
        fin_ch=fin_ch,
        num_warps=8 if block_c * block_l >= 2048 else 4,
        even_c=c % block_c == 0,
    )


@functools.lru_cache(maxsize=16)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if TUNING.programs is not None:
        return TUNING.programs
    if device.type == "cuda":
        return 4 * _multiprocessors(device.index if device.index is not None else 0)
    return 4


def _ncl(t: Tensor) -> tuple[int, int, int] | None:
    """Strides of ``t`` viewed as (N, C, L), or None when its spatial dimensions do not
    collapse into one stride."""
    dims = [(s, st) for s, st in zip(t.shape[2:], t.stride()[2:], strict=True) if s != 1]
    for (_, outer), (size, inner) in zip(dims, dims[1:], strict=False):
        if outer != inner * size:
            return None
    return t.stride(0), t.stride(1), dims[-1][1] if dims else 1


def _wide(c: int, length: int, *strides: tuple[int, int, int]) -> bool:
    """Whether in-sample offsets can exceed int32."""
    return any((c - 1) * abs(s[1]) + (length - 1) * abs(s[2]) >= 2**31 for s in strides)


@functools.lru_cache(maxsize=64)
def _bits(value: float) -> int:
    """The float64 bit pattern of ``value``, the kernels' exact way to receive a float."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _check_switches(
    w: Tensor, v: Tensor, scopes: int, selected: tuple[int, int]
) -> tuple[int, int]:
    """The kernels read one entry of ``w`` and ``v`` per scope of the mask; returns the
    selected scopes as indices into (IN, LN, BN), -1 for none."""
    own = F.own_scopes(scopes)
    k = len(own)
    if not 0 < scopes < 8 or w.shape != (k,) or v.shape != (k,):
        raise ValueError(
            f"expected switch vectors of shape ({k},) for the scope mask {scopes}, got "
            f"{tuple(w.shape)} and {tuple(v.shape)}"
        )
    if not all(-1 <= s < k for s in selected):
        raise ValueError(f"expected selected scopes in [-1, {k}), got {selected}")
    return tuple(own[s] if s >= 0 else -1 for s in selected)  # type: ignore[return-value]


# --- counters of the finalizing programs --------------------------------------------------

_counters: dict[tuple, Tensor] = {}


def _stream_key(device: torch.device) -> tuple:
    if device.type == "cuda":
        return ("cuda", device.index, torch.cuda.current_stream(device).cuda_stream)
    return (device.type, device.index, 0)


def _counter(device: torch.device, size: int) -> Tensor:
    """Zeroed int32 counters for one launch; the kernels leave them zeroed again.

    One set per device and stream (launches on one stream never overlap). During CUDA graph
    capture, a stream without counters gets fresh ones whose zeroing is part of the graph:
    memory allocated during a capture is not kept beyond it.
    """
    key = _stream_key(device)
    have = _counters.get(key)
    if have is not None and have.numel() >= size:
        return have
    fresh = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return fresh
    _counters[key] = fresh  # an older, smaller set stays alive in any graph that uses it
    if have is not None:
        _retired.append(have)
    return fresh


_retired: list[Tensor] = []


# --- the backend ----------------------------------------------------------------------------


class TritonBackend(Backend):
    """The steps of :class:`~syncsn.kernels.interface.Backend` as Triton kernels.

    Example::

        >>> backend = TritonBackend()
        >>> if backend.available() and backend.covers(x):  # x: (N, C, H, W) on CUDA
        ...     stats, partials = backend.sn_stats(x, ddof=0)
    """

    name = "triton"
    fuses_sparse_switch = True

    def available(self) -> bool:
        return K is not None and (torch.cuda.is_available() or interpreting())

    def unavailable_reason(self) -> str:
        if K is None:
            return f"Triton could not be imported: {_IMPORT_ERROR!r}"
        return "no CUDA device, and Triton's interpreter is off (TRITON_INTERPRET=1 runs it)"

    def covers(self, x: Tensor, *params: Tensor | None) -> bool:
        if x.dtype not in _DTYPES or x.dim() < 2 or x.numel() == 0:
            return False
        if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
            return False
        if _ncl(x) is None:
            return False
        return all(p is None or (p.device == x.device and p.is_floating_point()) for p in params)

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _plan(x: Tensor) -> tuple[_Plan, int, int, int]:
        n, c = x.shape[:2]
        length = math.prod(x.shape[2:])
        s = _ncl(x)
        channels_fast = s is not None and s[1] == 1 and length > 1 and c > 1
        t = TUNING
        plan = _make_plan(
            n, c, length, channels_fast, _target_programs(x.device),
            (t.tile, t.programs, t.finalize, t.max_chunks, t.group),
        )  # fmt: skip
        return plan, n, c, length

    @staticmethod
    def _strided(t: Tensor, like: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """``t`` (dy) with (N, C, L) strides, copied into ``like``'s layout if it has none."""
        s = _ncl(t)
        if s is None:
            fmt = torch.contiguous_format
            if like.dim() in (4, 5) and not like.is_contiguous():
                fmt = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
            t = t.contiguous(memory_format=fmt)
            s = _ncl(t)
            assert s is not None
        return t, s

    @staticmethod
    def _dummy(like: Tensor, dtype: torch.dtype = _F64) -> Tensor:
        """A stand-in for an absent tensor argument (never read)."""
        return torch.empty(1, dtype=dtype, device=like.device)

    @staticmethod
    def _device(x: Tensor):
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            return torch.cuda.device(x.device)
        return contextlib.nullcontext()

    # --- shared small step -----------------------------------------------------------------

    def merge(
        self,
        gathered: Tensor,
        ddof: int,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        num_batches_tracked: Tensor | None,
        momentum: float | None,
        running_ddof: int,
    ) -> BatchMoments:
        tracked = running_mean is not None and running_var is not None
        if momentum is None and tracked and num_batches_tracked is None:
            raise ValueError(
                "merge: momentum=None (cumulative average) needs num_batches_tracked, got None"
            )
        world = gathered.shape[0] if gathered.dim() == 2 else 1
        c = (gathered.shape[-1] - 1) // 2
        if gathered.stride(-1) != 1:
            gathered = gathered.contiguous()
        row_stride = gathered.stride(0) if gathered.dim() == 2 else 0
        for buffer in (running_mean, running_var):
            if buffer is not None and not buffer.is_contiguous():
                raise ValueError("merge: running statistics must be contiguous (C,) buffers")
        dev = gathered.device
        count = torch.empty((), dtype=_F64, device=dev)
        mean = torch.empty(c, dtype=_F64, device=dev)
        var = torch.empty(c, dtype=_F64, device=dev)
        flags = torch.empty((), dtype=torch.int32, device=dev)
        dummy = self._dummy(gathered)
        with self._device(gathered):
            K.merge_kernel[(1,)](
                gathered, row_stride, world, c, ddof, running_ddof,
                running_mean if tracked else dummy, running_var if tracked else dummy,
                num_batches_tracked if num_batches_tracked is not None else dummy,
                _bits(momentum if momentum is not None else 0.0),
                count, mean, var, flags,
                HAS_RUNNING=tracked, HAS_NBT=tracked and num_batches_tracked is not None,
                CUMULATIVE=momentum is None, W_BLOCK=min(_pow2(world), 16),
                BLOCK_C=min(_pow2(c), 256), num_warps=4, enable_fp_fusion=True,
            )  # fmt: skip
        return BatchMoments(count, mean, var, flags)

    # --- Switchable Normalization ----------------------------------------------------------

    def _stats(self, x: Tensor, ddof: int, sn: bool):
        plan, n, c, length = self._plan(x)
        sx = _ncl(x)
        assert sx is not None
        dev = x.device
        centre = torch.empty((n, c), dtype=_F32, device=dev)
        partials = torch.empty(1 + 2 * c, dtype=_F64, device=dev)
        ws = torch.empty(n * plan.chunks * 3 * c, dtype=_F32, device=dev)
        if sn:
            mean = torch.empty((n, c), dtype=_F64, device=dev)
            var = torch.empty((n, c), dtype=_F64, device=dev)
            ln_mean = torch.empty(n, dtype=_F64, device=dev)
            ln_var = torch.empty(n, dtype=_F64, device=dev)
            ln_ws = torch.empty(n * plan.num_groups * 3, dtype=_F64, device=dev)
        else:
            mean = var = ln_mean = ln_var = ln_ws = self._dummy(x)
        counter = _counter(dev, plan.num_groups + 1)
        with self._device(x):
            K.stats_kernel[plan.grid()](
                x, *sx, n, c, length, ws, ln_ws, counter,
                centre, mean, var, ln_mean, ln_var, partials,
                *plan.launch_args(), plan.num_groups, ddof,
                SN=sn, PILOT=plan.pilot, WIDE=_wide(c, length, sx),
                **plan.blocks(), **plan.finalize(),
            )  # fmt: skip
        return centre, mean, var, ln_mean, ln_var, partials

    def sn_stats(self, x: Tensor, ddof: int) -> tuple[SNStats, Tensor]:
        centre, mean, var, ln_mean, ln_var, partials = self._stats(x, ddof, sn=True)
        return SNStats(centre, mean, var, ln_mean, ln_var), partials

    def sn_output(
        self,
        x: Tensor,
        stats: SNStats,
        bn_mean: Tensor | None,
        bn_var: Tensor | None,
        w: Tensor,
        v: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        logits: bool,
        scopes: int = 7,
        selected: tuple[int, int] = (-1, -1),
        sparse: SparseSwitch | None = None,
    ) -> tuple[Tensor, SNMixed]:
        select_w, select_v = _check_switches(w, v, scopes, selected)
        plan, n, c, length = self._plan(x)
        sx = _ncl(x)
        y = torch.empty_like(x)
        sy = _ncl(y)
        assert sx is not None and sy is not None
        has_bn = bn_mean is not None and bn_var is not None
        dev = x.device
        mixed = [torch.empty((n, c), dtype=_F64, device=dev) for _ in range(3)]
        dummy = self._dummy(x)
        st = [t.contiguous() for t in stats]
        selection = None
        switch = [dummy] * 4
        if sparse is not None:
            selection = torch.empty(2, dtype=torch.long, device=dev)
            switch = [sparse.radius, sparse.frozen_w, sparse.frozen_v, selection]
        with self._device(x):
            K.sn_output_kernel[plan.grid()](
                x, *sx, y, *sy, n, c, length, *st,
                bn_mean.contiguous() if has_bn else dummy,
                bn_var.contiguous() if has_bn else dummy,
                w.contiguous(), v.contiguous(), *switch,
                weight.contiguous() if weight is not None else dummy,
                bias.contiguous() if bias is not None else dummy,
                _bits(eps), *mixed, plan.num_cb, plan.rows, plan.chunks, plan.chunk_len,
                HAS_BN=has_bn, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                LOGITS=logits, SCOPES=scopes, SELECT_W=select_w, SELECT_V=select_v,
                SPARSE=sparse is not None, FREEZE=sparse is not None and sparse.freeze,
                WIDE=_wide(c, length, sx, sy), **plan.blocks(),
            )  # fmt: skip
        return y, SNMixed(*mixed, selection)

    def sn_backward_reduce(
        self,
        x: Tensor,
        dy: Tensor,
        stats: SNStats,
        mixed: SNMixed,
        bn_mean: Tensor | None,
        bn_var: Tensor | None,
        w: Tensor,
        v: Tensor,
        weight: Tensor | None,
        ddof: int,
        logits: bool,
        scopes: int = 7,
        selected: tuple[int, int] = (-1, -1),
        radius: Tensor | None = None,
    ) -> SNGrads:
        select_w, select_v = _check_switches(w, v, scopes, selected)
        plan, n, c, length = self._plan(x)
        sx = _ncl(x)
        assert sx is not None
        dy, sd = self._strided(dy, x)
        has_bn = bn_mean is not None and bn_var is not None
        dev = x.device
        totals = torch.empty(2 * c, dtype=_F64, device=dev)
        grad_mean = torch.empty((n, c), dtype=_F64, device=dev)
        grad_var = torch.empty((n, c), dtype=_F64, device=dev)
        grad_w = torch.empty(w.shape, dtype=w.dtype, device=dev)
        grad_v = torch.empty(v.shape, dtype=v.dtype, device=dev)
        if weight is None:
            grad_weight, grad_bias = x.new_empty(0), x.new_empty(0)
        else:
            grad_weight = torch.empty(c, dtype=weight.dtype, device=dev)
            grad_bias = torch.empty(c, dtype=weight.dtype, device=dev)
        ws = torch.empty(n * plan.chunks * 2 * c, dtype=_F32, device=dev)
        rows_ws = torch.empty(n * plan.num_groups * 2, dtype=_F64, device=dev)
        gw_ws = torch.empty(plan.num_groups * 6, dtype=_F64, device=dev)
        counter = _counter(dev, plan.num_groups + 1)
        dummy = self._dummy(x)
        st = [t.contiguous() for t in stats]
        mx = [t.contiguous() for t in mixed[:3]]
        switch = [dummy] * 2
        if radius is not None:
            assert mixed.selection is not None
            switch = [radius, mixed.selection]
        with self._device(x):
            K.sn_reduce_kernel[plan.grid()](
                x, *sx, dy, *sd, n, c, length, ws, rows_ws, gw_ws, counter, *st, *mx,
                bn_mean.contiguous() if has_bn else dummy,
                bn_var.contiguous() if has_bn else dummy,
                w.contiguous(), v.contiguous(), *switch,
                weight.contiguous() if weight is not None else dummy,
                totals, grad_mean, grad_var, grad_w, grad_v,
                grad_weight if weight is not None else dummy,
                grad_bias if weight is not None else dummy,
                *plan.launch_args(), plan.num_groups, ddof,
                HAS_BN=has_bn, HAS_WEIGHT=weight is not None, LOGITS=logits, SCOPES=scopes,
                SELECT_W=select_w, SELECT_V=select_v, SPARSE=radius is not None,
                WIDE=_wide(c, length, sx, sd),
                **plan.blocks(), **plan.finalize(),
            )  # fmt: skip
        return SNGrads(totals, grad_mean, grad_var, grad_w, grad_v, grad_weight, grad_bias)

    def sn_backward_input(
        self,
        x: Tensor,
        dy: Tensor,
        stats: SNStats,
        mixed: SNMixed,
        grads: SNGrads,
        bn_mean: Tensor | None,
        totals: Tensor | None,
        count: Tensor | None,
        weight: Tensor | None,
        ddof: int,
    ) -> Tensor:
        plan, n, c, length = self._plan(x)
        sx = _ncl(x)
        assert sx is not None
        dy, sd = self._strided(dy, x)
        dx = torch.empty_like(x)
        so = _ncl(dx)
        assert so is not None
        has_bn = totals is not None and count is not None and bn_mean is not None
        dummy = self._dummy(x)
        with self._device(x):
            K.sn_input_kernel[plan.grid()](
                x, *sx, dy, *sd, dx, *so, n, c, length,
                stats.centre.contiguous(), stats.mean.contiguous(), mixed.rstd.contiguous(),
                grads.grad_mean.contiguous(), grads.grad_var.contiguous(),
                bn_mean.contiguous() if has_bn else dummy,
                totals.contiguous() if has_bn else dummy,
                count if has_bn else dummy,
                weight.contiguous() if weight is not None else dummy, ddof,
                plan.num_cb, plan.rows, plan.chunks, plan.chunk_len,
                HAS_BN=has_bn, HAS_WEIGHT=weight is not None,
                WIDE=_wide(c, length, sx, sd, so), **plan.blocks(),
            )  # fmt: skip
        return dx

    # --- Batch Normalization ---------------------------------------------------------------

    def bn_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        centre, *_, partials = self._stats(x, 0, sn=False)
        return centre, partials

    def bn_output(
        self,
        x: Tensor,
        centre: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> tuple[Tensor, BNSaved]:
        plan, n, c, length = self._plan(x)
        sx = _ncl(x)
        y = torch.empty_like(x)
        sy = _ncl(y)
        assert sx is not None and sy is not None
        dev = x.device
        saved_centre = torch.empty(c, dtype=_F32, device=dev)
        saved_mean = torch.empty(c, dtype=_F64, device=dev)
        rstd = torch.empty(c, dtype=_F64, device=dev)
        dummy = self._dummy(x)
        with self._device(x):
            K.bn_output_kernel[plan.grid()](
                x, *sx, y, *sy, n, c, length, centre.contiguous(), mean.contiguous(),
                var.contiguous(),
                weight.contiguous() if weight is not None else dummy,
                bias.contiguous() if bias is not None else dummy,
                _bits(eps), saved_centre, saved_mean, rstd,
                plan.num_cb, plan.rows, plan.chunks, plan.chunk_len,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                WIDE=_wide(c, length, sx, sy), **plan.blocks(),
            )  # fmt: skip
        return y, BNSaved(saved_centre, saved_mean, rstd)

    def bn_backward_reduce(
        self, x: Tensor, dy: Tensor, saved: BNSaved, weight: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        plan, n, c, length = self._plan(x)
        sx = _ncl(x)
        assert sx is not None
        dy, sd = self._strided(dy, x)
        dev = x.device
        totals = torch.empty(2 * c, dtype=_F64, device=dev)
        if weight is None:
            grad_weight, grad_bias = x.new_empty(0), x.new_empty(0)
        else:
            grad_weight = torch.empty(c, dtype=weight.dtype, device=dev)
            grad_bias = torch.empty(c, dtype=weight.dtype, device=dev)
        ws = torch.empty(n * plan.chunks * 2 * c, dtype=_F32, device=dev)
        counter = _counter(dev, plan.num_groups)
        dummy = self._dummy(x)
        with self._device(x):
            K.bn_reduce_kernel[plan.grid()](
                x, *sx, dy, *sd, n, c, length, ws, counter, saved.centre.contiguous(),
                saved.mean.contiguous(), saved.rstd.contiguous(), totals,
                grad_weight if weight is not None else dummy,
                grad_bias if weight is not None else dummy,
                *plan.launch_args(), HAS_WEIGHT=weight is not None,
                WIDE=_wide(c, length, sx, sd), **plan.blocks(), **plan.finalize(),
            )  # fmt: skip
        return totals, grad_weight, grad_bias

    def bn_backward_input(
        self,
        x: Tensor,
        dy: Tensor,
        saved: BNSaved,
        weight: Tensor | None,
        totals: Tensor,
        count: Tensor,
    ) -> Tensor:
        plan, n, c, length = self._plan(x)
        sx = _ncl(x)
        assert sx is not None
        dy, sd = self._strided(dy, x)
        dx = torch.empty_like(x)
        so = _ncl(dx)
        assert so is not None
        dummy = self._dummy(x)
        with self._device(x):
            K.bn_input_kernel[plan.grid()](
                x, *sx, dy, *sd, dx, *so, n, c, length, saved.centre.contiguous(),
                saved.mean.contiguous(), saved.rstd.contiguous(),
                weight.contiguous() if weight is not None else dummy,
                totals.contiguous(), count, plan.num_cb, plan.rows, plan.chunks,
                plan.chunk_len, HAS_WEIGHT=weight is not None,
                WIDE=_wide(c, length, sx, sd, so), **plan.blocks(),
            )  # fmt: skip
        return dx
