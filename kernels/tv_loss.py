"""Total-variation loss, forward and backward.

    tv[n] = sum_{c,i,j} |x[n,c,i+1,j] - x[n,c,i,j]|^p + |x[n,c,i,j+1] - x[n,c,i,j]|^p,  p in {1, 2}

Tiling. Each image is walked as rows of a 2-D tile [BLOCK_R, BLOCK_F] whose fast axis F runs
along the unit-stride dimension, so both memory formats are read in place, coalesced:

* NCHW, and any other strides: a row is one image row (n, c, i), F = j (stride s_w); rows =
  C * H per image. Right neighbour: +s_w, valid while j < W - 1.
* channels_last (C > 1, s_c < s_w == C * s_c: the channels of a row's pixels interleaved with
  no gap): a row is one image row (n, i) holding W * C values, F = j * C + c (stride s_c);
  rows = H per image. Right neighbour: +C * s_c = +s_w, valid while F < (W - 1) * C: no
  per-element division. (A channels_last view with gaps in its rows, x[..., ::2] say, takes
  the first, general path: right, but not coalesced.)

In both, the down neighbour is +s_h, valid while i < H - 1, and i is computed once per row.
The neighbour loads re-read lines the tile (or the next row's tile) has just brought into
L1/L2, so DRAM sees each element about once. A tile never spans two images. Offsets are
64-bit per row (images beyond 2^31 elements are fine).

Forward: each program owns one column block of one image and ``iters`` consecutive row
blocks; it writes one partial sum (fp32, fp64 for fp64 input) of |d|^p. A second, one-launch
stage sums the partials in a fixed order (per image for "none", all of them for "sum" and
"mean"): deterministic, no atomics. (For "none" with one partial per image, the partials are
the result and the second launch is skipped.) The launcher sizes tiles and ``iters`` so that there are at
least ~1k programs when the tensor allows it (4 * 132 SMs) and at most ~4k partials to sum.
Bytes moved: read numel * itemsize (+ 4 B per partial, written and read once), write 4-8 B per
image (or one scalar).

Backward: dx = g_n * (phi'(dh[i-1,j]) - phi'(dh[i,j]) + phi'(dw[i,j-1]) - phi'(dw[i,j])),
phi'(d) = 2 d (p = 2) or sign(d) (p = 1, sign(0) = 0 as torch.abs's gradient); a difference
outside the image is 0. One tile per program: five loads (the centre from DRAM, the four
neighbours from cache) and one store of dx in x's memory format (``torch.empty_like(x)``; its
own strides are passed). g_n is read from the device gradient tensor (stride 0 for the 0-d
"sum"/"mean" gradient, divided by N in the kernel for "mean"): no host synchronisation.
Bytes moved: read numel * itemsize, write numel * itemsize.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, cdiv

REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
MAX_TILE = 2048       # elements per tile (per loop iteration in the forward)
MIN_TILE = 512
ROW_BYTES = 1024      # cap of BLOCK_F * itemsize: 256 fp32 / 512 fp16 contiguous values per row
MIN_PROGRAMS = 1024   # shrink tiles until this many programs (a 132-SM GPU wants >= 528)
MAX_PARTIALS = 4096   # forward: beyond this, programs loop over row blocks instead
# The interpreter runs programs one after another (~30 ms each): no occupancy to win there,
# so it keeps the largest tiles.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
_MIN_PROGRAMS_NOW = 1 if _INTERPRETED else MIN_PROGRAMS
FINAL_BLOCK = 1024


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@dataclass(frozen=True)
class _Plan:
    """How an (N, C, H, W) tensor is walked as rows (see the module docstring)."""

    rows: int        # rows per image
    height: int      # H: the image row index of tile row r is r % H
    row_len: int     # elements per row
    step: int        # right neighbour = +step elements along F
    block_r: int
    block_f: int
    n_row_blocks: int
    n_col_blocks: int
    num_warps: int
    interleaved: bool  # channels_last rows (F = j * C + c)

    def strides(self, t: torch.Tensor) -> tuple[int, int, int, int]:
        """(s_n, s_d, s_h, s_f): row r of image n starts at n s_n + (r // H) s_d + (r % H) s_h."""
        s_n, s_c, s_h, s_w = t.stride()
        return (s_n, 0, s_h, s_c) if self.interleaved else (s_n, s_c, s_h, s_w)

    def wide(self, strides: tuple[int, ...]) -> bool:
        """Whether the in-row offsets F * s_f may not fit in int32."""
        return (self.n_col_blocks * self.block_f + self.step) * max(strides[3], 1) >= 2**31


def _interleaved(t: torch.Tensor) -> bool:
    """Channels interleaved in each row: C > 1, s_c < s_w and each row dense (s_w == C s_c)."""
    c = t.shape[1]
    _, s_c, _, s_w = t.stride()
    return c > 1 and s_c < s_w and s_w == c * s_c


def plan(shape: tuple[int, int, int, int], interleaved: bool, itemsize: int,
         min_programs: int = MIN_PROGRAMS) -> _Plan:
    """Tiles for ``shape``: up to MAX_TILE elements, halved (down to MIN_TILE) while there
    would be fewer than ``min_programs`` tiles."""
    n, c, h, w = shape
    if interleaved:
        rows, row_len, step = h, w * c, c
    else:
        rows, row_len, step = c * h, w, 1
    block_f = max(4, min(_next_pow2(row_len), ROW_BYTES // itemsize))
    tile = MAX_TILE
    while tile > MIN_TILE and cdiv(n * rows * row_len, tile) < min_programs:
        tile //= 2
    block_r = max(1, min(tile // block_f, _next_pow2(rows)))
    return _Plan(
        rows=rows, height=h, row_len=row_len, step=step, block_r=block_r, block_f=block_f,
        n_row_blocks=cdiv(rows, block_r), n_col_blocks=cdiv(row_len, block_f),
        num_warps=4 if block_r * block_f >= 1024 else 2, interleaved=interleaved,
    )


def forward_grid(pl: _Plan, n: int) -> tuple[int, int]:
    """(programs, row blocks per program) of the forward."""
    groups = max(1, min(pl.n_row_blocks, cdiv(MAX_PARTIALS, n * pl.n_col_blocks)))
    iters = cdiv(pl.n_row_blocks, groups)
    groups = cdiv(pl.n_row_blocks, iters)
    return n * groups * pl.n_col_blocks, iters


def backward_programs(pl: _Plan, n: int) -> int:
    return n * pl.n_row_blocks * pl.n_col_blocks


@triton.jit
def _tv_partial_kernel(
    x_ptr, partial_ptr,
    ROWS, H, ROW_LEN, STEP,
    s_n, s_d, s_h, s_f,
    n_groups, n_col_blocks, iters,
    P: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    per_image = n_groups * n_col_blocks
    n = pid // per_image
    rem = pid % per_image
    group = rem // n_col_blocks
    cols = (rem % n_col_blocks) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < ROW_LEN
    right_ok = cols < ROW_LEN - STEP
    if WIDE:
        col_off = cols.to(tl.int64) * s_f
    else:
        col_off = cols * s_f
    right_off = STEP * s_f
    acc_ty = partial_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_R, BLOCK_F], dtype=acc_ty)
    img = n.to(tl.int64) * s_n
    for it in range(0, iters):
        rows = (group * iters + it) * BLOCK_R + tl.arange(0, BLOCK_R)
        i = rows % H
        base = img + (rows // H).to(tl.int64) * s_d + i.to(tl.int64) * s_h
        ptrs = x_ptr + (base[:, None] + col_off[None, :])
        mask = (rows < ROWS)[:, None] & col_ok[None, :]
        mask_r = mask & right_ok[None, :]
        mask_d = mask & (i < H - 1)[:, None]
        x = tl.load(ptrs, mask=mask, other=0.0).to(acc_ty)
        xr = tl.load(ptrs + right_off, mask=mask_r, other=0.0).to(acc_ty)
        xd = tl.load(ptrs + s_h, mask=mask_d, other=0.0).to(acc_ty)
        dr = tl.where(mask_r, xr - x, 0.0)
        dd = tl.where(mask_d, xd - x, 0.0)
        if P == 2:
            acc += dr * dr + dd * dd
        else:
            acc += tl.abs(dr) + tl.abs(dd)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _tv_finish_kernel(partial_ptr, out_ptr, N, per_image, REDUCTION: tl.constexpr, BLOCK: tl.constexpr):
    """REDUCTION 0: program n sums image n's partials; 1 / 2: one program sums all (/ N)."""
    pid = tl.program_id(0)
    if REDUCTION == 0:
        start = pid.to(tl.int64) * per_image
        total = per_image
    else:
        start = 0
        total = N * per_image
    acc_ty = partial_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    for k in range(0, total, BLOCK):
        idx = k + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + start + idx, mask=idx < total, other=0.0)
    s = tl.sum(acc, axis=0)
    if REDUCTION == 2:
        s = s / N
    tl.store(out_ptr + pid, s)


@triton.jit
def _tv_grad_kernel(
    x_ptr, grad_ptr, out_ptr,
    N, ROWS, H, ROW_LEN, STEP,
    s_n, s_d, s_h, s_f,
    o_n, o_d, o_h, o_f,
    g_stride, n_row_blocks, n_col_blocks,
    P: tl.constexpr, MEAN: tl.constexpr, ACC_FP64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    per_image = n_row_blocks * n_col_blocks
    n = pid // per_image
    rem = pid % per_image
    rows = (rem // n_col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (rem % n_col_blocks) * BLOCK_F + tl.arange(0, BLOCK_F)
    if ACC_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    i = rows % H
    d = (rows // H).to(tl.int64)
    n64 = n.to(tl.int64)
    base = n64 * s_n + d * s_d + i.to(tl.int64) * s_h
    obase = n64 * o_n + d * o_d + i.to(tl.int64) * o_h
    if WIDE:
        col_off = cols.to(tl.int64) * s_f
        ocol_off = cols.to(tl.int64) * o_f
    else:
        col_off = cols * s_f
        ocol_off = cols * o_f
    side = STEP * s_f
    mask = (rows < ROWS)[:, None] & (cols < ROW_LEN)[None, :]
    up_ok = mask & (i > 0)[:, None]
    down_ok = mask & (i < H - 1)[:, None]
    left_ok = mask & (cols >= STEP)[None, :]
    right_ok = mask & (cols < ROW_LEN - STEP)[None, :]
    ptrs = x_ptr + (base[:, None] + col_off[None, :])
    x = tl.load(ptrs, mask=mask, other=0.0).to(acc_ty)
    xu = tl.load(ptrs - s_h, mask=up_ok, other=0.0).to(acc_ty)
    xd = tl.load(ptrs + s_h, mask=down_ok, other=0.0).to(acc_ty)
    xl = tl.load(ptrs - side, mask=left_ok, other=0.0).to(acc_ty)
    xr = tl.load(ptrs + side, mask=right_ok, other=0.0).to(acc_ty)
    # The four differences, 0 outside the image; then phi'(d) = 2 d or sign(d).
    du = tl.where(up_ok, x - xu, 0.0)
    dd = tl.where(down_ok, xd - x, 0.0)
    dl = tl.where(left_ok, x - xl, 0.0)
    dr = tl.where(right_ok, xr - x, 0.0)
    if P == 2:
        t = 2.0 * ((du - dd) + (dl - dr))
    else:
        t = ((du > 0).to(acc_ty) - (du < 0).to(acc_ty)) - ((dd > 0).to(acc_ty) - (dd < 0).to(acc_ty))
        t += ((dl > 0).to(acc_ty) - (dl < 0).to(acc_ty)) - ((dr > 0).to(acc_ty) - (dr < 0).to(acc_ty))
    g = tl.load(grad_ptr + n64 * g_stride).to(acc_ty)
    if MEAN:
        g = g / N
    out_ptrs = out_ptr + (obase[:, None] + ocol_off[None, :])
    tl.store(out_ptrs, (t * g).to(out_ptr.dtype.element_ty), mask=mask)


def _plan(x: torch.Tensor, interleaved: bool) -> _Plan:
    return plan(tuple(x.shape), interleaved, x.element_size(), _MIN_PROGRAMS_NOW)


def tv_loss_forward(x: torch.Tensor, p: int, reduction: str) -> torch.Tensor:
    """x: (N, C, H, W) -> tv per image (N,) for "none", else its sum or batch mean (0-d);
    float32 (float64 for float64 x)."""
    pl = _plan(x, _interleaved(x))
    n = x.shape[0]
    programs, iters = forward_grid(pl, n)
    strides = pl.strides(x)
    acc = acc_dtype(x.dtype)
    partials = torch.empty(programs, device=x.device, dtype=acc)
    _tv_partial_kernel[(programs,)](
        x, partials, pl.rows, pl.height, pl.row_len, pl.step, *strides,
        programs // (n * pl.n_col_blocks), pl.n_col_blocks, iters,
        P=p, WIDE=pl.wide(strides), BLOCK_R=pl.block_r, BLOCK_F=pl.block_f, num_warps=pl.num_warps,
    )
    code = REDUCTIONS[reduction]
    if code == 0 and programs == n:  # one partial per image: those are the sums
        return partials
    out = torch.empty((n,) if code == 0 else (), device=x.device, dtype=acc)
    _tv_finish_kernel[(n if code == 0 else 1,)](
        partials, out, n, programs // n, REDUCTION=code, BLOCK=FINAL_BLOCK, num_warps=4,
    )
    return out


def tv_loss_backward(grad: torch.Tensor, x: torch.Tensor, p: int, reduction: str) -> torch.Tensor:
    """grad: (N,) for "none", else 0-d -> d tv / d x, laid out as ``torch.empty_like(x)``."""
    out = torch.empty_like(x)
    pl = _plan(x, _interleaved(x) and _interleaved(out))
    n = x.shape[0]
    strides, ostrides = pl.strides(x), pl.strides(out)
    grid = (backward_programs(pl, n),)
    _tv_grad_kernel[grid](
        x, grad, out, n, pl.rows, pl.height, pl.row_len, pl.step, *strides, *ostrides,
        grad.stride(0) if grad.dim() == 1 else 0, pl.n_row_blocks, pl.n_col_blocks,
        P=p, MEAN=reduction == "mean", ACC_FP64=x.dtype == torch.float64,
        WIDE=pl.wide(strides) or pl.wide(ostrides),
        BLOCK_R=pl.block_r, BLOCK_F=pl.block_f, num_warps=pl.num_warps,
    )
    return out
