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

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastperc.rules import DeviceFacts, acc_dtype, cdiv, device_facts, next_pow2

from .common import launch

REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
MAX_TILE = 2048       # elements per tile (per loop iteration in the forward)
MIN_TILE = 512
ROW_BYTES = 1024      # cap of BLOCK_F * itemsize: 256 fp32 / 512 fp16 contiguous values per row
MIN_PROGRAMS = 1024   # compiled: shrink tiles until this many programs (a 132-SM GPU wants >= 528)
MAX_PARTIALS = 4096   # forward: beyond this, programs loop over row blocks instead
FINAL_BLOCK = 1024
FINAL_WARPS = 4


def _interleaved(c: int, strides: tuple[int, int, int, int]) -> bool:
    """Channels interleaved in each row: C > 1, s_c < s_w and each row dense (s_w == C s_c)."""
    _, s_c, _, s_w = strides
    return c > 1 and s_c < s_w and s_w == c * s_c


@dataclass(frozen=True)
class Plan:
    """How an (N, C, H, W) tensor is walked as rows (see the module docstring), and the grids."""

    n: int
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
    wide: bool         # in-row offsets F * s_f may not fit in int32: 64-bit offsets
    groups: int        # forward: programs per (image, column block) ...
    iters: int         # ... each summing this many consecutive row blocks

    @property
    def forward_grid(self) -> tuple[int]:
        return (self.n * self.groups * self.n_col_blocks,)

    @property
    def backward_grid(self) -> tuple[int]:
        return (self.n * self.n_row_blocks * self.n_col_blocks,)

    def finish_grid(self, reduction: str) -> tuple[int] | None:
        """The grid of the forward's second stage; None for "none" with one partial per image
        (the partials are then the result)."""
        if reduction == "none":
            return None if self.forward_grid[0] == self.n else (self.n,)
        return (1,)

    def strides(self, t: torch.Tensor) -> tuple[int, int, int, int]:
        """(s_n, s_d, s_h, s_f): row r of image n starts at n s_n + (r // H) s_d + (r % H) s_h."""
        s_n, s_c, s_h, s_w = t.stride()
        return (s_n, 0, s_h, s_c) if self.interleaved else (s_n, s_c, s_h, s_w)


@functools.lru_cache(maxsize=1024)
def plan(shape: tuple[int, int, int, int], strides: tuple[tuple[int, int, int, int], ...], itemsize: int,
         facts: DeviceFacts, *, max_partials: int = MAX_PARTIALS) -> Plan:
    """The plan for tensors of ``shape`` with the given ``strides`` walked together (x; x and
    dx in the backward): rows interleave the channels when every one of them allows it. Tiles
    of up to MAX_TILE elements, halved (down to MIN_TILE) while there would be fewer than
    MIN_PROGRAMS tiles; the interpreter runs programs one after another (~30 ms each), with no
    occupancy to win, so it keeps the largest tiles. The forward has at most ``max_partials``
    programs: beyond that each loops over several row blocks."""
    n, c, h, w = shape
    interleaved = all(_interleaved(c, s) for s in strides)
    if interleaved:
        rows, row_len, step = h, w * c, c
    else:
        rows, row_len, step = c * h, w, 1
    block_f = max(4, min(next_pow2(row_len), ROW_BYTES // itemsize))
    min_programs = MIN_PROGRAMS if facts.compiled else 1
    tile = MAX_TILE
    while tile > MIN_TILE and cdiv(n * rows * row_len, tile) < min_programs:
        tile //= 2
    block_r = max(1, min(tile // block_f, next_pow2(rows)))
    n_row_blocks, n_col_blocks = cdiv(rows, block_r), cdiv(row_len, block_f)
    unit = [s[1] if interleaved else s[3] for s in strides]  # s_f of each tensor
    wide = any((n_col_blocks * block_f + step) * max(s_f, 1) >= 2**31 for s_f in unit)
    groups = max(1, min(n_row_blocks, cdiv(max_partials, n * n_col_blocks)))
    iters = cdiv(n_row_blocks, groups)
    return Plan(
        n=n, rows=rows, height=h, row_len=row_len, step=step, block_r=block_r, block_f=block_f,
        n_row_blocks=n_row_blocks, n_col_blocks=n_col_blocks,
        num_warps=4 if block_r * block_f >= 1024 else 2, interleaved=interleaved, wide=wide,
        groups=cdiv(n_row_blocks, iters), iters=iters,
    )


def plan_for(*tensors: torch.Tensor) -> Plan:
    """The plan for ``tensors`` (x, or x and dx) on their device, as the launchers choose it."""
    x = tensors[0]
    return plan(tuple(x.shape), tuple(t.stride() for t in tensors), x.element_size(), device_facts(x.device))


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


def launch_forward(pl: Plan, x: torch.Tensor, p: int, reduction: str) -> torch.Tensor:
    """The forward of plan ``pl`` (made for x's shape and strides)."""
    n = x.shape[0]
    strides = pl.strides(x)
    acc = acc_dtype(x.dtype)
    programs = pl.forward_grid[0]
    partials = torch.empty(programs, device=x.device, dtype=acc)
    launch(_tv_partial_kernel, pl.forward_grid,
           x, partials, pl.rows, pl.height, pl.row_len, pl.step, *strides, pl.groups, pl.n_col_blocks, pl.iters,
           P=p, WIDE=pl.wide, BLOCK_R=pl.block_r, BLOCK_F=pl.block_f, num_warps=pl.num_warps)
    finish = pl.finish_grid(reduction)
    if finish is None:  # one partial per image: those are the sums
        return partials
    code = REDUCTIONS[reduction]
    out = torch.empty((n,) if code == 0 else (), device=x.device, dtype=acc)
    launch(_tv_finish_kernel, finish,
           partials, out, n, programs // n, REDUCTION=code, BLOCK=FINAL_BLOCK, num_warps=FINAL_WARPS)
    return out


def launch_backward(pl: Plan, grad: torch.Tensor, x: torch.Tensor, p: int, reduction: str) -> torch.Tensor:
    """The backward of plan ``pl`` (made for the strides of x and of ``torch.empty_like(x)``)."""
    out = torch.empty_like(x)
    launch(_tv_grad_kernel, pl.backward_grid,
           x, grad, out, x.shape[0], pl.rows, pl.height, pl.row_len, pl.step, *pl.strides(x), *pl.strides(out),
           grad.stride(0) if grad.dim() == 1 else 0, pl.n_row_blocks, pl.n_col_blocks,
           P=p, MEAN=reduction == "mean", ACC_FP64=x.dtype == torch.float64, WIDE=pl.wide,
           BLOCK_R=pl.block_r, BLOCK_F=pl.block_f, num_warps=pl.num_warps)
    return out


def tv_loss_forward(x: torch.Tensor, p: int, reduction: str) -> torch.Tensor:
    """x: (N, C, H, W) -> tv per image (N,) for "none", else its sum or batch mean (0-d);
    float32 (float64 for float64 x)."""
    return launch_forward(plan_for(x), x, p, reduction)


def tv_loss_backward(grad: torch.Tensor, x: torch.Tensor, p: int, reduction: str) -> torch.Tensor:
    """grad: (N,) for "none", else 0-d -> d tv / d x, laid out as ``torch.empty_like(x)``."""
    dx_layout = torch.empty_like(x, device="meta")  # the strides of launch_backward's dx, no memory
    return launch_backward(plan_for(x, dx_layout), grad, x, p, reduction)
