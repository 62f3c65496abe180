"""The Triton kernels of the CUDA backend (:mod:`syncsn.kernels.triton`).

Every full-size pass views its input as (N, C, L) with one stride per axis (contiguous:
(C L, L, 1); channels-last: (L C, 1, C)) and runs as a one-dimensional grid of programs, each
owning a block of ``BLOCK_C`` channels, a run of ``rows`` samples and a chunk of the spatial
axis, read in tiles of ``BLOCK_C x BLOCK_L`` elements. The small per-(n, c) and per-channel
math lives in the kernels themselves:

* the reduction kernels (statistics, backward sums) end with a *finalize*: each program
  stores its float32 partial sums, then counts itself in on an atomic counter of its channel
  group; the last program of a group sums the group's partials over samples and chunks in
  float64 and writes the per-(n, c) and per-channel results. Switchable Normalization's LN
  scope needs every channel of a sample, so the last group to finish does that step over
  every group's results (a second counter). Counters reset themselves, so a launch needs
  no zeroed memory and replays in a CUDA graph;
* the elementwise kernels (output, input gradient) compute their coefficients for their
  block of channels in a prologue (mixing the scopes, the batch-scope gradient terms) and
  then stream over x.

Statistics are accumulated in float32 about a per-(n, c) shift, the mean of the first few
elements of the instance, which bounds the cancellation of sum (x - k)^2 - (sum (x - k))^2 / L
for inputs whose mean dwarfs their spread; the sums are combined in float64.

Floating-point scalars that must stay exact (eps, momentum) travel as the bits of their
float64 value: Triton would round a Python float argument to float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Sizes are never specialised: a size of 1 would become a compile-time constant, and the
# kernels convert sizes to floats.
_SIZES = ("N", "C", "L")
# Tiles of the finalizing steps over samples and channel groups.
_LN_ROWS = tl.constexpr(64)
_LN_GROUPS = tl.constexpr(16)
_ROWS_R = tl.constexpr(16)
_ROWS_C = tl.constexpr(128)
_ROWS_G = tl.constexpr(16)

# --- shared pieces ------------------------------------------------------------------------


@triton.jit
def _f64(bits):
    """A float64 from its bit pattern passed as an integer argument."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _split_pid(pid, chunks, num_cb):
    """(chunk, channel block, row block) of a program; chunks vary fastest, so the last
    programs of every channel group (which finalize) come at the end of the grid."""
    chunk = pid % chunks
    rest = pid // chunks
    return chunk, rest % num_cb, rest // num_cb


@triton.jit
def _tile(c, l, sc, sl, WIDE: tl.constexpr):
    """Offsets of a (BLOCK_C, BLOCK_L) tile within one sample."""
    if WIDE:
        return c.to(tl.int64)[:, None] * sc + l.to(tl.int64)[None, :] * sl
    return c[:, None] * sc + l[None, :] * sl


@triton.jit
def _arrive(cnt_ptr, expected):
    """Count this program in; True for the last of ``expected`` programs, which also resets
    the counter for the next launch. The barrier and the acquire-release atomic make the
    stores of every program visible to the last one."""
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    last = ticket == expected - 1
    if last:
        tl.atomic_xchg(cnt_ptr, 0, sem="acq_rel")
    return last


@triton.jit
def _group_of(cb, num_cb, num_rb, chunks, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """The channel group of a channel block and how many programs it has."""
    g = cb // (GROUP // BLOCK_C)
    blocks = tl.minimum(num_cb - g * (GROUP // BLOCK_C), GROUP // BLOCK_C)
    return g, blocks * num_rb * chunks


@triton.jit
def _chunk_sums(
    ws_ptr, n0, N, chunks, C, cg, gm, plane, PLANES: tl.constexpr, FIN_N: tl.constexpr,
    FIN_CH: tl.constexpr,
):  # fmt: skip
    """Float64 sums over the chunks of one plane of the (N, chunks, PLANES, C) float32
    workspace, for FIN_N samples from n0 and the group's channels: (FIN_N, GROUP)."""
    n = n0 + tl.arange(0, FIN_N)
    ch = tl.arange(0, FIN_CH)
    nm = n < N
    total = tl.zeros([FIN_N, cg.shape[0]], tl.float64)
    for ch0 in range(0, chunks, FIN_CH):
        k = ch0 + ch
        rows = (tl.cast(n, tl.int64)[:, None] * chunks + k[None, :]) * PLANES + plane
        offs = rows[:, :, None] * C + cg[None, None, :]
        mask = nm[:, None, None] & (k < chunks)[None, :, None] & gm[None, None, :]
        part = tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        total += tl.sum(part.to(tl.float64), 1)
    return total


@triton.jit
def _chan(count, mean, m2, b_count, b_mean, b_m2):
    """Parallel-variance combination of (count, mean, m2) with a block's."""
    total = count + b_count
    delta = b_mean - mean
    frac = b_count / tl.maximum(total, 1.0)
    return total, mean + delta * frac, m2 + b_m2 + delta * delta * (count * frac)


@triton.jit
def _and_flag(mask, flag):
    """``mask & flag`` for a scalar ``flag``, broadcast explicitly (Triton's interpreter
    mistypes the implicit broadcast of a scalar condition)."""
    return mask & ((tl.zeros(mask.shape, tl.int32) + tl.where(flag, 1, 0)) != 0)


@triton.jit
def _finite(v):
    """True where v (float64) is neither infinite nor NaN."""
    return tl.abs(v) <= 1.7976931348623157e308


# --- statistics pass (SN and BN) ------------------------------------------------------------


@triton.jit(do_not_specialize=_SIZES)
def stats_kernel(
    x_ptr, sxn, sxc, sxl, N, C, L,
    ws_ptr, ln_ws_ptr, cnt_ptr,
    centre_ptr, mean_ptr, var_ptr, ln_mean_ptr, ln_var_ptr, part_ptr,
    num_cb, rows, num_rb, chunks, chunk_len, num_groups, ddof,
    SN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, PILOT: tl.constexpr,
    GROUP: tl.constexpr, FIN_N: tl.constexpr, FIN_CH: tl.constexpr, WIDE: tl.constexpr,
    EVEN_C: tl.constexpr,
):  # fmt: skip
    """Per-(n, c) moments about a shift, then (finalize) the interface's statistics.

    Workspace ``ws`` (N, chunks, 3, C) float32: sum (x - k), sum (x - k)^2 and the shift k.
    SN: ``ln_ws`` (N, groups, 3) float64 holds each group's share of the LN scope.
    """
    pid = tl.program_id(0)
    chunk, cb, rb = _split_pid(pid, chunks, num_cb)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    l_lo = chunk * chunk_len
    l_hi = tl.minimum(l_lo + chunk_len, L)
    lanes = tl.arange(0, BLOCK_L)
    p = tl.arange(0, PILOT)
    pilot_mask = cm[:, None] & (p[None, :] < L)
    pilot_count = tl.minimum(L, PILOT).to(tl.float32)
    l_full = l_lo + (l_hi - l_lo) // BLOCK_L * BLOCK_L
    full = tl.broadcast_to(cm[:, None], (BLOCK_C, BLOCK_L))
    n_lo = rb * rows
    for n in range(n_lo, tl.minimum(n_lo + rows, N)):
        xb = x_ptr + tl.cast(n, tl.int64) * sxn
        head = tl.load(xb + _tile(c, p, sxc, sxl, WIDE), mask=pilot_mask, other=0.0)
        k = tl.sum(head.to(tl.float32), 1) / pilot_count
        s1 = tl.zeros([BLOCK_C, BLOCK_L], tl.float32)
        s2 = tl.zeros([BLOCK_C, BLOCK_L], tl.float32)
        xp = xb + _tile(c, l_lo + lanes, sxc, sxl, WIDE)
        for _ in range(l_lo, l_full, BLOCK_L):
            if EVEN_C:
                v = tl.load(xp)
            else:  # channels past C read 0 and have k = 0: they add nothing
                v = tl.load(xp, mask=full, other=0.0)
            d = v.to(tl.float32) - k[:, None]
            s1 += d
            s2 += d * d
            xp += BLOCK_L * sxl
        for l0 in range(l_full, l_hi, BLOCK_L):
            m = cm[:, None] & (l0 + lanes < l_hi)[None, :]
            v = tl.load(xp, mask=m, other=0.0)
            d = tl.where(m, v.to(tl.float32) - k[:, None], 0.0)
            s1 += d
            s2 += d * d
        w = ws_ptr + ((tl.cast(n, tl.int64) * chunks + chunk) * 3) * C
        tl.store(w + c, tl.sum(s1, 1), mask=cm)
        tl.store(w + C + c, tl.sum(s2, 1), mask=cm)
        tl.store(w + 2 * C + c, k, mask=cm)
    if pid == 0:
        if SN:
            tl.store(part_ptr, tl.cast(N, tl.float64))
        else:
            tl.store(part_ptr, tl.cast(N, tl.float64) * L)

    g, expected = _group_of(cb, num_cb, num_rb, chunks, BLOCK_C, GROUP)
    if _arrive(cnt_ptr + g, expected):
        _stats_finalize_group(
            ws_ptr, ln_ws_ptr, centre_ptr, mean_ptr, var_ptr, part_ptr, g, N, C, L, chunks,
            num_groups, SN, GROUP, FIN_N, FIN_CH,
        )  # fmt: skip
        if SN:
            if _arrive(cnt_ptr + num_groups, num_groups):
                _ln_finalize(ln_ws_ptr, ln_mean_ptr, ln_var_ptr, N, C, num_groups, ddof, GROUP)


@triton.jit
def _stats_finalize_group(
    ws_ptr, ln_ws_ptr, centre_ptr, mean_ptr, var_ptr, part_ptr, g, N, C, L, chunks,
    num_groups, SN: tl.constexpr, GROUP: tl.constexpr, FIN_N: tl.constexpr,
    FIN_CH: tl.constexpr,
):  # fmt: skip
    cg = g * GROUP + tl.arange(0, GROUP)
    gm = cg < C
    group_width = tl.minimum(C - g * GROUP, GROUP).to(tl.float64)
    count = tl.zeros([GROUP], tl.float64)
    a_mean = tl.zeros([GROUP], tl.float64)
    a_m2 = tl.zeros([GROUP], tl.float64)
    extra = tl.zeros([GROUP], tl.float64)  # SN: sum of instance variances; BN: of m2
    for n0 in range(0, N, FIN_N):
        n = n0 + tl.arange(0, FIN_N)
        nm = n < N
        m2d = nm[:, None] & gm[None, :]
        s1 = _chunk_sums(ws_ptr, n0, N, chunks, C, cg, gm, 0, 3, FIN_N, FIN_CH)
        s2 = _chunk_sums(ws_ptr, n0, N, chunks, C, cg, gm, 1, 3, FIN_N, FIN_CH)
        nc = tl.cast(n, tl.int64)[:, None] * C + cg[None, :]
        k_offs = (tl.cast(n, tl.int64)[:, None] * chunks * 3 + 2) * C + cg[None, :]
        k = tl.load(ws_ptr + k_offs, mask=m2d, other=0.0, cache_modifier=".cg")
        mean = k.to(tl.float64) + s1 / L
        m2 = tl.maximum(s2 - s1 * s1 / L, 0.0)
        tl.store(centre_ptr + nc, mean.to(tl.float32), mask=m2d)
        if SN:
            var = tl.where(L > 1, m2 / tl.maximum(L - 1, 1), 0.0)
            tl.store(mean_ptr + nc, mean, mask=m2d)
            tl.store(var_ptr + nc, var, mask=m2d)
            # This group's share of each sample's LN scope: mean, centred squares and
            # summed variances of its instance means.
            row_mean = tl.sum(tl.where(m2d, mean, 0.0), 1) / group_width
            dev = tl.where(m2d, mean - row_mean[:, None], 0.0)
            ln = ln_ws_ptr + (tl.cast(n, tl.int64) * num_groups + g) * 3
            tl.store(ln, row_mean, mask=nm)
            tl.store(ln + 1, tl.sum(dev * dev, 1), mask=nm)
            tl.store(ln + 2, tl.sum(tl.where(m2d, var, 0.0), 1), mask=nm)
            spread = var
        else:
            spread = m2
        # The samples of this block, then Chan's formula into the running per-channel sums.
        b_count = tl.minimum(N - n0, FIN_N).to(tl.float64)
        b_mean = tl.sum(tl.where(m2d, mean, 0.0), 0) / b_count
        b_dev = tl.where(m2d, mean - b_mean[None, :], 0.0)
        count, a_mean, a_m2 = _chan(count, a_mean, a_m2, b_count, b_mean, tl.sum(b_dev * b_dev, 0))
        extra += tl.sum(tl.where(m2d, spread, 0.0), 0)
    tl.store(part_ptr + 1 + cg, a_mean, mask=gm)
    if SN:
        tl.store(part_ptr + 1 + C + cg, a_m2 + extra, mask=gm)
    else:
        tl.store(part_ptr + 1 + C + cg, extra + a_m2 * L, mask=gm)


@triton.jit
def _ln_finalize(ln_ws_ptr, ln_mean_ptr, ln_var_ptr, N, C, num_groups, ddof, GROUP: tl.constexpr):
    """Each sample's LN scope from the groups' shares (two passes over the groups)."""
    r = tl.arange(0, _LN_ROWS)
    q = tl.arange(0, _LN_GROUPS)
    for n0 in range(0, N, _LN_ROWS):
        n = n0 + r
        nm = n < N
        total = tl.zeros([_LN_ROWS, _LN_GROUPS], tl.float64)
        for g0 in range(0, num_groups, _LN_GROUPS):
            g = g0 + q
            m = nm[:, None] & (g < num_groups)[None, :]
            width = tl.minimum(C - g * GROUP, GROUP).to(tl.float64)
            base = (tl.cast(n, tl.int64)[:, None] * num_groups + g[None, :]) * 3
            mean_g = tl.load(ln_ws_ptr + base, mask=m, other=0.0, cache_modifier=".cg")
            total += tl.where(m, mean_g * width[None, :], 0.0)
        ln_mean = tl.sum(total, 1) / C
        spread = tl.zeros([_LN_ROWS, _LN_GROUPS], tl.float64)
        for g0 in range(0, num_groups, _LN_GROUPS):
            g = g0 + q
            m = nm[:, None] & (g < num_groups)[None, :]
            width = tl.minimum(C - g * GROUP, GROUP).to(tl.float64)
            base = (tl.cast(n, tl.int64)[:, None] * num_groups + g[None, :]) * 3
            mean_g = tl.load(ln_ws_ptr + base, mask=m, other=0.0, cache_modifier=".cg")
            m2_g = tl.load(ln_ws_ptr + base + 1, mask=m, other=0.0, cache_modifier=".cg")
            var_g = tl.load(ln_ws_ptr + base + 2, mask=m, other=0.0, cache_modifier=".cg")
            dev = mean_g - ln_mean[:, None]
            spread += tl.where(m, m2_g + var_g + width[None, :] * dev * dev, 0.0)
        tl.store(ln_mean_ptr + n, ln_mean, mask=nm)
        tl.store(ln_var_ptr + n, tl.sum(spread, 1) / tl.maximum(C - ddof, 1), mask=nm)


# --- the merge of every rank's partials -----------------------------------------------------


@triton.jit
def _merged(g_ptr, row, world, C, c, cm, count, W_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merged mean and m2 (BLOCK_C,) of channels c over the ranks, in rank order."""
    w = tl.arange(0, W_BLOCK)
    total = tl.zeros([BLOCK_C], tl.float64)
    for w0 in range(0, world, W_BLOCK):
        r = w0 + w
        rm = r < world
        base = tl.cast(r, tl.int64) * row
        n_r = tl.load(g_ptr + base, mask=rm, other=0.0)
        m = rm[:, None] & cm[None, :]
        mean_r = tl.load(g_ptr + base[:, None] + 1 + c[None, :], mask=m, other=0.0)
        total += tl.sum(n_r[:, None] * mean_r, 0)
    mean = total / tl.maximum(count, 1.0)
    m2 = tl.zeros([BLOCK_C], tl.float64)
    for w0 in range(0, world, W_BLOCK):
        r = w0 + w
        rm = r < world
        base = tl.cast(r, tl.int64) * row
        n_r = tl.load(g_ptr + base, mask=rm, other=0.0)
        m = rm[:, None] & cm[None, :]
        mean_r = tl.load(g_ptr + base[:, None] + 1 + c[None, :], mask=m, other=0.0)
        m2_r = tl.load(g_ptr + base[:, None] + 1 + C + c[None, :], mask=m, other=0.0)
        dev = mean_r - mean[None, :]
        m2 += tl.sum(tl.where(m, m2_r + n_r[:, None] * dev * dev, 0.0), 0)
    return mean, m2


@triton.jit(do_not_specialize=("world", "C"))
def merge_kernel(
    g_ptr, row, world, C, ddof, running_ddof,
    rm_ptr, rv_ptr, nbt_ptr, momentum_bits,
    count_ptr, mean_ptr, var_ptr, flags_ptr,
    HAS_RUNNING: tl.constexpr, HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr,
    W_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One program: merge (world, 1 + 2C) partials, fold the running statistics, set flags.

    Three sweeps over the channels, each recomputing the merge (the same bits each time):
    the statistics and their finiteness, then whether the folded running statistics fit
    their dtype, then the fold itself, which needs both global answers first.
    """
    w = tl.arange(0, W_BLOCK)
    counts = tl.zeros([W_BLOCK], tl.float64)
    for w0 in range(0, world, W_BLOCK):
        r = w0 + w
        counts += tl.load(g_ptr + tl.cast(r, tl.int64) * row, mask=r < world, other=0.0)
    count = tl.sum(counts, 0)
    lanes = tl.arange(0, BLOCK_C)
    bad = tl.zeros([BLOCK_C], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + lanes
        cm = c < C
        mean, m2 = _merged(g_ptr, row, world, C, c, cm, count, W_BLOCK, BLOCK_C)
        tl.store(mean_ptr + c, mean, mask=cm)
        tl.store(var_ptr + c, m2 / tl.maximum(count - ddof, 1.0), mask=cm)
        ok = _finite(mean) & _finite(m2)
        bad += tl.where(cm & (ok == 0), 1, 0)
    finite = tl.sum(bad, 0) == 0
    enough = count >= 2.0
    flags = tl.where(finite, 0, 1) | tl.where((count > 0.0) & (enough == 0), 4, 0)
    if HAS_RUNNING:
        valid = finite & enough
        if CUMULATIVE:
            done = tl.maximum(tl.load(nbt_ptr) + tl.where(valid, 1, 0), 1)
            factor = 1.0 / done.to(tl.float64)
        else:
            factor = _f64(momentum_bits)
        unfit = tl.zeros([BLOCK_C], tl.int32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + lanes
            cm = c < C
            new_mean, new_var = _folded(
                g_ptr, row, world, C, c, cm, count, running_ddof, rm_ptr, rv_ptr, factor,
                W_BLOCK, BLOCK_C,
            )  # fmt: skip
            ok = _finite(new_mean.to(tl.float64)) & _finite(new_var.to(tl.float64))
            unfit += tl.where(cm & (ok == 0), 1, 0)
        fits = tl.sum(unfit, 0) == 0
        flags = flags | tl.where(valid & (fits == 0), 2, 0)
        valid = valid & fits
        for c0 in range(0, C, BLOCK_C):
            c = c0 + lanes
            cm = c < C
            new_mean, new_var = _folded(
                g_ptr, row, world, C, c, cm, count, running_ddof, rm_ptr, rv_ptr, factor,
                W_BLOCK, BLOCK_C,
            )  # fmt: skip
            tl.store(rm_ptr + c, new_mean, mask=_and_flag(cm, valid))
            tl.store(rv_ptr + c, new_var, mask=_and_flag(cm, valid))
        if HAS_NBT:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + tl.where(valid, 1, 0))
    tl.store(count_ptr, count)
    tl.store(flags_ptr, flags.to(tl.int32))


@triton.jit
def _folded(
    g_ptr, row, world, C, c, cm, count, running_ddof, rm_ptr, rv_ptr, factor,
    W_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """(1 - factor) running + factor batch, in float64, rounded to the buffers' dtype."""
    mean, m2 = _merged(g_ptr, row, world, C, c, cm, count, W_BLOCK, BLOCK_C)
    r_mean = tl.load(rm_ptr + c, mask=cm, other=0.0).to(tl.float64)
    r_var = tl.load(rv_ptr + c, mask=cm, other=0.0).to(tl.float64)
    batch_var = m2 / tl.maximum(count - running_ddof, 1.0)
    new_mean = r_mean + factor * (mean - r_mean)
    new_var = r_var + factor * (batch_var - r_var)
    return new_mean.to(rm_ptr.dtype.element_ty), new_var.to(rv_ptr.dtype.element_ty)


# --- Sparse Switchable Normalization: sparsestmax of at most three logits ------------------
# The rounds of syncsn.sparsemax._sparsestmax_unchecked written out for one vector held in
# four lanes (0 IN, 1 LN, 2 BN, 3 padding): two pushes, then the vertex the last round
# leaves. Every program of a kernel computes them (a few hundred flops), so that neither
# the weights nor their gradient need a launch of their own.

_LANES = tl.constexpr(4)
_FAR = tl.constexpr(1e300)


@triton.jit
def _scope_lanes(SCOPES: tl.constexpr):
    """(4,) lanes: the scope index, whether the layer has that scope, its slot in the
    layer's (K,) vectors."""
    j = tl.arange(0, _LANES)
    own = ((tl.full([_LANES], SCOPES, tl.int32) >> j) & 1) == 1
    slot = tl.where(j > 0, SCOPES & 1, 0) + tl.where(j > 1, (SCOPES >> 1) & 1, 0)
    return j, own & (j < 3), slot


@triton.jit
def _sparsemax_lanes(q, valid):
    """Sparsemax over the valid lanes: the support is every entry that qualifies against
    the entries at least as large (ties qualify together), as in the sorted algorithm."""
    z = tl.where(valid, q - tl.max(tl.where(valid, q, -_FAR), 0), 0.0)
    at_least = (z[None, :] >= z[:, None]) & valid[None, :]
    rank = tl.sum(at_least.to(tl.float64), 1)
    above = tl.sum(tl.where(at_least, z[None, :], 0.0), 1)
    support = valid & (1.0 + rank * z > above)
    tau = (tl.sum(tl.where(support, z, 0.0), 0) - 1.0) / tl.sum(support.to(tl.float64), 0)
    return tl.where(valid, tl.maximum(z - tau, 0.0), 0.0)


@triton.jit
def _sparsemax_vjp(support, size, g):
    return tl.where(support, g - tl.sum(tl.where(support, g, 0.0), 0) / size, 0.0)


@triton.jit
def _push_round(q, valid, radius, centre_prev, leave_tol, FIRST: tl.constexpr):
    """One round: sparsemax of ``q``, then the push away from the centre of its face.
    Returns what the forward and the vector-Jacobian product need."""
    w = _sparsemax_lanes(q, valid)
    support = w > 0
    size = tl.sum(support.to(tl.float64), 0)
    centre = tl.where(support, 1.0 / size, 0.0)
    if not FIRST:
        travelled = tl.sum((centre - centre_prev) * (centre - centre_prev), 0)
        radius = tl.sqrt(tl.maximum(radius * radius - travelled, 0.0))
    offset = w - centre
    offset = tl.where(support, offset - tl.sum(offset, 0) / size, 0.0)
    dist_sq = tl.sum(offset * offset, 0)
    degenerate = (tl.max(w, 0) == tl.min(tl.where(support, w, _FAR), 0)) | (dist_sq == 0)
    dist = tl.sqrt(tl.where(degenerate, 1.0, dist_sq))
    keep = (size == 1) | degenerate | (dist >= radius)
    p = centre + (radius / dist) * offset
    leaves = tl.min(tl.where(support, p, _FAR), 0) < leave_tol
    kept = tl.where(size == 1, w / tl.sum(w, 0), w)
    value = tl.where(keep, kept, p / tl.sum(p, 0))
    return support, size, centre, offset, dist, radius, keep, keep | ~leaves, p, value


@triton.jit
def _round_vjp(support, size, keep, offset, dist, radius, p, g):
    """The gradient of a round's value, ``g``, taken back to the round's ``q``."""
    total = tl.sum(p, 0)
    g_p = g / total - tl.sum(g * p, 0) / (total * total)
    pushed = _sparsemax_vjp(support, size, _push_vjp(offset, dist, radius, g_p))
    return tl.where(keep, _sparsemax_vjp(support, size, g), pushed)


@triton.jit
def _push_vjp(offset, dist, radius, g_p):
    """Through p = centre + radius / |offset| * offset, to the offset."""
    return (radius / dist) * (g_p - offset * (tl.sum(offset * g_p, 0) / (dist * dist)))


@triton.jit
def _sparsestmax_lanes(z, valid, radius, leave_tol, g, VJP: tl.constexpr):
    """sparsestmax(z, radius) over the valid lanes; with ``VJP`` the gradient ``g`` of the
    result taken back to ``z`` instead."""
    s1, n1, c1, o1, d1, r1, keep1, done1, p1, value1 = _push_round(
        z, valid, radius, z, leave_tol, True
    )
    # A coordinate that leaves the face is lowered by 2: out of the next support.
    q2 = tl.where(p1 >= leave_tol, p1, p1 - 2.0)
    s2, n2, c2, o2, d2, r2, keep2, done2, p2, value2 = _push_round(
        q2, valid, r1, c1, leave_tol, False
    )
    if VJP:
        back1 = _round_vjp(s1, n1, keep1, o1, d1, r1, p1, g)
        back2 = _round_vjp(s2, n2, keep2, o2, d2, r2, p2, g)
        back2 = _sparsemax_vjp(s1, n1, _push_vjp(o1, d1, r1, back2))
        # The last vertex has a zero gradient.
        return tl.where(done1, back1, tl.where(done2, back2, 0.0))
    q3 = tl.where(p2 >= leave_tol, p2, p2 - 2.0)
    lane = tl.arange(0, _LANES)
    top = tl.max(tl.where(valid, q3, -_FAR), 0)
    first = tl.min(tl.where(valid & (q3 == top), lane, _LANES), 0)
    vertex = tl.where(lane == first, 1.0, 0.0)
    return tl.where(done1, value1, tl.where(done2, value2, vertex))


# --- Switchable Normalization: output -------------------------------------------------------


@triton.jit
def _switch(w_ptr, index: tl.constexpr, PRESENT: tl.constexpr, LOGITS: tl.constexpr):
    """Entry ``index`` of a layer's (K,) switch vector in float64; for a scope the layer
    lacks, weight 0 (logit -inf)."""
    if PRESENT:
        return tl.load(w_ptr + index).to(tl.float64)
    elif LOGITS:
        return tl.full([], float("-inf"), tl.float64)
    else:
        return tl.full([], 0.0, tl.float64)


@triton.jit
def _one_hot_entry(k: tl.constexpr, SELECT: tl.constexpr):
    if k == SELECT:
        return tl.full([], 1.0, tl.float64)
    else:
        return tl.full([], 0.0, tl.float64)


@triton.jit
def _mixing(
    w_ptr, radius_ptr, frozen_ptr, LOGITS: tl.constexpr, SCOPES: tl.constexpr,
    SELECT: tl.constexpr, SPARSE: tl.constexpr,
):  # fmt: skip
    """The three mixing weights over (IN, LN, BN) in float64 (functional.mixing_weights64)
    from the (K,) vector over the scopes of the mask ``SCOPES``: the softmax of logits, or
    weights renormalised to sum to 1; with ``SELECT`` >= 0 (a frozen vector) the one-hot
    weights of scope ``SELECT``; with ``SPARSE`` the sparsestmax of the logits, one-hot where
    ``frozen_ptr`` holds a scope (:func:`_sparse_switch`)."""
    if SELECT >= 0:
        w0 = _one_hot_entry(0, SELECT)
        w1 = _one_hot_entry(1, SELECT)
        w2 = _one_hot_entry(2, SELECT)
    elif SPARSE:
        j, _, _ = _scope_lanes(SCOPES)
        p, _ = _sparse_switch(w_ptr, radius_ptr, frozen_ptr, SCOPES)
        w0 = tl.sum(tl.where(j == 0, p, 0.0), 0)
        w1 = tl.sum(tl.where(j == 1, p, 0.0), 0)
        w2 = tl.sum(tl.where(j == 2, p, 0.0), 0)
    else:
        w0 = _switch(w_ptr, 0, SCOPES & 1, LOGITS)
        w1 = _switch(w_ptr, SCOPES & 1, (SCOPES >> 1) & 1, LOGITS)
        w2 = _switch(w_ptr, (SCOPES & 1) + ((SCOPES >> 1) & 1), (SCOPES >> 2) & 1, LOGITS)
        if LOGITS:
            top = tl.maximum(tl.maximum(w0, w1), w2)
            w0 = tl.exp(w0 - top)
            w1 = tl.exp(w1 - top)
            w2 = tl.exp(w2 - top)
        total = w0 + w1 + w2
        w0 = w0 / total
        w1 = w1 / total
        w2 = w2 / total
    return w0, w1, w2


@triton.jit
def _leave_tol(radius_ptr):
    """4 ulps of the dtype SSN's weights are defined in (float32 for half parameters)."""
    if radius_ptr.dtype.element_ty == tl.float64:
        return 4 * 2.220446049250313e-16
    else:
        return 4 * 1.1920928955078125e-07


@triton.jit
def _without_projection(z, own):
    """The lanes of logits ``z`` that are NaN: all of the layer's scopes when the logits
    have no sparsemax (a NaN or +inf among them, or only -inf), none otherwise, as
    syncsn.sparsemax.sparsemax gives NaN weights (and gradients) there."""
    nan = tl.sum((own & (z != z)).to(tl.int32), 0) > 0
    top = tl.max(tl.where(own, z, tl.full([_LANES], float("-inf"), tl.float64)), 0)
    return _and_flag(own, nan | ~_finite(top))


@triton.jit
def _sparse_switch(z_ptr, radius_ptr, frozen_ptr, SCOPES: tl.constexpr):
    """An SSN vector's weights in lanes (one-hot on the frozen scope, else the sparsestmax
    of the logits at ``z_ptr``) and the selection after this call: the frozen scope, or the
    one a one-hot sparsestmax selects, or -1 (syncsn.sparse_switchnorm._newly_frozen)."""
    j, own, slot = _scope_lanes(SCOPES)
    z = tl.load(z_ptr + slot, mask=own, other=0.0).to(tl.float64)
    radius = tl.load(radius_ptr).to(tl.float64)
    p = _sparsestmax_lanes(z, own, radius, _leave_tol(radius_ptr), z, False)
    unusable = _without_projection(z, own)
    p = tl.where(unusable, float("nan"), p)
    frozen = tl.load(frozen_ptr)
    one_hot = tl.sum(((p != 0) & ~unusable).to(tl.int32), 0) == 1
    selected = tl.sum(tl.where(p != 0, slot, 0), 0).to(frozen.dtype)
    selection = tl.where((frozen < 0) & one_hot, selected, frozen)
    p = tl.where(frozen >= 0, tl.where(own & (slot == frozen), 1.0, 0.0), p)
    return p, selection


@triton.jit
def _sparse_switch_vjp(z_ptr, radius_ptr, frozen_ptr, g, SCOPES: tl.constexpr):
    """The gradient ``g`` (lanes) of an SSN vector's weights taken to its logits (lanes):
    zero for a frozen vector, whose weights are constants."""
    j, own, slot = _scope_lanes(SCOPES)
    z = tl.load(z_ptr + slot, mask=own, other=0.0).to(tl.float64)
    radius = tl.load(radius_ptr).to(tl.float64)
    g_z = _sparsestmax_lanes(z, own, radius, _leave_tol(radius_ptr), g, True)
    g_z = tl.where(_without_projection(z, own), float("nan"), g_z)
    return tl.where(tl.load(frozen_ptr) >= 0, 0.0, g_z)


@triton.jit
def _param(ptr, c, cm, default, HAS: tl.constexpr):
    if HAS:
        return tl.load(ptr + c, mask=cm, other=default).to(tl.float64)
    return tl.full(c.shape, default, tl.float64)


@triton.jit(do_not_specialize=_SIZES)
def sn_output_kernel(
    x_ptr, sxn, sxc, sxl, y_ptr, syn, syc, syl, N, C, L,
    centre_ptr, mean_ptr, var_ptr, ln_mean_ptr, ln_var_ptr, bn_mean_ptr, bn_var_ptr,
    w_ptr, v_ptr, radius_ptr, frozen_w_ptr, frozen_v_ptr, selection_ptr,
    weight_ptr, bias_ptr, eps_bits, mix_mean_ptr, mix_var_ptr, rstd_ptr,
    num_cb, rows, chunks, chunk_len,
    HAS_BN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    LOGITS: tl.constexpr, SCOPES: tl.constexpr, SELECT_W: tl.constexpr, SELECT_V: tl.constexpr,
    SPARSE: tl.constexpr, FREEZE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    WIDE: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    """Prologue: the mixing weights, and the scopes of each (n, c) mixed (float64); then
    y = (x - centre) a + b. With ``SPARSE`` the first program also writes the selections
    after this call to ``selection`` (2,), and with ``FREEZE`` (an SSN layer in training)
    into the frozen buffers: a vector found one-hot gives the same weights frozen or not, so
    the other programs may read either."""
    pid = tl.program_id(0)
    if SPARSE:
        if pid == 0:
            _, select_w = _sparse_switch(w_ptr, radius_ptr, frozen_w_ptr, SCOPES)
            _, select_v = _sparse_switch(v_ptr, radius_ptr, frozen_v_ptr, SCOPES)
            tl.store(selection_ptr, select_w)
            tl.store(selection_ptr + 1, select_v)
            if FREEZE:
                tl.store(frozen_w_ptr, select_w)
                tl.store(frozen_v_ptr, select_v)
    chunk, cb, rb = _split_pid(pid, chunks, num_cb)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    l_lo = chunk * chunk_len
    l_hi = tl.minimum(l_lo + chunk_len, L)
    lanes = tl.arange(0, BLOCK_L)
    eps = _f64(eps_bits)
    w0, w1, w2 = _mixing(w_ptr, radius_ptr, frozen_w_ptr, LOGITS, SCOPES, SELECT_W, SPARSE)
    v0, v1, v2 = _mixing(v_ptr, radius_ptr, frozen_v_ptr, LOGITS, SCOPES, SELECT_V, SPARSE)
    gamma = _param(weight_ptr, c, cm, 1.0, HAS_WEIGHT)
    beta = _param(bias_ptr, c, cm, 0.0, HAS_BIAS)
    if HAS_BN:
        bn_mean = tl.load(bn_mean_ptr + c, mask=cm, other=0.0)
        bn_var = tl.load(bn_var_ptr + c, mask=cm, other=0.0)
    n_lo = rb * rows
    for n in range(n_lo, tl.minimum(n_lo + rows, N)):
        nc = tl.cast(n, tl.int64) * C + c
        mu = w0 * tl.load(mean_ptr + nc, mask=cm, other=0.0) + w1 * tl.load(ln_mean_ptr + n)
        var = v0 * tl.load(var_ptr + nc, mask=cm, other=0.0) + v1 * tl.load(ln_var_ptr + n)
        if HAS_BN:
            mu = mu + w2 * bn_mean
            var = var + v2 * bn_var
        rstd = 1.0 / tl.sqrt(var + eps)
        centre = tl.load(centre_ptr + nc, mask=cm, other=0.0)
        scale = rstd * gamma
        shift = (centre.to(tl.float64) - mu) * scale + beta
        first = _and_flag(cm, chunk == 0)
        tl.store(mix_mean_ptr + nc, mu, mask=first)
        tl.store(mix_var_ptr + nc, var, mask=first)
        tl.store(rstd_ptr + nc, rstd, mask=first)
        _affine_rows(
            x_ptr + tl.cast(n, tl.int64) * sxn, sxc, sxl,
            y_ptr + tl.cast(n, tl.int64) * syn, syc, syl,
            c, cm, l_lo, l_hi, lanes, centre, scale.to(tl.float32), shift.to(tl.float32),
            WIDE, EVEN_C,
        )  # fmt: skip


@triton.jit
def _affine_rows(
    xb, sxc, sxl, yb, syc, syl, c, cm, l_lo, l_hi, lanes, centre, scale, shift,
    WIDE: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    """y = (x - centre) * scale + shift over one sample's chunk, float32 coefficients."""
    xp = xb + _tile(c, l_lo + lanes, sxc, sxl, WIDE)
    yp = yb + _tile(c, l_lo + lanes, syc, syl, WIDE)
    l_full = l_lo + (l_hi - l_lo) // lanes.shape[0] * lanes.shape[0]
    full = tl.broadcast_to(cm[:, None], (c.shape[0], lanes.shape[0]))
    for _ in range(l_lo, l_full, lanes.shape[0]):
        if EVEN_C:
            v = tl.load(xp).to(tl.float32)
        else:
            v = tl.load(xp, mask=full, other=0.0).to(tl.float32)
        out = ((v - centre[:, None]) * scale[:, None] + shift[:, None]).to(yb.dtype.element_ty)
        if EVEN_C:
            tl.store(yp, out)
        else:
            tl.store(yp, out, mask=full)
        xp += lanes.shape[0] * sxl
        yp += lanes.shape[0] * syl
    for l0 in range(l_full, l_hi, lanes.shape[0]):
        m = cm[:, None] & (l0 + lanes < l_hi)[None, :]
        v = tl.load(xp, mask=m, other=0.0).to(tl.float32)
        out = (v - centre[:, None]) * scale[:, None] + shift[:, None]
        tl.store(yp, out.to(yb.dtype.element_ty), mask=m)
        xp += lanes.shape[0] * sxl
        yp += lanes.shape[0] * syl


@triton.jit
def _combine_rows(
    xb, sxc, sxl, db, sdc, sdl, ob, soc, sol, c, cm, l_lo, l_hi, lanes, centre, k_dy, k_x,
    k_0, WIDE: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    """dx = k_dy * dy + k_x * (x - centre) + k_0 over one sample's chunk."""
    xp = xb + _tile(c, l_lo + lanes, sxc, sxl, WIDE)
    dp = db + _tile(c, l_lo + lanes, sdc, sdl, WIDE)
    op = ob + _tile(c, l_lo + lanes, soc, sol, WIDE)
    l_full = l_lo + (l_hi - l_lo) // lanes.shape[0] * lanes.shape[0]
    full = tl.broadcast_to(cm[:, None], (c.shape[0], lanes.shape[0]))
    for _ in range(l_lo, l_full, lanes.shape[0]):
        if EVEN_C:
            v = tl.load(xp).to(tl.float32)
            g = tl.load(dp).to(tl.float32)
        else:
            v = tl.load(xp, mask=full, other=0.0).to(tl.float32)
            g = tl.load(dp, mask=full, other=0.0).to(tl.float32)
        out = g * k_dy[:, None] + (v - centre[:, None]) * k_x[:, None] + k_0[:, None]
        if EVEN_C:
            tl.store(op, out.to(ob.dtype.element_ty))
        else:
            tl.store(op, out.to(ob.dtype.element_ty), mask=full)
        xp += lanes.shape[0] * sxl
        dp += lanes.shape[0] * sdl
        op += lanes.shape[0] * sol
    for l0 in range(l_full, l_hi, lanes.shape[0]):
        m = cm[:, None] & (l0 + lanes < l_hi)[None, :]
        v = tl.load(xp, mask=m, other=0.0).to(tl.float32)
        g = tl.load(dp, mask=m, other=0.0).to(tl.float32)
        out = g * k_dy[:, None] + (v - centre[:, None]) * k_x[:, None] + k_0[:, None]
        tl.store(op, out.to(ob.dtype.element_ty), mask=m)
        xp += lanes.shape[0] * sxl
        dp += lanes.shape[0] * sdl
        op += lanes.shape[0] * sol


# --- backward reduction (SN and BN) ---------------------------------------------------------


@triton.jit
def _dot_rows(
    ws_ptr, n, chunks, chunk, C, xb, sxc, sxl, db, sdc, sdl, c, cm, l_lo, l_hi, lanes,
    centre, WIDE: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    """Store sum dy and sum dy * (x - centre) of one sample's chunk (float32)."""
    s1 = tl.zeros([c.shape[0], lanes.shape[0]], tl.float32)
    s2 = tl.zeros([c.shape[0], lanes.shape[0]], tl.float32)
    xp = xb + _tile(c, l_lo + lanes, sxc, sxl, WIDE)
    dp = db + _tile(c, l_lo + lanes, sdc, sdl, WIDE)
    l_full = l_lo + (l_hi - l_lo) // lanes.shape[0] * lanes.shape[0]
    full = tl.broadcast_to(cm[:, None], (c.shape[0], lanes.shape[0]))
    for _ in range(l_lo, l_full, lanes.shape[0]):
        if EVEN_C:
            v = tl.load(xp).to(tl.float32)
            g = tl.load(dp).to(tl.float32)
        else:  # channels past C read dy = 0: they add nothing
            v = tl.load(xp, mask=full, other=0.0).to(tl.float32)
            g = tl.load(dp, mask=full, other=0.0).to(tl.float32)
        s1 += g
        s2 += g * (v - centre[:, None])
        xp += lanes.shape[0] * sxl
        dp += lanes.shape[0] * sdl
    for l0 in range(l_full, l_hi, lanes.shape[0]):
        m = cm[:, None] & (l0 + lanes < l_hi)[None, :]
        v = tl.load(xp, mask=m, other=0.0).to(tl.float32)
        g = tl.load(dp, mask=m, other=0.0).to(tl.float32)
        s1 += g
        s2 += g * tl.where(m, v - centre[:, None], 0.0)
        xp += lanes.shape[0] * sxl
        dp += lanes.shape[0] * sdl
    w = ws_ptr + ((tl.cast(n, tl.int64) * chunks + chunk) * 2) * C
    tl.store(w + c, tl.sum(s1, 1), mask=cm)
    tl.store(w + C + c, tl.sum(s2, 1), mask=cm)


@triton.jit(do_not_specialize=_SIZES)
def sn_reduce_kernel(
    x_ptr, sxn, sxc, sxl, dy_ptr, sdn, sdc, sdl, N, C, L,
    ws_ptr, rows_ws_ptr, gw_ws_ptr, cnt_ptr,
    centre_ptr, mean_ptr, var_ptr, ln_mean_ptr, ln_var_ptr, mix_mean_ptr, mix_var_ptr,
    rstd_ptr, bn_mean_ptr, bn_var_ptr, w_ptr, v_ptr, radius_ptr, selection_ptr,
    weight_ptr, totals_ptr, grad_mean_ptr, grad_var_ptr, grad_w_ptr, grad_v_ptr,
    grad_weight_ptr, grad_bias_ptr,
    num_cb, rows, num_rb, chunks, chunk_len, num_groups, ddof,
    HAS_BN: tl.constexpr, HAS_WEIGHT: tl.constexpr, LOGITS: tl.constexpr, SCOPES: tl.constexpr,
    SELECT_W: tl.constexpr, SELECT_V: tl.constexpr, SPARSE: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr, GROUP: tl.constexpr, FIN_N: tl.constexpr, FIN_CH: tl.constexpr,
    WIDE: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    """SN's backward reduction and the small math up to the backward collective.

    Workspaces: ``ws`` (N, chunks, 2, C) float32 sums; ``rows_ws`` (N, groups, 2) float64:
    each group's sums over its channels of d loss / d mu and d loss / d var per sample;
    ``gw_ws`` (groups, 6) float64: each group's share of the switch-weight gradients.
    With ``SPARSE``, ``selection`` (2,) is what the forward had frozen after its call.
    """
    pid = tl.program_id(0)
    chunk, cb, rb = _split_pid(pid, chunks, num_cb)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    l_lo = chunk * chunk_len
    l_hi = tl.minimum(l_lo + chunk_len, L)
    lanes = tl.arange(0, BLOCK_L)
    n_lo = rb * rows
    for n in range(n_lo, tl.minimum(n_lo + rows, N)):
        centre = tl.load(centre_ptr + tl.cast(n, tl.int64) * C + c, mask=cm, other=0.0)
        _dot_rows(
            ws_ptr, n, chunks, chunk, C, x_ptr + tl.cast(n, tl.int64) * sxn, sxc, sxl,
            dy_ptr + tl.cast(n, tl.int64) * sdn, sdc, sdl, c, cm, l_lo, l_hi, lanes,
            centre.to(tl.float32), WIDE, EVEN_C,
        )  # fmt: skip
    g, expected = _group_of(cb, num_cb, num_rb, chunks, BLOCK_C, GROUP)
    if _arrive(cnt_ptr + g, expected):
        _sn_reduce_group(
            ws_ptr, rows_ws_ptr, gw_ws_ptr, g, N, C, chunks, num_groups,
            centre_ptr, mean_ptr, var_ptr, ln_mean_ptr, ln_var_ptr, mix_mean_ptr, mix_var_ptr,
            rstd_ptr, bn_mean_ptr, bn_var_ptr, w_ptr, v_ptr, radius_ptr, selection_ptr,
            selection_ptr + 1, weight_ptr, totals_ptr, grad_mean_ptr, grad_var_ptr, grad_weight_ptr,
            grad_bias_ptr, HAS_BN, HAS_WEIGHT, LOGITS, SCOPES, SELECT_W, SELECT_V, SPARSE,
            GROUP, FIN_N, FIN_CH,
        )  # fmt: skip
        if _arrive(cnt_ptr + num_groups, num_groups):
            _sn_reduce_rows(
                rows_ws_ptr, gw_ws_ptr, N, C, num_groups, ddof, mean_ptr, ln_mean_ptr,
                w_ptr, v_ptr, radius_ptr, selection_ptr, selection_ptr + 1, grad_mean_ptr,
                grad_var_ptr, grad_w_ptr, grad_v_ptr, LOGITS, SCOPES, SELECT_W, SELECT_V, SPARSE,
            )  # fmt: skip


@triton.jit
def _sn_reduce_group(
    ws_ptr, rows_ws_ptr, gw_ws_ptr, g, N, C, chunks, num_groups,
    centre_ptr, mean_ptr, var_ptr, ln_mean_ptr, ln_var_ptr, mix_mean_ptr, mix_var_ptr,
    rstd_ptr, bn_mean_ptr, bn_var_ptr, w_ptr, v_ptr, radius_ptr, frozen_w_ptr, frozen_v_ptr,
    weight_ptr, totals_ptr, grad_mean_ptr, grad_var_ptr, grad_weight_ptr, grad_bias_ptr,
    HAS_BN: tl.constexpr, HAS_WEIGHT: tl.constexpr, LOGITS: tl.constexpr,
    SCOPES: tl.constexpr, SELECT_W: tl.constexpr, SELECT_V: tl.constexpr, SPARSE: tl.constexpr,
    GROUP: tl.constexpr,
    FIN_N: tl.constexpr, FIN_CH: tl.constexpr,
):  # fmt: skip
    """Per (n, c) of one channel group: d loss / d mu and d loss / d var (stored in the
    gradient outputs, completed by :func:`_sn_reduce_rows`), and the per-channel sums."""
    cg = g * GROUP + tl.arange(0, GROUP)
    gm = cg < C
    w0, w1, w2 = _mixing(w_ptr, radius_ptr, frozen_w_ptr, LOGITS, SCOPES, SELECT_W, SPARSE)
    v0, v1, v2 = _mixing(v_ptr, radius_ptr, frozen_v_ptr, LOGITS, SCOPES, SELECT_V, SPARSE)
    gamma = _param(weight_ptr, cg, gm, 1.0, HAS_WEIGHT)
    if HAS_BN:
        bn_mean = tl.load(bn_mean_ptr + cg, mask=gm, other=0.0)
        bn_var = tl.load(bn_var_ptr + cg, mask=gm, other=0.0)
    sum_g_mu = tl.zeros([GROUP], tl.float64)
    sum_g_var = tl.zeros([GROUP], tl.float64)
    sum_dweight = tl.zeros([GROUP], tl.float64)
    sum_dbias = tl.zeros([GROUP], tl.float64)
    gw_in = tl.zeros([GROUP], tl.float64)
    gw_ln = tl.zeros([GROUP], tl.float64)
    gw_bn = tl.zeros([GROUP], tl.float64)
    gv_in = tl.zeros([GROUP], tl.float64)
    gv_ln = tl.zeros([GROUP], tl.float64)
    gv_bn = tl.zeros([GROUP], tl.float64)
    for n0 in range(0, N, FIN_N):
        n = n0 + tl.arange(0, FIN_N)
        nm = n < N
        m2d = nm[:, None] & gm[None, :]
        s1 = _chunk_sums(ws_ptr, n0, N, chunks, C, cg, gm, 0, 2, FIN_N, FIN_CH)
        s2c = _chunk_sums(ws_ptr, n0, N, chunks, C, cg, gm, 1, 2, FIN_N, FIN_CH)
        nc = tl.cast(n, tl.int64)[:, None] * C + cg[None, :]
        centre = tl.load(centre_ptr + nc, mask=m2d, other=0.0).to(tl.float64)
        mu = tl.load(mix_mean_ptr + nc, mask=m2d, other=0.0)
        var = tl.load(mix_var_ptr + nc, mask=m2d, other=0.0)
        rstd = tl.load(rstd_ptr + nc, mask=m2d, other=0.0)
        a = tl.load(mean_ptr + nc, mask=m2d, other=0.0)
        b = tl.load(var_ptr + nc, mask=m2d, other=0.0)
        ln_mean = tl.load(ln_mean_ptr + n, mask=nm, other=0.0)[:, None]
        ln_var = tl.load(ln_var_ptr + n, mask=nm, other=0.0)[:, None]
        s2 = s2c + (centre - mu) * s1  # sum dy * (x - mu)
        g_mu = tl.where(m2d, -rstd * gamma[None, :] * s1, 0.0)
        g_var = tl.where(m2d, -0.5 * rstd * rstd * rstd * gamma[None, :] * s2, 0.0)
        tl.store(grad_mean_ptr + nc, g_mu, mask=m2d)
        tl.store(grad_var_ptr + nc, g_var, mask=m2d)
        rw = rows_ws_ptr + (tl.cast(n, tl.int64) * num_groups + g) * 2
        tl.store(rw, tl.sum(g_mu, 1), mask=nm)
        tl.store(rw + 1, tl.sum(g_var, 1), mask=nm)
        sum_g_mu += tl.sum(g_mu, 0)
        sum_g_var += tl.sum(g_var, 0)
        sum_dweight += tl.sum(tl.where(m2d, rstd * s2, 0.0), 0)
        sum_dbias += tl.sum(tl.where(m2d, s1, 0.0), 0)
        gw_in += tl.sum(g_mu * (a - mu), 0)
        gw_ln += tl.sum(g_mu * (ln_mean - mu), 0)
        gv_in += tl.sum(g_var * (b - var), 0)
        gv_ln += tl.sum(g_var * (ln_var - var), 0)
        if HAS_BN:
            gw_bn += tl.sum(g_mu * (bn_mean[None, :] - mu), 0)
            gv_bn += tl.sum(g_var * (bn_var[None, :] - var), 0)
    if HAS_BN:
        tl.store(totals_ptr + cg, w2 * sum_g_mu, mask=gm)
        tl.store(totals_ptr + C + cg, v2 * sum_g_var, mask=gm)
    else:
        tl.store(totals_ptr + cg, tl.zeros([GROUP], tl.float64), mask=gm)
        tl.store(totals_ptr + C + cg, tl.zeros([GROUP], tl.float64), mask=gm)
    if HAS_WEIGHT:
        tl.store(grad_weight_ptr + cg, sum_dweight.to(grad_weight_ptr.dtype.element_ty), mask=gm)
        tl.store(grad_bias_ptr + cg, sum_dbias.to(grad_bias_ptr.dtype.element_ty), mask=gm)
    out = gw_ws_ptr + g * 6
    tl.store(out, tl.sum(gw_in, 0))
    tl.store(out + 1, tl.sum(gw_ln, 0))
    tl.store(out + 2, tl.sum(gw_bn, 0))
    tl.store(out + 3, tl.sum(gv_in, 0))
    tl.store(out + 4, tl.sum(gv_ln, 0))
    tl.store(out + 5, tl.sum(gv_bn, 0))


@triton.jit
def _sn_reduce_rows(
    rows_ws_ptr, gw_ws_ptr, N, C, num_groups, ddof, mean_ptr, ln_mean_ptr, w_ptr, v_ptr,
    radius_ptr, frozen_w_ptr, frozen_v_ptr, grad_mean_ptr, grad_var_ptr, grad_w_ptr, grad_v_ptr,
    LOGITS: tl.constexpr, SCOPES: tl.constexpr, SELECT_W: tl.constexpr, SELECT_V: tl.constexpr,
    SPARSE: tl.constexpr,
):  # fmt: skip
    """The LN terms of d loss / d (instance mean, variance), which need every channel of a
    sample, and the switch-weight gradients from the groups' shares (of the logits, through
    softmax's vector-Jacobian product p * (g - <g, p>), with ``LOGITS``; through
    sparsestmax's, with ``SPARSE``)."""
    w0, w1, w2 = _mixing(w_ptr, radius_ptr, frozen_w_ptr, LOGITS, SCOPES, SELECT_W, SPARSE)
    v0, v1, v2 = _mixing(v_ptr, radius_ptr, frozen_v_ptr, LOGITS, SCOPES, SELECT_V, SPARSE)
    r = tl.arange(0, _ROWS_R)
    q = tl.arange(0, _ROWS_G)
    lanes = tl.arange(0, _ROWS_C)
    for n0 in range(0, N, _ROWS_R):
        n = n0 + r
        nm = n < N
        t_mu = tl.zeros([_ROWS_R, _ROWS_G], tl.float64)
        t_var = tl.zeros([_ROWS_R, _ROWS_G], tl.float64)
        for g0 in range(0, num_groups, _ROWS_G):
            g = g0 + q
            m = nm[:, None] & (g < num_groups)[None, :]
            base = (tl.cast(n, tl.int64)[:, None] * num_groups + g[None, :]) * 2
            t_mu += tl.load(rows_ws_ptr + base, mask=m, other=0.0, cache_modifier=".cg")
            t_var += tl.load(rows_ws_ptr + base + 1, mask=m, other=0.0, cache_modifier=".cg")
        m_n = (w1 * tl.sum(t_mu, 1))[:, None]
        v_n = (v1 * tl.sum(t_var, 1))[:, None]
        ln_mean = tl.load(ln_mean_ptr + n, mask=nm, other=0.0)[:, None]
        for c0 in range(0, C, _ROWS_C):
            c = c0 + lanes
            m2d = nm[:, None] & (c < C)[None, :]
            nc = tl.cast(n, tl.int64)[:, None] * C + c[None, :]
            g_mu = tl.load(grad_mean_ptr + nc, mask=m2d, other=0.0, cache_modifier=".cg")
            g_var = tl.load(grad_var_ptr + nc, mask=m2d, other=0.0, cache_modifier=".cg")
            a = tl.load(mean_ptr + nc, mask=m2d, other=0.0)
            g_a = w0 * g_mu + m_n / C + v_n * 2.0 * (a - ln_mean) / tl.maximum(C - ddof, 1)
            g_b = v0 * g_var + v_n / tl.maximum(C - ddof, 1)
            tl.store(grad_mean_ptr + nc, g_a, mask=m2d)
            tl.store(grad_var_ptr + nc, g_b, mask=m2d)
    k = tl.arange(0, 8)
    shares = tl.zeros([_ROWS_G, 8], tl.float64)
    for g0 in range(0, num_groups, _ROWS_G):
        g = g0 + q
        m = (g < num_groups)[:, None] & (k < 6)[None, :]
        offs = tl.cast(g, tl.int64)[:, None] * 6 + k[None, :]
        shares += tl.load(gw_ws_ptr + offs, mask=m, other=0.0, cache_modifier=".cg")
    total = tl.sum(shares, 0)
    if LOGITS:
        # Lanes 0-2 hold the mean weights' gradients, 3-5 the variance weights'.
        p = tl.where(k == 0, w0, tl.where(k == 1, w1, tl.where(k == 2, w2, 0.0)))
        p = tl.where(k == 3, v0, tl.where(k == 4, v1, tl.where(k == 5, v2, p)))
        dot_w = tl.sum(tl.where(k < 3, total * p, 0.0), 0)
        dot_v = tl.sum(tl.where(k >= 3, total * p, 0.0), 0)
        total = p * (total - tl.where(k < 3, dot_w, dot_v))
    if SPARSE:
        # Lanes 0-2 / 3-5 to the four lanes of each vector, through sparsestmax, and back.
        j = tl.arange(0, _LANES)
        on_w = j[:, None] == k[None, :]
        on_v = (j + 3)[:, None] == k[None, :]
        g_w = tl.sum(tl.where(on_w, total[None, :], 0.0), 1)
        g_v = tl.sum(tl.where(on_v, total[None, :], 0.0), 1)
        g_w = _sparse_switch_vjp(w_ptr, radius_ptr, frozen_w_ptr, g_w, SCOPES)
        g_v = _sparse_switch_vjp(v_ptr, radius_ptr, frozen_v_ptr, g_v, SCOPES)
        total = tl.sum(tl.where(on_w, g_w[:, None], 0.0) + tl.where(on_v, g_v[:, None], 0.0), 0)
    # A selected (frozen) vector is a constant of the layer.
    if SELECT_W >= 0:
        total = tl.where(k < 3, 0.0, total)
    if SELECT_V >= 0:
        total = tl.where(k >= 3, 0.0, total)
    # Each lane's scope (0 IN, 1 LN, 2 BN), whether the layer has it, and its slot in the
    # layer's (K,) vectors.
    j = tl.where(k < 3, k, k - 3)
    own = tl.where(j == 0, SCOPES & 1, tl.where(j == 1, (SCOPES >> 1) & 1, (SCOPES >> 2) & 1))
    slot = tl.where(j > 0, SCOPES & 1, 0) + tl.where(j > 1, (SCOPES >> 1) & 1, 0)
    stored = (own == 1) & (k < 6)
    tl.store(grad_w_ptr + slot, total.to(grad_w_ptr.dtype.element_ty), mask=stored & (k < 3))
    tl.store(grad_v_ptr + slot, total.to(grad_v_ptr.dtype.element_ty), mask=stored & (k >= 3))


@triton.jit(do_not_specialize=_SIZES)
def bn_reduce_kernel(
    x_ptr, sxn, sxc, sxl, dy_ptr, sdn, sdc, sdl, N, C, L,
    ws_ptr, cnt_ptr, centre_ptr, mean_ptr, rstd_ptr,
    totals_ptr, grad_weight_ptr, grad_bias_ptr,
    num_cb, rows, num_rb, chunks, chunk_len,
    HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    GROUP: tl.constexpr, FIN_N: tl.constexpr, FIN_CH: tl.constexpr, WIDE: tl.constexpr,
    EVEN_C: tl.constexpr,
):  # fmt: skip
    """BN's backward reduction: [sum dy, sum dy * (x - mean)] per channel and the
    parameter gradients. ``ws`` (N, chunks, 2, C) float32."""
    pid = tl.program_id(0)
    chunk, cb, rb = _split_pid(pid, chunks, num_cb)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    l_lo = chunk * chunk_len
    l_hi = tl.minimum(l_lo + chunk_len, L)
    lanes = tl.arange(0, BLOCK_L)
    centre = tl.load(centre_ptr + c, mask=cm, other=0.0).to(tl.float32)
    n_lo = rb * rows
    for n in range(n_lo, tl.minimum(n_lo + rows, N)):
        _dot_rows(
            ws_ptr, n, chunks, chunk, C, x_ptr + tl.cast(n, tl.int64) * sxn, sxc, sxl,
            dy_ptr + tl.cast(n, tl.int64) * sdn, sdc, sdl, c, cm, l_lo, l_hi, lanes, centre, WIDE,
            EVEN_C,
        )  # fmt: skip
    g, expected = _group_of(cb, num_cb, num_rb, chunks, BLOCK_C, GROUP)
    if _arrive(cnt_ptr + g, expected):
        cg = g * GROUP + tl.arange(0, GROUP)
        gm = cg < C
        sum_dy = tl.zeros([GROUP], tl.float64)
        sum_dyc = tl.zeros([GROUP], tl.float64)
        for n0 in range(0, N, FIN_N):
            s1 = _chunk_sums(ws_ptr, n0, N, chunks, C, cg, gm, 0, 2, FIN_N, FIN_CH)
            s2 = _chunk_sums(ws_ptr, n0, N, chunks, C, cg, gm, 1, 2, FIN_N, FIN_CH)
            sum_dy += tl.sum(s1, 0)
            sum_dyc += tl.sum(s2, 0)
        centre_g = tl.load(centre_ptr + cg, mask=gm, other=0.0).to(tl.float64)
        mean = tl.load(mean_ptr + cg, mask=gm, other=0.0)
        sum_dy_xmu = sum_dyc + (centre_g - mean) * sum_dy
        tl.store(totals_ptr + cg, sum_dy, mask=gm)
        tl.store(totals_ptr + C + cg, sum_dy_xmu, mask=gm)
        if HAS_WEIGHT:
            rstd = tl.load(rstd_ptr + cg, mask=gm, other=0.0)
            dweight = (sum_dy_xmu * rstd).to(grad_weight_ptr.dtype.element_ty)
            tl.store(grad_weight_ptr + cg, dweight, mask=gm)
            tl.store(grad_bias_ptr + cg, sum_dy.to(grad_bias_ptr.dtype.element_ty), mask=gm)


# --- backward input pass (SN and BN) --------------------------------------------------------


@triton.jit(do_not_specialize=_SIZES)
def sn_input_kernel(
    x_ptr, sxn, sxc, sxl, dy_ptr, sdn, sdc, sdl, dx_ptr, son, soc, sol, N, C, L,
    centre_ptr, mean_ptr, rstd_ptr, grad_mean_ptr, grad_var_ptr, bn_mean_ptr, totals_ptr,
    count_ptr, weight_ptr, ddof,
    num_cb, rows, chunks, chunk_len,
    HAS_BN: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr, WIDE: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    """Prologue: the BN terms of the gradients and the coefficients of dx per (n, c);
    then dx = k_dy dy + k_x (x - centre) + k_0."""
    pid = tl.program_id(0)
    chunk, cb, rb = _split_pid(pid, chunks, num_cb)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    l_lo = chunk * chunk_len
    l_hi = tl.minimum(l_lo + chunk_len, L)
    lanes = tl.arange(0, BLOCK_L)
    gamma = _param(weight_ptr, c, cm, 1.0, HAS_WEIGHT)
    if HAS_BN:
        count = tl.load(count_ptr)
        n_tot = tl.maximum(count, 1.0)
        n_var = tl.maximum(count - ddof, 1.0)
        m_c = tl.load(totals_ptr + c, mask=cm, other=0.0)
        v_c = tl.load(totals_ptr + C + c, mask=cm, other=0.0)
        bn_mean = tl.load(bn_mean_ptr + c, mask=cm, other=0.0)
    n_lo = rb * rows
    for n in range(n_lo, tl.minimum(n_lo + rows, N)):
        nc = tl.cast(n, tl.int64) * C + c
        g_a = tl.load(grad_mean_ptr + nc, mask=cm, other=0.0)
        g_b = tl.load(grad_var_ptr + nc, mask=cm, other=0.0)
        a = tl.load(mean_ptr + nc, mask=cm, other=0.0)
        if HAS_BN:
            g_a = g_a + m_c / n_tot + v_c * 2.0 * (a - bn_mean) / n_var
            g_b = g_b + v_c / n_var
        centre = tl.load(centre_ptr + nc, mask=cm, other=0.0)
        # d var_in / dx = 2 (x - a) / (L - 1), with x - a = (x - centre) + (centre - a).
        k_x = tl.where(L > 1, 2.0 * g_b / tl.maximum(L - 1, 1), 0.0)
        k_0 = g_a / L + k_x * (centre.to(tl.float64) - a)
        k_dy = gamma * tl.load(rstd_ptr + nc, mask=cm, other=0.0)
        _combine_rows(
            x_ptr + tl.cast(n, tl.int64) * sxn, sxc, sxl,
            dy_ptr + tl.cast(n, tl.int64) * sdn, sdc, sdl,
            dx_ptr + tl.cast(n, tl.int64) * son, soc, sol, c, cm, l_lo, l_hi, lanes,
            centre.to(tl.float32), k_dy.to(tl.float32), k_x.to(tl.float32),
            k_0.to(tl.float32), WIDE, EVEN_C,
        )  # fmt: skip


@triton.jit(do_not_specialize=_SIZES)
def bn_output_kernel(
    x_ptr, sxn, sxc, sxl, y_ptr, syn, syc, syl, N, C, L,
    centre_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps_bits,
    saved_centre_ptr, saved_mean_ptr, rstd_ptr,
    num_cb, rows, chunks, chunk_len,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr, WIDE: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    """Prologue: per-channel scale and shift from the global statistics; then
    y = (x - centre) a + b with the per-(n, c) centre of the statistics pass."""
    pid = tl.program_id(0)
    chunk, cb, rb = _split_pid(pid, chunks, num_cb)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    l_lo = chunk * chunk_len
    l_hi = tl.minimum(l_lo + chunk_len, L)
    lanes = tl.arange(0, BLOCK_L)
    eps = _f64(eps_bits)
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
    var = tl.load(var_ptr + c, mask=cm, other=0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = rstd * _param(weight_ptr, c, cm, 1.0, HAS_WEIGHT)
    beta = _param(bias_ptr, c, cm, 0.0, HAS_BIAS)
    n_lo = rb * rows
    first = _and_flag(cm, (chunk == 0) & (n_lo == 0))
    tl.store(saved_centre_ptr + c, mean.to(tl.float32), mask=first)
    tl.store(saved_mean_ptr + c, mean, mask=first)
    tl.store(rstd_ptr + c, rstd, mask=first)
    for n in range(n_lo, tl.minimum(n_lo + rows, N)):
        centre = tl.load(centre_ptr + tl.cast(n, tl.int64) * C + c, mask=cm, other=0.0)
        shift = (centre.to(tl.float64) - mean) * scale + beta
        _affine_rows(
            x_ptr + tl.cast(n, tl.int64) * sxn, sxc, sxl,
            y_ptr + tl.cast(n, tl.int64) * syn, syc, syl,
            c, cm, l_lo, l_hi, lanes, centre, scale.to(tl.float32), shift.to(tl.float32),
            WIDE, EVEN_C,
        )  # fmt: skip


@triton.jit(do_not_specialize=_SIZES)
def bn_input_kernel(
    x_ptr, sxn, sxc, sxl, dy_ptr, sdn, sdc, sdl, dx_ptr, son, soc, sol, N, C, L,
    centre_ptr, mean_ptr, rstd_ptr, weight_ptr, totals_ptr, count_ptr,
    num_cb, rows, chunks, chunk_len,
    HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    WIDE: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    """Prologue: per-channel coefficients of dx from the summed totals; then the pass."""
    pid = tl.program_id(0)
    chunk, cb, rb = _split_pid(pid, chunks, num_cb)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    l_lo = chunk * chunk_len
    l_hi = tl.minimum(l_lo + chunk_len, L)
    lanes = tl.arange(0, BLOCK_L)
    gamma = _param(weight_ptr, c, cm, 1.0, HAS_WEIGHT)
    rstd = tl.load(rstd_ptr + c, mask=cm, other=0.0)
    n_tot = tl.maximum(tl.load(count_ptr), 1.0)
    sum_dy = tl.load(totals_ptr + c, mask=cm, other=0.0)
    sum_dy_xmu = tl.load(totals_ptr + C + c, mask=cm, other=0.0)
    centre = tl.load(centre_ptr + c, mask=cm, other=0.0)
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
    k_x = -gamma * rstd * rstd * rstd * sum_dy_xmu / n_tot
    k_0 = -gamma * rstd * sum_dy / n_tot + k_x * (centre.to(tl.float64) - mean)
    k_dy = gamma * rstd
    n_lo = rb * rows
    for n in range(n_lo, tl.minimum(n_lo + rows, N)):
        _combine_rows(
            x_ptr + tl.cast(n, tl.int64) * sxn, sxc, sxl,
            dy_ptr + tl.cast(n, tl.int64) * sdn, sdc, sdl,
            dx_ptr + tl.cast(n, tl.int64) * son, soc, sol, c, cm, l_lo, l_hi, lanes,
            centre.to(tl.float32), k_dy.to(tl.float32), k_x.to(tl.float32),
            k_0.to(tl.float32), WIDE, EVEN_C,
        )  # fmt: skip
