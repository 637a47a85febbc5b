"""The upsampling convolutions as implicit GEMMs on the low-resolution grid, per output phase.

Both ops map x (N, C, H, W) to y (N, O, 2H, 2W); output pixel (2i + a, 2j + b) belongs to
phase (a, b). A program computes a BLOCK_M x BLOCK_N tile of one phase of one image: BLOCK_M
low-resolution pixels (i, j) by BLOCK_N output channels, the K dimension running over the
input channels of each tap (the tap's input pixels are gathered: no im2col buffer, no padded
copy, no upsampled or zero-inserted tensor). Operands are read channels-last (NHWC), so a tile
row is BLOCK_K contiguous channels; tl.dot runs on tensor cores for fp16/bf16 (and fp32 as tf32
only where torch allows TF32 matmuls, ``fastperc.rules.matmul_tf32``), accumulating in fp32
(fp64 for fp64).

upsample_conv2d (MODE 0): nearest x2, reflection pad 1, 3x3 conv. Phase (a, b) is a 2x2 conv
of x replicate-padded by 1 with the summed phase weights (``fastperc.rules.upsample_phase_weights``):
    y[n, o, 2i + a, 2j + b] = bias[o]
        + sum_{t, s in {0, 1}} sum_c x[n, c, clamp(i + a + t - 1), clamp(j + b + s - 1)] W[a, b, t, s, c, o]
the clamp to [0, H - 1] being the replicate padding. 16 C O multiply-adds per input pixel.

conv_transpose2d (MODE 1): stride 2, padding 1, output_padding 1, 3x3:
    y[n, o, 2i + a, 2j + b] = bias[o]
        + sum_{t <= a, s <= b} sum_c x[n, c, i + t, j + s] w[c, o, 1 + a - 2t, 1 + b - 2s]
(x zero beyond the last row and column): 1, 2, 2 and 4 taps, 9 C O multiply-adds per input pixel.

Every K loop is one flat loop over (tap, channel block), so that the loads of the next tap
are pipelined under the MMAs of the current one (the channel counts of these layers, 32 to
128, are only one or two blocks deep).

Backward, per op:
    dx: the phase-wise transposed problem, an implicit GEMM over the output channels that
        gathers dy. conv_transpose2d: dx[n, c, i, j] = sum_{k, l} sum_o dy[n, o, 2i - 1 + k,
        2j - 1 + l] w[c, o, k, l] (9 taps). upsample_conv2d: for each (phase, tap) the source
        pixel whose clamped tap lands on (i, j): i' = i - (a + t - 1) (16 taps, the interior
        kernel); on the first and last row and column also the sources that the replicate
        padding folded onto them (a second, small kernel over the 2(H + W) - 4 border pixels).
    dweight: a GEMM over the batch and pixels per (phase, tap) (16) or kernel tap (9):
        dW[tap][c, o] = sum_{n, i, j} x_tap[n, i, j, c] dy_tap[n, i, j, o], split over the
        pixels into fp32 partials that are summed in a fixed order (deterministic); the bias
        gradient is summed from the dy tiles of the taps that cover every output pixel once.

The forward's epilogue adds the bias and can also emit, per (image, phase, pixel tile, output
channel), the sum and the centred sum of squares of the tile's outputs (as stored, in the
output dtype); ``*_forward_stats`` merges them (Chan et al.) into the per-(n, c) mean and
biased variance that a following instance norm needs, without reading y again.

Deciding and doing are apart: ``plan_forward`` / ``plan_backward`` give the blocks, warps,
stages, grids and splits of every launch (``Gemm``) from the shape, dtype and device facts;
``launch_forward`` / ``launch_backward`` run a plan.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastperc.rules import (DeviceFacts, acc_dtype, cdiv, device_facts, dot_precision, natural_format, pow2_block,
                            tf32_allowed, upsample_phase_weights, upsample_phase_weights_adjoint)

from .common import launch

UPSAMPLE, TRANSPOSE = 0, 1


@triton.jit
def _load_tap(src_ptr, pix_off, pix_ok, k0, K, s_k, w_ptr, w_sk, w_sn, offs_n, n_ok,
              BLOCK_K: tl.constexpr):
    """One K step of an implicit GEMM: the (BLOCK_M, BLOCK_K) operand gathered from the rows
    of src at element offsets pix_off (zero where not pix_ok), channels k0.. at stride s_k, and
    the (BLOCK_K, BLOCK_N) weight tile w[k, n] at w_ptr + k w_sk + n w_sn."""
    kk = k0 + tl.arange(0, BLOCK_K)
    k_ok = kk < K
    a = tl.load(src_ptr + pix_off[:, None] + kk[None, :] * s_k,
                mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
    b = tl.load(w_ptr + kk[:, None] * w_sk + offs_n[None, :] * w_sn,
                mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    return a, b


@triton.jit
def _zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_FP64: tl.constexpr):
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return acc


@triton.jit
def _phase_conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, stats_ptr,
    H, W, C, O, NUM_TILES_M,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, STATS: tl.constexpr, ACC_FP64: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (pixel tile, output-channel tile) of phase (a, b) of image n. The K loop runs over
    (tap, channel block) in one flat loop, so that loads of the next tap overlap the MMAs."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    n = pid_z // 4
    ph = pid_z % 4
    a = ph // 2
    b = ph % 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < H * W
    i = offs_m // W
    j = offs_m % W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < O
    x_img = x_ptr + n.to(tl.int64) * sxn
    acc = _zeros(BLOCK_M, BLOCK_N, ACC_FP64)
    k_chunks = tl.cdiv(C, BLOCK_K)
    if MODE == 0:
        tap_cols = 2  # 2x2 taps; phase weights packed (4 phases, 4 taps, C, O)
        taps = 4
    else:
        tap_cols = b + 1  # t <= a, s <= b; kernel packed (3, 3, C, O)
        taps = (a + 1) * tap_cols
    for it in range(0, taps * k_chunks):
        tap = it // k_chunks
        k0 = (it - tap * k_chunks) * BLOCK_K
        t = tap // tap_cols
        s = tap - t * tap_cols
        if MODE == 0:
            row = tl.minimum(tl.maximum(i + (a + t - 1), 0), H - 1)  # replicate padding
            col = tl.minimum(tl.maximum(j + (b + s - 1), 0), W - 1)
            ok = m_ok
            w_tap = w_ptr + (ph * 4 + tap) * C * O
        else:
            row = i + t
            col = j + s
            ok = m_ok & (row < H) & (col < W)
            w_tap = w_ptr + ((1 + a - 2 * t) * 3 + (1 + b - 2 * s)) * C * O
        off = row.to(tl.int64) * sxh + col.to(tl.int64) * sxw
        xa, wb = _load_tap(x_img, off, ok, k0, C, sxc, w_tap, O, 1, offs_n, n_ok, BLOCK_K)
        acc = tl.dot(xa, wb, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    out_off = (2 * i + a).to(tl.int64) * syh + (2 * j + b).to(tl.int64) * syw
    y_ptrs = y_ptr + n.to(tl.int64) * syn + out_off[:, None] + offs_n[None, :].to(tl.int64) * syc
    ok2 = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptrs, out, mask=ok2)
    if STATS:
        # Sum and centred sum of squares of this tile's outputs (as stored), per channel.
        v = tl.where(ok2, out.to(acc.dtype), 0.0)
        count = tl.sum(m_ok.to(acc.dtype), axis=0)
        tile_sum = tl.sum(v, axis=0)
        d = tl.where(ok2, v - (tile_sum / count)[None, :], 0.0)
        base = ((n * 4 + ph) * NUM_TILES_M + pid_m).to(tl.int64) * 2 * O
        tl.store(stats_ptr + base + offs_n, tile_sum, mask=n_ok)
        tl.store(stats_ptr + base + O + offs_n, tl.sum(d * d, axis=0), mask=n_ok)


@triton.jit
def _upsample_dx_kernel(
    g_ptr, w_ptr, dx_ptr,
    H, W, C, O,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx at the interior pixels (1 <= i <= H - 2, 1 <= j <= W - 2), where the clamp never
    acts: dx[n, c, i, j] = sum over (phase a b, tap t s) of
    sum_o dy[n, o, 2i' + a, 2j' + b] W[a, b, t, s, c, o], i' = i - (a + t - 1), j' likewise.
    The border pixels are _upsample_dx_border_kernel's."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < H * W
    i = offs_m // W
    j = offs_m % W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels
    n_ok = offs_n < C
    g_img = g_ptr + n.to(tl.int64) * sgn
    acc = _zeros(BLOCK_M, BLOCK_N, ACC_FP64)
    k_chunks = tl.cdiv(O, BLOCK_K)
    for it in range(0, 16 * k_chunks):
        tap = it // k_chunks  # (a, b, t, s) = bits 3..0, the packing order of the phase weights
        k0 = (it - tap * k_chunks) * BLOCK_K
        a = tap // 8
        b = (tap // 4) % 2
        src_i = i - (a + (tap // 2) % 2 - 1)
        src_j = j - (b + tap % 2 - 1)
        ok = m_ok & (src_i >= 0) & (src_i < H) & (src_j >= 0) & (src_j < W)
        off = (2 * src_i + a).to(tl.int64) * sgh + (2 * src_j + b).to(tl.int64) * sgw
        ga, wb = _load_tap(g_img, off, ok, k0, O, sgc, w_ptr + tap * C * O, 1, O, offs_n, n_ok, BLOCK_K)
        acc = tl.dot(ga, wb, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    interior = m_ok & (i > 0) & (i < H - 1) & (j > 0) & (j < W - 1)
    dx_ptrs = (dx_ptr + n.to(tl.int64) * sxn + (i.to(tl.int64) * sxh + j.to(tl.int64) * sxw)[:, None]
               + offs_n[None, :].to(tl.int64) * sxc)
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=interior[:, None] & n_ok[None, :])


@triton.jit
def _source(idx, d, border, size):
    """The low-resolution index whose tap at offset d (-1, 0, 1) lands on idx once clamped to
    [0, size): idx - d (not border); or (border) the source that the clamp folds onto the
    first (d = -1: source 0) or the last index (d = 1: source size - 1)."""
    inner = idx - d
    edge = tl.where(d < 0, 0, size - 1)
    src = tl.where(border, edge + idx * 0, inner)
    ok = tl.where(border, idx == edge, (inner >= 0) & (inner < size)) != 0
    return src, ok


@triton.jit
def _upsample_dx_border_kernel(
    g_ptr, w_ptr, dx_ptr,
    H, W, C, O, NUM_BORDER,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx at the border pixels (first and last row and column; every pixel when H or W <= 2):
    the interior taps plus the taps that the replicate padding folds onto them."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < NUM_BORDER
    # Border pixel p: row 0 (p < W), row H - 1 (p < 2W), then the first and last column of
    # rows 1 .. H - 2 alternately. With H or W <= 2 every pixel is a border pixel.
    all_border = (H <= 2) | (W <= 2)
    q = offs_m - 2 * W
    i = tl.where(all_border, offs_m // W, tl.where(offs_m < W, 0, tl.where(offs_m < 2 * W, H - 1, 1 + q // 2)))
    j = tl.where(all_border, offs_m % W,
                 tl.where(offs_m < W, offs_m, tl.where(offs_m < 2 * W, offs_m - W, (q % 2) * (W - 1))))
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels
    n_ok = offs_n < C
    g_img = g_ptr + n.to(tl.int64) * sgn
    acc = _zeros(BLOCK_M, BLOCK_N, ACC_FP64)
    k_chunks = tl.cdiv(O, BLOCK_K)
    # Per row (column) 6 (phase, tap, source) options: u = 0, 1, 2 within phase a gives tap
    # t = (u + a) // 2, and the folded source when u == 1 + a (only taps at offset -1 or +1
    # have one): phase 0: (t0), (t0 folded), (t1); phase 1: (t0), (t1), (t1 folded).
    for it in range(0, 36 * k_chunks):
        combo = it // k_chunks
        k0 = (it - combo * k_chunks) * BLOCK_K
        r = combo // 6
        c = combo % 6
        a = r // 3
        b = c // 3
        t = (r % 3 + a) // 2
        s = (c % 3 + b) // 2
        src_i, r_ok = _source(i, a + t - 1, r % 3 == 1 + a, H)
        src_j, c_ok = _source(j, b + s - 1, c % 3 == 1 + b, W)
        ok = m_ok & r_ok & c_ok
        off = (2 * src_i + a).to(tl.int64) * sgh + (2 * src_j + b).to(tl.int64) * sgw
        tap = a * 8 + b * 4 + t * 2 + s
        ga, wb = _load_tap(g_img, off, ok, k0, O, sgc, w_ptr + tap * C * O, 1, O, offs_n, n_ok, BLOCK_K)
        acc = tl.dot(ga, wb, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    dx_ptrs = (dx_ptr + n.to(tl.int64) * sxn + (i.to(tl.int64) * sxh + j.to(tl.int64) * sxw)[:, None]
               + offs_n[None, :].to(tl.int64) * sxc)
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv_transpose_dx_kernel(
    g_ptr, w_ptr, dx_ptr,
    H, W, C, O,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[n, c, i, j] = sum_{k, l} sum_o dy[n, o, 2i - 1 + k, 2j - 1 + l] w[c, o, k, l]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < H * W
    i = offs_m // W
    j = offs_m % W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels
    n_ok = offs_n < C
    g_img = g_ptr + n.to(tl.int64) * sgn
    acc = _zeros(BLOCK_M, BLOCK_N, ACC_FP64)
    k_chunks = tl.cdiv(O, BLOCK_K)
    for it in range(0, 9 * k_chunks):
        tap = it // k_chunks  # k * 3 + l, the packing order of the kernel (3, 3, C, O)
        k0 = (it - tap * k_chunks) * BLOCK_K
        row = 2 * i + (tap // 3 - 1)
        col = 2 * j + (tap % 3 - 1)
        ok = m_ok & (row >= 0) & (col >= 0)
        off = row.to(tl.int64) * sgh + col.to(tl.int64) * sgw
        ga, wb = _load_tap(g_img, off, ok, k0, O, sgc, w_ptr + tap * C * O, 1, O, offs_n, n_ok, BLOCK_K)
        acc = tl.dot(ga, wb, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    dx_ptrs = (dx_ptr + n.to(tl.int64) * sxn + (i.to(tl.int64) * sxh + j.to(tl.int64) * sxw)[:, None]
               + offs_n[None, :].to(tl.int64) * sxc)
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _phase_conv_dw_kernel(
    x_ptr, g_ptr, dw_ptr, db_ptr,
    N, H, W, C, O, SPLITS, PIX_PER_SPLIT,
    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
    MODE: tl.constexpr, TAPS: tl.constexpr, HAS_DB: tl.constexpr, ACC_FP64: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial dW[split, tap, c, o] = sum over this split's pixels (n, i, j) of
    x_tap[n, i, j, c] dy_tap[n, i, j, o]; and the partial bias gradient db[split, tap, o]
    from the taps whose dy pixels cover the output once."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    tap = pid_z // SPLITS
    split = pid_z % SPLITS
    offs_c = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c_ok = offs_c < C
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = offs_o < O
    if MODE == 0:
        # tap = (phase a b, tap t s): x at the clamped tap, dy at the phase's pixel.
        a = tap // 8
        b = (tap // 4) % 2
        dr = a + (tap // 2) % 2 - 1
        dc = b + tap % 2 - 1
        db_tap = (tap % 4) == 0
    else:
        # tap = (k, l): x at (i, j), dy at (2i - 1 + k, 2j - 1 + l).
        a = tap // 3 - 1
        b = tap % 3 - 1
        dr = 0
        dc = 0
        db_tap = (a >= 0) & (b >= 0)
    do_db = HAS_DB & (pid_m == 0) & db_tap
    acc = _zeros(BLOCK_M, BLOCK_N, ACC_FP64)
    db_acc = tl.sum(acc, axis=0)
    hw = H * W
    start = split * PIX_PER_SPLIT
    end = tl.minimum(start + PIX_PER_SPLIT, N * hw)
    offs_k = tl.arange(0, BLOCK_K)
    for p0 in range(start, end, BLOCK_K):
        p = p0 + offs_k
        p_ok = p < end
        img = (p // hw).to(tl.int64)
        r = p % hw
        i = r // W
        j = r % W
        xr = tl.minimum(tl.maximum(i + dr, 0), H - 1)
        xc = tl.minimum(tl.maximum(j + dc, 0), W - 1)
        gr = 2 * i + a
        gc = 2 * j + b
        g_ok = p_ok & (gr >= 0) & (gc >= 0)
        x_off = img * sxn + xr.to(tl.int64) * sxh + xc.to(tl.int64) * sxw
        xt = tl.load(x_ptr + x_off[None, :] + offs_c[:, None].to(tl.int64) * sxc,
                     mask=c_ok[:, None] & p_ok[None, :], other=0.0)
        g_off = img * sgn + gr.to(tl.int64) * sgh + gc.to(tl.int64) * sgw
        gt = tl.load(g_ptr + g_off[:, None] + offs_o[None, :].to(tl.int64) * sgc,
                     mask=g_ok[:, None] & o_ok[None, :], other=0.0)
        acc = tl.dot(xt, gt, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        if do_db:
            db_acc += tl.sum(gt.to(acc.dtype), axis=0)
    base = (split * TAPS + tap).to(tl.int64)
    dw_ptrs = dw_ptr + (base * C + offs_c[:, None]) * O + offs_o[None, :]
    tl.store(dw_ptrs, acc, mask=c_ok[:, None] & o_ok[None, :])
    if do_db:
        tl.store(db_ptr + base * O + offs_o, db_acc, mask=o_ok)


# -- plans --------------------------------------------------------------------------------------

# Under the interpreter every program and every tl op costs the same Python overhead whatever
# its size, so blocks cover as much of a (small) problem as possible, up to this (a plan may
# be asked for less, to run the multi-tile paths on small shapes).
INTERPRETER_MAX_BLOCK = 64


@dataclass(frozen=True)
class Gemm:
    """One implicit-GEMM launch: its blocks, warps and stages (None: Triton's default) and grid."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int | None
    num_stages: int | None
    grid: tuple[int, int, int]

    def meta(self) -> dict:
        """The launch's block constexprs and options."""
        meta = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k)
        if self.num_warps is not None:
            meta.update(num_warps=self.num_warps, num_stages=self.num_stages)
        return meta


def _blocks(m: int, n: int, k: int, dtype: torch.dtype, facts: DeviceFacts, top: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an (m x n, depth k) GEMM tile grid.
    tl.dot needs every block >= 16. GPU: a fixed heuristic (tuning on the H200 is still to be
    done); interpreter: blocks up to ``top``, Triton's default warps and stages."""
    if not facts.compiled:
        return pow2_block(m, 16, top), pow2_block(n, 16, top), pow2_block(k, 16, top), None, None
    if dtype == torch.float64:
        return 32, pow2_block(n, 16, 32), 16, 4, 2
    half = dtype.itemsize <= 2
    block_n = pow2_block(n, 16, 128)
    block_m = 128 if m >= 128 else 64
    block_k = pow2_block(k, 16, 64 if half else 32)
    # fp32 operands (mma.sync, not wgmma) hold more per thread: eight warps from 128 x 64 on.
    wide = block_m * block_n >= (128 * 128 if half else 128 * 64)
    return block_m, block_n, block_k, 8 if wide else 4, 3


def _gemm(m: int, n: int, k: int, dtype, facts, top: int, grid_of) -> Gemm:
    bm, bn, bk, warps, stages = _blocks(m, n, k, dtype, facts, top)
    return Gemm(bm, bn, bk, warps, stages, grid_of(bm, bn))


@dataclass(frozen=True)
class ForwardPlan:
    mode: int                           # UPSAMPLE or TRANSPOSE
    precision: str                      # tl.dot input_precision
    gemm: Gemm                          # _phase_conv_fwd_kernel: (pixel tiles, O tiles, N * 4 phases)
    tiles_m: int                        # pixel tiles per phase (the statistics epilogue's partials)


@dataclass(frozen=True)
class BackwardPlan:
    mode: int
    precision: str
    dx: Gemm | None                     # upsample: interior pixels (None when H or W <= 2); transpose: all
    border: Gemm | None                 # upsample: the border pixels
    num_border: int                     # ... of which there are this many per image
    dw: Gemm                            # _phase_conv_dw_kernel: (C tiles, O tiles, taps * splits)
    taps: int                           # 16 (phase, tap) pairs or 9 kernel taps
    dw_splits: int                      # pixel splits of the weight gradient, summed in order
    dw_pixels_per_split: int            # whole BLOCK_K chunks


@functools.lru_cache(maxsize=1024)
def plan_forward(mode: int, shape: tuple[int, int, int, int], o: int, dtype: torch.dtype, facts: DeviceFacts, *,
                 tf32: bool, interpreter_block: int = INTERPRETER_MAX_BLOCK) -> ForwardPlan:
    """The forward of x (N, C, H, W) -> (N, O, 2H, 2W): a (H W pixels x O, depth C) GEMM per phase."""
    n, c, h, w = shape
    gemm = _gemm(h * w, o, c, dtype, facts, interpreter_block, lambda bm, bn: (cdiv(h * w, bm), cdiv(o, bn), n * 4))
    return ForwardPlan(mode, dot_precision(dtype, tf32), gemm, gemm.grid[0])


@functools.lru_cache(maxsize=1024)
def plan_backward(mode: int, shape: tuple[int, int, int, int], o: int, dtype: torch.dtype, facts: DeviceFacts, *,
                  tf32: bool, interpreter_block: int = INTERPRETER_MAX_BLOCK) -> BackwardPlan:
    """The backward: dx as (H W pixels x C, depth O) GEMMs (upsample: interior and border
    pixels apart), dW as a (C x O, depth N H W) GEMM per tap, split over the pixels into about
    two waves of programs, each at least 16 K steps deep (untuned); two splits under the
    interpreter, so that the fixed-order sum of the partials is exercised."""
    n, c, h, w = shape
    top = interpreter_block
    dx = _gemm(h * w, c, o, dtype, facts, top, lambda bm, bn: (cdiv(h * w, bm), cdiv(c, bn), n))
    border = None
    num_border = 0
    if mode == UPSAMPLE:
        num_border = h * w if h <= 2 or w <= 2 else 2 * (h + w) - 4
        border = _gemm(num_border, c, o, dtype, facts, top, lambda bm, bn: (cdiv(num_border, bm), cdiv(c, bn), n))
        if h <= 2 or w <= 2:
            dx = None  # every pixel is a border pixel
    taps = 16 if mode == UPSAMPLE else 9
    pixels = n * h * w
    bm, bn, bk, warps, stages = _blocks(c, o, pixels, dtype, facts, top)
    if facts.compiled:
        base = taps * cdiv(c, bm) * cdiv(o, bn)
        splits = max(1, min(cdiv(2 * facts.sms, base), cdiv(pixels, 16 * bk)))
    else:
        splits = min(2, cdiv(pixels, bk))
    per_split = cdiv(cdiv(pixels, splits), bk) * bk
    splits = cdiv(pixels, per_split)
    dw = Gemm(bm, bn, bk, warps, stages, (cdiv(c, bm), cdiv(o, bn), taps * splits))
    return BackwardPlan(mode, dot_precision(dtype, tf32), dx, border, num_border, dw, taps, splits, per_split)


def _out_channels(mode: int, weight: torch.Tensor) -> int:
    return weight.shape[0] if mode == UPSAMPLE else weight.shape[1]


def plans_for(mode: int, x: torch.Tensor, weight: torch.Tensor, backward: bool = False):
    """The forward (or backward) plan for x and weight on their device, as the launchers choose it."""
    facts = device_facts(x.device)
    make = plan_backward if backward else plan_forward
    return make(mode, tuple(x.shape), _out_channels(mode, weight), x.dtype, facts, tf32=tf32_allowed(facts))


# -- launchers ----------------------------------------------------------------------------------


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # (n, c, h, w) element strides


def _upsample_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(O, C, 3, 3) -> phase weights (4 phases, 4 taps, C, O), contiguous, in dtype."""
    o, c = weight.shape[:2]
    return upsample_phase_weights(weight).permute(0, 1, 2, 3, 5, 4).reshape(4, 4, c, o).to(dtype).contiguous()


def _transpose_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C, O, 3, 3) -> (3, 3, C, O), contiguous, in dtype."""
    return weight.permute(2, 3, 0, 1).to(dtype).contiguous()


def _packed(mode: int, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _upsample_weight(weight, dtype) if mode == UPSAMPLE else _transpose_weight(weight, dtype)


def launch_forward(pl: ForwardPlan, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stats: bool = False):
    """y of plan ``pl``; with ``stats``, (y, mean (N, O), biased variance (N, O)) of y over each
    (n, o) plane, from the epilogue's per-tile partials, in the accumulation dtype."""
    n, c, h, w = x.shape
    o = _out_channels(pl.mode, weight)
    packed = _packed(pl.mode, weight, x.dtype)
    xin = _nhwc(x)
    y = torch.empty((n, o, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=natural_format(x))
    gemm, tiles_m = pl.gemm, pl.tiles_m
    acc = acc_dtype(x.dtype)
    partial = torch.empty((n, 4, tiles_m, 2, o) if stats else (1,), dtype=acc, device=x.device)
    launch(_phase_conv_fwd_kernel, gemm.grid,
           xin, packed, bias.contiguous() if bias is not None else packed, y, partial,
           h, w, c, o, tiles_m, *_strides(xin), *_strides(y),
           MODE=pl.mode, HAS_BIAS=bias is not None, STATS=stats, ACC_FP64=acc == torch.float64,
           PRECISION=pl.precision, **gemm.meta())
    if not stats:
        return y
    # Chan et al.: merge the per-tile (count, sum, centred sum of squares) per (n, o).
    counts = torch.full((tiles_m,), gemm.block_m, dtype=acc, device=x.device)
    counts[-1] = h * w - (tiles_m - 1) * gemm.block_m
    counts = counts.view(1, 1, tiles_m, 1)
    sums, m2 = partial[:, :, :, 0], partial[:, :, :, 1]
    total = 4 * h * w
    mean = sums.sum(dim=(1, 2)) / total
    dev = sums / counts - mean[:, None, None, :]
    var = (m2.sum(dim=(1, 2)) + (counts * dev * dev).sum(dim=(1, 2))) / total
    return y, mean, var


def _dx(pl: BackwardPlan, dy: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, o: int) -> torch.Tensor:
    n, c, h, w = x.shape
    dx = torch.empty_like(x, memory_format=natural_format(x))
    common = dict(ACC_FP64=acc_dtype(x.dtype) == torch.float64, PRECISION=pl.precision)
    args = (dy, packed, dx, h, w, c, o)
    strides = (*_strides(dy), *_strides(dx))
    if pl.mode == TRANSPOSE:
        launch(_conv_transpose_dx_kernel, pl.dx.grid, *args, *strides, **common, **pl.dx.meta())
        return dx
    if pl.dx is not None:
        launch(_upsample_dx_kernel, pl.dx.grid, *args, *strides, **common, **pl.dx.meta())
    launch(_upsample_dx_border_kernel, pl.border.grid, *args, pl.num_border, *strides, **common, **pl.border.meta())
    return dx


def _dw(pl: BackwardPlan, dy: torch.Tensor, x: torch.Tensor, o: int, needs_bias: bool):
    """-> (dW (TAPS, C, O) in the accumulation dtype, db (O,) or None)."""
    n, c, h, w = x.shape
    xin = _nhwc(x)
    acc = acc_dtype(x.dtype)
    dw = torch.empty((pl.dw_splits, pl.taps, c, o), dtype=acc, device=x.device)
    db = torch.zeros((pl.dw_splits, pl.taps, o) if needs_bias else (1,), dtype=acc, device=x.device)
    launch(_phase_conv_dw_kernel, pl.dw.grid,
           xin, dy, dw, db, n, h, w, c, o, pl.dw_splits, pl.dw_pixels_per_split, *_strides(xin), *_strides(dy),
           MODE=pl.mode, TAPS=pl.taps, HAS_DB=needs_bias, ACC_FP64=acc == torch.float64,
           PRECISION=pl.precision, **pl.dw.meta())
    return dw.sum(dim=0), (db.sum(dim=(0, 1)) if needs_bias else None)


def launch_backward(pl: BackwardPlan, dy, x, weight, needs_x: bool, needs_weight: bool, needs_bias: bool):
    """-> (dx, dweight, dbias) of plan ``pl``; a gradient not asked for is an empty (0,) tensor."""
    o = _out_channels(pl.mode, weight)
    dy = _nhwc(dy)
    empty = weight.new_empty((0,))
    dx = x.new_empty((0,))
    if needs_x:
        dx = _dx(pl, dy, x, _packed(pl.mode, weight, x.dtype), o)
    dw, db = empty, empty
    if needs_weight:
        taps, db_acc = _dw(pl, dy, x, o, needs_bias)
        if pl.mode == UPSAMPLE:
            c = x.shape[1]
            dw = upsample_phase_weights_adjoint(taps.view(2, 2, 2, 2, c, o).transpose(-1, -2))
        else:
            dw = taps.view(3, 3, *taps.shape[1:]).permute(2, 3, 0, 1)
        dw = dw.to(weight.dtype).contiguous()
        if needs_bias:
            db = db_acc.to(weight.dtype)
    elif needs_bias:
        db = dy.sum(dim=(0, 2, 3), dtype=acc_dtype(dy.dtype)).to(weight.dtype)
    return dx, dw, db


def upsample_conv2d_forward(x, weight, bias):
    """Nearest x2, reflection pad 1, 3x3 conv: x (N, C, H, W), weight (O, C, 3, 3) -> (N, O, 2H, 2W)."""
    return launch_forward(plans_for(UPSAMPLE, x, weight), x, weight, bias)


def upsample_conv2d_forward_stats(x, weight, bias):
    """-> (y, mean (N, O), biased variance (N, O)) of y over each (n, o) plane, fp32 (fp64)."""
    return launch_forward(plans_for(UPSAMPLE, x, weight), x, weight, bias, stats=True)


def upsample_conv2d_backward(dy, x, weight, needs_x: bool, needs_weight: bool, needs_bias: bool):
    """-> (dx, dweight, dbias); a gradient not asked for is an empty (0,) tensor."""
    return launch_backward(plans_for(UPSAMPLE, x, weight, backward=True), dy, x, weight, needs_x, needs_weight,
                           needs_bias)


def conv_transpose2d_forward(x, weight, bias):
    """Transposed 3x3 conv, stride 2, padding 1, output_padding 1: weight (C, O, 3, 3)."""
    return launch_forward(plans_for(TRANSPOSE, x, weight), x, weight, bias)


def conv_transpose2d_forward_stats(x, weight, bias):
    """-> (y, mean (N, O), biased variance (N, O)) of y over each (n, o) plane, fp32 (fp64)."""
    return launch_forward(plans_for(TRANSPOSE, x, weight), x, weight, bias, stats=True)


def conv_transpose2d_backward(dy, x, weight, needs_x: bool, needs_weight: bool, needs_bias: bool):
    """-> (dx, dweight, dbias); a gradient not asked for is an empty (0,) tensor."""
    return launch_backward(plans_for(TRANSPOSE, x, weight, backward=True), dy, x, weight, needs_x, needs_weight,
                           needs_bias)
