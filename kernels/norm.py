"""Instance and batch normalisation with the fused ReLU and residual add: forward and backward.

Launchers (tensors and plain Python scalars in, tensors out; Optional tensors as None). A is
the accumulation dtype (float32, float64 for float64 inputs); G = N for instance norm, 1 for
batch norm; outputs y and dx are laid out as ``torch.empty_like(x)`` (NCHW in, NCHW out;
channels_last in, channels_last out):

    instance_norm_forward(x, weight, bias, residual, eps, relu)
        -> (y, mean (2, N, C) A, rstd (N, C) A)
    instance_norm_backward(dy, x, weight, bias, mean, rstd, relu)
        -> (dx, dweight A, dbias A)                each (C,), or (N, C) for an (N, C) parameter
    batch_norm_forward(x, weight, bias, residual, running_mean, running_var, training, eps, relu)
        -> (y, mean (2, 1, C) A, var (1, C) A)     batch statistics if training, else running
    batch_norm_backward(dy, x, weight, bias, mean, var, training, eps, relu)
        -> (dx, dweight (C,) A, dbias (C,) A)

x: (N, C, H, W) fp16/bf16/fp32/fp64, any strides (read in place when H and W can be walked
with one stride, as in NCHW, channels_last and most views; copied otherwise); weight, bias:
(C,) any float dtype or None, and for instance norm also (N, C) (one scale and shift per
sample: conditional instance norm; the kernels read γ[b·w_sb + c] with the row stride w_sb
C or 0); residual: like x or None. ``mean`` is a double-float:
mean[0] + mean[1] = μ with mean[0] = fl(μ), so that x − μ = (x − mean[0]) − mean[1] stays
accurate when |μ| ≫ σ (a mean of 1000 with a spread of 0.01).

The tensor is seen as (B, C, S = H·W) with strides (sb, sc, ss); a statistic covers (b, c)
over S (instance norm) or c over B·S (batch norm). Kernels work on (BLOCK_C, BLOCK_S) tiles,
whose shape follows the layout (long along S for NCHW, wide along C for channels_last).

Forward, three launches:
  1. ``_stats_partial``: each program reduces one chunk of S for BLOCK_C channels of one b to
     (mean, M2) of x − pivot in fp32: per tile a two-pass mean and M2 (the tile sits in
     registers), tiles merged by Chan's formula. The pivot (the first element of the group)
     keeps the data near zero, so that a large mean costs no precision. Splitting S over
     programs keeps the GPU busy when there are few (n, c) rows (128 rows of 65,536 at batch 4);
     the split is chosen from the shape (``plan``).
  2. ``_stats_finalize``: merges the partials of each statistic into the double-float mean,
     the biased variance and rstd: a program per (statistic row, channel block) reads a whole
     (parts, channels) tile of partials at once and merges it by Chan's combine in its k-way
     form (tree sums), tiles one after another where the parts do not fit one: parallel,
     deterministic (a fixed order), no atomics.
  3. ``_apply``: y = relu?((x − μ) · rstd γ + β) (+ residual), one read of x (and residual),
     one write. It walks the tensor in reverse order, so that its first reads find what the
     stats pass left in L2.
Backward, three launches: ``_bwd_partial`` (fp32 partial sums A = Σ g, B = Σ g x̂ with
g = dy · relu mask, the mask recomputed from x and the saved statistics: no extra tensor is
saved and it works with the residual), ``_bwd_finalize`` (per-statistic A, B and the
parameter gradients dγ = Σ B, dβ = Σ A, from (rows, parts, channels) tiles of partials by tree
sums in a fixed order; the per-row A and B are dβ and dγ of (N, C) parameters), ``_bwd_apply``
(dx = γ rstd (g − A/M − x̂ B/M), or γ rstd g for running statistics). Bytes: forward
3 (4 with residual) passes of x's size when x does not stay in L2, 2 when it does; backward 5.

Floors on the H200 (~4.3 TB/s): the forward must read x and write y (2 · numel · itemsize,
3 with a residual), the backward read x and dy and write dx (3 ·); the partials are 2·G·parts·C
fp32 values, under 300 KB at these shapes. At the DESIGN.md activations in fp32 (bf16 and fp16
move half the bytes, in half the time):

    shape               numel      fwd bytes   fwd floor   bwd bytes   bwd floor
    (4, 32, 256, 256)   8.39 M     67.1 MB     15.6 µs     101 MB      23.4 µs
    (4, 64, 128, 128)   4.19 M     33.6 MB      7.8 µs     50.3 MB     11.7 µs
    (4, 128, 64, 64)    2.10 M     16.8 MB      3.9 µs     25.2 MB      5.9 µs

The three-pass forward reads x twice: 3 · numel · itemsize from DRAM (23.4 µs fp32 at the
first shape) unless x stays in the 60 MB L2 between the passes (it does for bf16 up to 30 MB).
Each finalize is one short launch (a few µs, latency-bound): predicted 2–5 µs, against
25–150 µs for the serial merge it replaced (benchmarks/NOTES.md).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastperc.rules import (INTERPRETED, DeviceFacts, acc_dtype, cdiv, device_facts, hw_strides, next_pow2,
                            running_stats, walkable)

from .common import launch

# Largest tile, in elements, compiled for the GPU and under the interpreter (smaller there, so
# that the tests' small shapes still span several tiles and chunks).
MAX_TILE = 4096
INTERPRETER_MAX_TILE = 1024
# The reductions aim at this many programs per SM (of those the interpreter pretends to have).
PROGRAMS_PER_SM = 4
MAX_SPLITS = 1024
# The finalize kernels' tiles are 8 to 32 channels wide (32 to 128 contiguous bytes in fp32),
# narrower where that lets one tile hold all partials of a statistic.
FINALIZE_MIN_C = 8
FINALIZE_MAX_C = 32


# -- device helpers ------------------------------------------------------------------------
# Compiled, these are ordinary @triton.jit functions. Under TRITON_INTERPRET=1 every call of a
# jitted helper re-patches triton.language (milliseconds a call, the bulk of the interpreted
# kernels' time), so there they run as plain Python inside the interpreted kernel: the same
# source, the same semantics. Triton itself reads TRITON_INTERPRET when a kernel is decorated.
_device_fn = (lambda fn: fn) if INTERPRETED else triton.jit


@_device_fn
def _rstd(s, eps, STAT_IS_VAR: tl.constexpr):
    """rstd from the saved statistic: itself, or 1/sqrt(var + eps)."""
    if STAT_IS_VAR:
        return 1.0 / tl.sqrt(s + tl.cast(eps, s.dtype))
    return s


@_device_fn
def _tile(ptr, b, c, s, cmask, smask, sb, sc, ss):
    """Load the (BLOCK_C, BLOCK_S) tile of channels c and positions s of image b (0 outside)."""
    offs = b.to(tl.int64) * sb + c.to(tl.int64)[:, None] * sc + s.to(tl.int64)[None, :] * ss
    return tl.load(ptr + offs, mask=cmask[:, None] & smask[None, :], other=0.0)


@_device_fn
def _channel_stats(w_ptr, b_ptr, mean_ptr, stat_ptr, b, stat_sb, w_sb, b_sb, lo_off, c, cmask, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, STAT_IS_VAR: tl.constexpr):
    """Per-channel (hi, lo, rstd, scale = rstd γ, shift = β) of image b's statistic row, in A.
    Row strides: stat_sb (C, or 0 for one row of statistics), w_sb and b_sb (C for (N, C)
    parameters, 0 for (C,) ones)."""
    acc = mean_ptr.dtype.element_ty
    stat_off = b * stat_sb
    hi = tl.load(mean_ptr + stat_off + c, mask=cmask, other=0.0)
    lo = tl.load(mean_ptr + lo_off + stat_off + c, mask=cmask, other=0.0)
    rstd = _rstd(tl.load(stat_ptr + stat_off + c, mask=cmask, other=1.0), eps, STAT_IS_VAR)
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + b * w_sb + c, mask=cmask, other=1.0).to(acc)
    shift = tl.zeros_like(scale)
    if HAS_B:
        shift = tl.load(b_ptr + b * b_sb + c, mask=cmask, other=0.0).to(acc)
    return hi, lo, rstd, scale, shift


@_device_fn
def _centre(x, hi, lo):
    """(x − μ) for a double-float μ = hi + lo, in A."""
    return (x.to(hi.dtype) - hi[:, None]) - lo[:, None]


@_device_fn
def _pre_activation(xm, scale, shift):
    """z = (x − μ) · rstd γ + β; one fused multiply-add, identical in forward and backward."""
    return tl.fma(xm, scale[:, None], shift[:, None])


@_device_fn
def _tile_range(pid, n_splits, c_blocks, S, CHUNK, BLOCK_C: tl.constexpr):
    """(b, channels, first and end position) of a chunk program, pid = (b·c_blocks + cb)·n_splits + split."""
    split = pid % n_splits
    bc = pid // n_splits
    cb = bc % c_blocks
    b = bc // c_blocks
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s_begin = split * CHUNK
    s_end = tl.minimum(s_begin + CHUNK, S)
    return b, c, s_begin, s_end


@_device_fn
def _apply_tile(C, S, c_blocks, s_blocks, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(b, channels, positions and their masks) of an elementwise program, one tile each,
    pid = (b·c_blocks + cb)·s_blocks + s_block. The programs run in reverse order: the last
    tiles the reduction pass read are the likeliest to be in L2."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    sblk = pid % s_blocks
    bc = pid // s_blocks
    cb = bc % c_blocks
    b = bc // c_blocks
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = sblk * BLOCK_S + tl.arange(0, BLOCK_S)
    return b, c, s, c < C, s < S


@_device_fn
def _chan_merge(count, mean, m2, n_b, mean_b, m2_b):
    """Chan et al.: the (count, mean, M2) of two sets from theirs (count > 0 or n_b > 0)."""
    total = count + n_b
    w_b = n_b / total
    delta = mean_b - mean
    return total, mean + delta * w_b, m2 + m2_b + delta * delta * (count * w_b)


# -- forward -------------------------------------------------------------------------------


@triton.jit
def _stats_partial(x_ptr, pmean_ptr, pm2_ptr, C, S, sb, sc, ss, pivot_sb, CHUNK, n_splits, c_blocks,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    b, c, s_begin, s_end = _tile_range(pid, n_splits, c_blocks, S, CHUNK, BLOCK_C)
    acc = pmean_ptr.dtype.element_ty
    cmask = c < C
    pivot = tl.load(x_ptr + b.to(tl.int64) * pivot_sb + c.to(tl.int64) * sc, mask=cmask, other=0.0).to(acc)
    mean = tl.zeros([BLOCK_C], dtype=acc)
    m2 = tl.zeros([BLOCK_C], dtype=acc)
    count = tl.zeros([BLOCK_C], dtype=acc)  # a vector: every channel has seen the same positions
    for start in range(s_begin, s_end, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        smask = s < s_end
        d = _tile(x_ptr, b, c, s, cmask, smask, sb, sc, ss).to(acc) - pivot[:, None]
        n_t = tl.minimum(s_end - start, BLOCK_S).to(acc)
        mean_t = tl.sum(tl.where(smask[None, :], d, 0.0), axis=1) / n_t
        dev = tl.where(smask[None, :], d - mean_t[:, None], 0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, n_t, mean_t, tl.sum(dev * dev, axis=1))
    out = (b * n_splits + pid % n_splits) * C + c
    tl.store(pmean_ptr + out, mean, mask=cmask)
    tl.store(pm2_ptr + out, m2, mask=cmask)


@triton.jit
def _stats_finalize(x_ptr, pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr, var_ptr, C, S, sc, pivot_sb,
                    CHUNK, n_splits, n_parts, lo_off, eps, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (g, cb): merge the n_parts partials (count n_j, mean_j, M2_j) of statistic row g
    (parts g·n_parts ...) for BLOCK_C channels, BLOCK_P parts at a time. A tile of parts is
    merged at once by Chan's combine in its k-way form, n = Σ n_j, mean = Σ n_j mean_j / n,
    M2 = Σ M2_j + Σ n_j (mean_j − mean)² (equal to the pairwise tree of merges; the sums are
    fixed-order tree reductions), tiles one after another by the pairwise merge: deterministic,
    no atomics. Then the double-float mean, the biased variance and rstd."""
    g = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc = pmean_ptr.dtype.element_ty
    mean = tl.zeros([BLOCK_C], dtype=acc)
    m2 = tl.zeros([BLOCK_C], dtype=acc)
    count = tl.zeros([BLOCK_C], dtype=acc)
    for p0 in range(0, n_parts, BLOCK_P):
        part = g * n_parts + p0 + tl.arange(0, BLOCK_P)
        pmask = p0 + tl.arange(0, BLOCK_P) < n_parts
        n_j = tl.where(pmask, tl.minimum(CHUNK, S - (part % n_splits) * CHUNK), 0).to(acc)
        offs = part[:, None] * C + c[None, :]
        mask = pmask[:, None] & cmask[None, :]
        mean_j = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        m2_j = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
        n_t = tl.sum(n_j, axis=0)
        mean_t = tl.sum(n_j[:, None] * mean_j, axis=0) / n_t
        dev = mean_j - mean_t[None, :]
        m2_t = tl.sum(m2_j + n_j[:, None] * (dev * dev), axis=0)  # masked parts: n_j = M2_j = 0
        count, mean, m2 = _chan_merge(count, mean, m2, n_t, mean_t, m2_t)
    var = m2 / count
    pivot = tl.load(x_ptr + g.to(tl.int64) * pivot_sb + c.to(tl.int64) * sc, mask=cmask, other=0.0).to(acc)
    # TwoSum: hi + lo == pivot + mean exactly.
    hi = pivot + mean
    bb = hi - pivot
    lo = (pivot - (hi - bb)) + (mean - bb)
    tl.store(mean_ptr + g * C + c, hi, mask=cmask)
    tl.store(mean_ptr + lo_off + g * C + c, lo, mask=cmask)
    tl.store(var_ptr + g * C + c, var, mask=cmask)
    tl.store(rstd_ptr + g * C + c, _rstd(var, eps, True), mask=cmask)


@triton.jit
def _apply(x_ptr, y_ptr, r_ptr, w_ptr, b_ptr, mean_ptr, stat_ptr, eps, C, S, c_blocks, s_blocks,
           sxb, sxc, sxs, syb, syc, sys, srb, src, srs, stat_sb, w_sb, b_sb, lo_off,
           HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, RELU: tl.constexpr,
           STAT_IS_VAR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b, c, s, cmask, smask = _apply_tile(C, S, c_blocks, s_blocks, BLOCK_C, BLOCK_S)
    hi, lo, rstd, scale, shift = _channel_stats(w_ptr, b_ptr, mean_ptr, stat_ptr, b, stat_sb, w_sb, b_sb, lo_off,
                                                c, cmask, eps, HAS_W, HAS_B, STAT_IS_VAR)
    z = _pre_activation(_centre(_tile(x_ptr, b, c, s, cmask, smask, sxb, sxc, sxs), hi, lo), scale, shift)
    if RELU:
        z = tl.where(z < 0, 0.0, z)
    if HAS_R:
        z += _tile(r_ptr, b, c, s, cmask, smask, srb, src, srs).to(z.dtype)
    offs = b.to(tl.int64) * syb + c.to(tl.int64)[:, None] * syc + s.to(tl.int64)[None, :] * sys
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=cmask[:, None] & smask[None, :])


# -- backward ------------------------------------------------------------------------------


@_device_fn
def _masked_grad(dy_ptr, x_ptr, b, c, s, cmask, smask, hi, lo, rstd, scale, shift,
                 sdb, sdc, sds, sxb, sxc, sxs, RELU: tl.constexpr):
    """(g, x̂) of one tile: g = dy · [z > 0] (dy without ReLU), x̂ = (x − μ) rstd."""
    xm = _centre(_tile(x_ptr, b, c, s, cmask, smask, sxb, sxc, sxs), hi, lo)
    g = _tile(dy_ptr, b, c, s, cmask, smask, sdb, sdc, sds).to(xm.dtype)
    if RELU:
        g = tl.where(_pre_activation(xm, scale, shift) > 0, g, 0.0)
    return g, xm * rstd[:, None]


@triton.jit
def _bwd_partial(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, stat_ptr, pa_ptr, pb_ptr, eps, C, S,
                 sdb, sdc, sds, sxb, sxc, sxs, stat_sb, w_sb, b_sb, lo_off, CHUNK, n_splits, c_blocks,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr,
                 STAT_IS_VAR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    b, c, s_begin, s_end = _tile_range(pid, n_splits, c_blocks, S, CHUNK, BLOCK_C)
    cmask = c < C
    hi, lo, rstd, scale, shift = _channel_stats(w_ptr, b_ptr, mean_ptr, stat_ptr, b, stat_sb, w_sb, b_sb, lo_off,
                                                c, cmask, eps, HAS_W, HAS_B, STAT_IS_VAR)
    sum_a = tl.zeros([BLOCK_C], dtype=hi.dtype)
    sum_b = tl.zeros([BLOCK_C], dtype=hi.dtype)
    for start in range(s_begin, s_end, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        smask = s < s_end
        g, xhat = _masked_grad(dy_ptr, x_ptr, b, c, s, cmask, smask, hi, lo, rstd, scale, shift,
                               sdb, sdc, sds, sxb, sxc, sxs, RELU)
        sum_a += tl.sum(g, axis=1)
        sum_b += tl.sum(g * xhat, axis=1)
    out = (b * n_splits + pid % n_splits) * C + c
    tl.store(pa_ptr + out, sum_a, mask=cmask)
    tl.store(pb_ptr + out, sum_b, mask=cmask)


@triton.jit
def _bwd_finalize(pa_ptr, pb_ptr, ra_ptr, rb_ptr, dw_ptr, db_ptr, C, G, n_parts,
                  BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program cb, BLOCK_C channels: per statistic row g, A and B summed over its n_parts
    partials, (BLOCK_G, BLOCK_P, BLOCK_C) partials at a time (tree sums over the parts, tiles
    in order); dγ = Σ_g B, dβ = Σ_g A (a tree over the rows of a tile, tiles in order)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc = pa_ptr.dtype.element_ty
    dw = tl.zeros([BLOCK_C], dtype=acc)
    db = tl.zeros([BLOCK_C], dtype=acc)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        gmask = g < G
        a = tl.zeros([BLOCK_G, BLOCK_C], dtype=acc)
        bsum = tl.zeros([BLOCK_G, BLOCK_C], dtype=acc)
        for p0 in range(0, n_parts, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            offs = (g[:, None, None] * n_parts + p[None, :, None]) * C + c[None, None, :]
            mask = gmask[:, None, None] & (p < n_parts)[None, :, None] & cmask[None, None, :]
            a += tl.sum(tl.load(pa_ptr + offs, mask=mask, other=0.0), axis=1)
            bsum += tl.sum(tl.load(pb_ptr + offs, mask=mask, other=0.0), axis=1)
        rows = g[:, None] * C + c[None, :]
        rmask = gmask[:, None] & cmask[None, :]
        tl.store(ra_ptr + rows, a, mask=rmask)
        tl.store(rb_ptr + rows, bsum, mask=rmask)
        db += tl.sum(a, axis=0)
        dw += tl.sum(bsum, axis=0)
    tl.store(dw_ptr + c, dw, mask=cmask)
    tl.store(db_ptr + c, db, mask=cmask)


@triton.jit
def _bwd_apply(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, stat_ptr, ra_ptr, rb_ptr, eps, M,
               C, S, c_blocks, s_blocks, sdb, sdc, sds, sxb, sxc, sxs, sob, soc, sos, stat_sb, w_sb, b_sb, lo_off,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr, CENTRED: tl.constexpr,
               STAT_IS_VAR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b, c, s, cmask, smask = _apply_tile(C, S, c_blocks, s_blocks, BLOCK_C, BLOCK_S)
    hi, lo, rstd, scale, shift = _channel_stats(w_ptr, b_ptr, mean_ptr, stat_ptr, b, stat_sb, w_sb, b_sb, lo_off,
                                                c, cmask, eps, HAS_W, HAS_B, STAT_IS_VAR)
    g, xhat = _masked_grad(dy_ptr, x_ptr, b, c, s, cmask, smask, hi, lo, rstd, scale, shift,
                           sdb, sdc, sds, sxb, sxc, sxs, RELU)
    if CENTRED:
        m = tl.cast(M, hi.dtype)  # an exact integer
        a = tl.load(ra_ptr + b * stat_sb + c, mask=cmask, other=0.0) / m
        bm = tl.load(rb_ptr + b * stat_sb + c, mask=cmask, other=0.0) / m
        g = g - a[:, None] - xhat * bm[:, None]
    dx = g * scale[:, None]
    offs = b.to(tl.int64) * sob + c.to(tl.int64)[:, None] * soc + s.to(tl.int64)[None, :] * sos
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=cmask[:, None] & smask[None, :])


# -- launch planning -----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How a (B, C, S) problem is tiled and split (see :func:`plan`)."""

    block_c: int
    block_s: int
    c_blocks: int                       # channel blocks of BLOCK_C
    s_blocks: int                       # position blocks of BLOCK_S (the elementwise passes)
    chunk: int                          # positions per split of a reduction, whole BLOCK_S tiles
    splits: int                         # programs per (b, channel block) row of a reduction
    num_warps: int
    per_sample: bool                    # statistics per (b, c) (instance norm) or per c (batch norm)
    groups: int                         # statistic rows G: B or 1
    parts: int                          # partials per statistic: splits (instance norm), B·splits (batch)
    finalize_c: int                     # the finalize kernels' channels per program (BLOCK_C)
    finalize_p: int                     # ... partials per tile (BLOCK_P)
    finalize_g: int                     # ... statistic rows per tile of _bwd_finalize (BLOCK_G)
    partial_grid: tuple[int]            # _stats_partial, _bwd_partial
    stats_finalize_grid: tuple[int, int]  # _stats_finalize: (G, channel blocks)
    bwd_finalize_grid: tuple[int]       # _bwd_finalize: (channel blocks,)
    apply_grid: tuple[int]              # _apply, _bwd_apply


@functools.lru_cache(maxsize=1024)
def plan(B: int, C: int, S: int, channels_inner: bool, facts: DeviceFacts, *, per_sample: bool,
         splits: int | None = None, finalize_tile: int | None = None) -> Plan:
    """The launch plan of a (B, C, S) problem, statistics per (b, c) (``per_sample``) or per c.

    The tile (at most MAX_TILE elements; INTERPRETER_MAX_TILE under the interpreter) is long
    along the contiguous axis: S for NCHW, C for channels_last (``channels_inner``). S is split
    into ``splits`` chunks of CHUNK (a multiple of BLOCK_S) so that the reductions run on about
    PROGRAMS_PER_SM programs per SM when the (b, channel block) rows alone would be too few: at
    batch 4 the (4, 32, 256, 256) instance norm has 128 rows of 65,536 elements. ``splits``
    forces (about) that many instead (tests), within 1 and the tiles of a row.

    The finalize kernels read the (parts, C) partials of a statistic row in tiles of at most
    ``finalize_tile`` (default: the tile above) elements: FINALIZE_MIN_C to FINALIZE_MAX_C
    channels wide (contiguous in memory; narrower where all parts then fit in one tile, which
    also gives more programs), as many parts as fit, and for _bwd_finalize as many rows as fit.
    """
    tile = MAX_TILE if facts.compiled else INTERPRETER_MAX_TILE
    if channels_inner:
        block_c = min(next_pow2(C), 64 if tile >= 4096 else 16)
        block_s = min(next_pow2(S), max(tile // block_c, 1))
    else:
        block_s = min(next_pow2(S), tile)
        block_c = min(next_pow2(C), max(tile // block_s, 1))
    c_blocks = cdiv(C, block_c)
    s_tiles = cdiv(S, block_s)
    want = cdiv(PROGRAMS_PER_SM * facts.sms, B * c_blocks) if splits is None else splits
    splits = max(1, min(s_tiles, want, MAX_SPLITS))
    chunk = cdiv(s_tiles, splits) * block_s
    splits = cdiv(S, chunk)
    groups = B if per_sample else 1
    parts = splits * (B // groups)
    fin_tile = tile if finalize_tile is None else finalize_tile
    fin_c = min(next_pow2(C), FINALIZE_MAX_C, max(FINALIZE_MIN_C, fin_tile // next_pow2(parts)), fin_tile)
    fin_p = min(next_pow2(parts), max(fin_tile // fin_c, 1))
    fin_g = min(next_pow2(groups), max(fin_tile // (fin_c * fin_p), 1))
    fin_blocks = cdiv(C, fin_c)
    return Plan(
        block_c=block_c, block_s=block_s, c_blocks=c_blocks, s_blocks=s_tiles, chunk=chunk, splits=splits,
        num_warps=8 if block_c * block_s >= 4096 else 4, per_sample=per_sample, groups=groups, parts=parts,
        finalize_c=fin_c, finalize_p=fin_p, finalize_g=fin_g,
        partial_grid=(B * c_blocks * splits,), stats_finalize_grid=(groups, fin_blocks),
        bwd_finalize_grid=(fin_blocks,), apply_grid=(B * c_blocks * s_tiles,))


def plan_for(x: torch.Tensor, per_sample: bool) -> Plan:
    """The plan for ``x`` on its device, as the launchers below choose it."""
    N, C, H, W = x.shape
    strides = hw_strides(x)
    sc = strides[1] if strides is not None else H * W  # else walked as a contiguous copy
    return plan(N, C, H * W, sc == 1 and C > 1, device_facts(x.device), per_sample=per_sample)


# -- launchers -----------------------------------------------------------------------------


def _param(t: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """A (C,) or (N, C) parameter with unit channel stride (the kernels index it as
    ptr + b·row_stride + c) and its row stride: 0 for (C,), C for (N, C)."""
    if t is None:
        return None, 0
    return t.contiguous(), (t.shape[1] if t.dim() == 2 else 0)


def launch_forward(pl: Plan, x, weight, bias, residual, eps: float, relu: bool, stats):
    """The forward of plan ``pl``. ``stats`` is None (compute the statistics) or the saved
    (mean, var) to normalise with. -> (y, mean, rstd (per sample) or var (per channel))."""
    (weight, w_sb), (bias, b_sb) = _param(weight), _param(bias)
    N, C, H, W = x.shape
    S = H * W
    per_sample = pl.per_sample
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x)
    x, xs = walkable(x)
    y_out, ys = walkable(y, output=True)
    if residual is not None:
        residual, rs = walkable(residual)
    else:
        rs = xs
    G = pl.groups
    if stats is None:
        parts = torch.empty((2, N, pl.splits, C), device=x.device, dtype=acc)
        launch(_stats_partial, pl.partial_grid,
               x, parts[0], parts[1], C, S, *xs, xs[0] if per_sample else 0, pl.chunk, pl.splits, pl.c_blocks,
               BLOCK_C=pl.block_c, BLOCK_S=pl.block_s, num_warps=pl.num_warps)
        mean = torch.empty((2, G, C), device=x.device, dtype=acc)
        rstd = torch.empty((G, C), device=x.device, dtype=acc)
        var = torch.empty((G, C), device=x.device, dtype=acc)
        launch(_stats_finalize, pl.stats_finalize_grid,
               x, parts[0], parts[1], mean, rstd, var, C, S, xs[1], xs[0] if per_sample else 0,
               pl.chunk, pl.splits, pl.parts, G * C, eps, BLOCK_P=pl.finalize_p, BLOCK_C=pl.finalize_c)
        stat, stat_is_var = (rstd, False) if per_sample else (var, True)
    else:
        mean, var = stats
        stat, stat_is_var = var, True
    launch(_apply, pl.apply_grid,
           x, y_out, residual, weight, bias, mean, stat, eps, C, S, pl.c_blocks, pl.s_blocks, *xs, *ys, *rs,
           C if per_sample else 0, w_sb, b_sb, G * C,
           HAS_W=weight is not None, HAS_B=bias is not None, HAS_R=residual is not None, RELU=relu,
           STAT_IS_VAR=stat_is_var, BLOCK_C=pl.block_c, BLOCK_S=pl.block_s, num_warps=pl.num_warps)
    if y_out is not y:
        y.copy_(y_out)
    return y, mean, (rstd if per_sample else var)


def launch_backward(pl: Plan, dy, x, weight, bias, mean, stat, eps: float, relu: bool, centred: bool,
                    stat_is_var: bool):
    """The backward of plan ``pl``: ``stat`` is rstd or (``stat_is_var``) the variance; ``centred``
    where the statistics are those of x (not running ones). -> (dx, dweight, dbias): each (C,),
    or (N, C) for an (N, C) parameter (the per-row sums, which the finalize writes anyway)."""
    (weight, w_sb), (bias, b_sb) = _param(weight), _param(bias)
    N, C, H, W = x.shape
    S = H * W
    acc = acc_dtype(x.dtype)
    dx = torch.empty_like(x)
    x, xs = walkable(x)
    dy, ds = walkable(dy)
    dx_out, os_ = walkable(dx, output=True)
    G = pl.groups
    stat_sb = C if pl.per_sample else 0
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, RELU=relu, STAT_IS_VAR=stat_is_var,
                 BLOCK_C=pl.block_c, BLOCK_S=pl.block_s, num_warps=pl.num_warps)
    parts = torch.empty((2, N, pl.splits, C), device=x.device, dtype=acc)
    launch(_bwd_partial, pl.partial_grid,
           dy, x, weight, bias, mean, stat, parts[0], parts[1], eps, C, S, *ds, *xs, stat_sb, w_sb, b_sb, G * C,
           pl.chunk, pl.splits, pl.c_blocks, **flags)
    # Per-row A = Σ g and B = Σ g x̂ (separate tensors: each may be returned as a gradient).
    row_a = torch.empty((G, C), device=x.device, dtype=acc)
    row_b = torch.empty((G, C), device=x.device, dtype=acc)
    dweight = torch.empty(C, device=x.device, dtype=acc)
    dbias = torch.empty(C, device=x.device, dtype=acc)
    launch(_bwd_finalize, pl.bwd_finalize_grid,
           parts[0], parts[1], row_a, row_b, dweight, dbias, C, G, pl.parts,
           BLOCK_G=pl.finalize_g, BLOCK_P=pl.finalize_p, BLOCK_C=pl.finalize_c)
    launch(_bwd_apply, pl.apply_grid,
           dy, x, dx_out, weight, bias, mean, stat, row_a, row_b, eps, S if pl.per_sample else N * S, C, S,
           pl.c_blocks, pl.s_blocks, *ds, *xs, *os_, stat_sb, w_sb, b_sb, G * C, CENTRED=centred, **flags)
    if dx_out is not dx:
        dx.copy_(dx_out)
    return dx, (row_b if w_sb else dweight), (row_a if b_sb else dbias)


def instance_norm_forward(x, weight, bias, residual, eps: float, relu: bool):
    """-> (y, mean (2, N, C), rstd (N, C)); see the module docstring."""
    return launch_forward(plan_for(x, True), x, weight, bias, residual, eps, relu, None)


def instance_norm_backward(dy, x, weight, bias, mean, rstd, relu: bool):
    """-> (dx, dweight, dbias), the parameter gradients in A, shaped as their parameters."""
    return launch_backward(plan_for(x, True), dy, x, weight, bias, mean, rstd, 1.0, relu, True, False)


def batch_norm_forward(x, weight, bias, residual, running_mean, running_var, training: bool,
                       eps: float, relu: bool):
    """-> (y, mean (2, 1, C), var (1, C)): batch statistics if ``training``, else the running ones
    (which are read, never written; ``fastperc.rules.running_stats``)."""
    stats = None if training else running_stats(running_mean, running_var, x.dtype)
    return launch_forward(plan_for(x, False), x, weight, bias, residual, eps, relu, stats)


def batch_norm_backward(dy, x, weight, bias, mean, var, training: bool, eps: float, relu: bool):
    """-> (dx, dweight (C,), dbias (C,)); rstd = 1/sqrt(var + eps) as in the forward."""
    return launch_backward(plan_for(x, False), dy, x, weight, bias, mean, var, eps, relu, training, True)
