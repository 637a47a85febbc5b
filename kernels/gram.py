"""Gram matrix and style loss: forward and backward Triton kernels.

Notation: x (N, C, H, W), K = H*W, psi = x[n] as a C x K matrix indexed (c, k) with
k = h*W + w, count = C*K, G[n] = psi psi^T / count.

Forward (``gram_forward``, ``style_loss_forward``): each program owns one BLOCK_C x BLOCK_C tile
(bi, bj) of G with bi <= bj (programs below the diagonal exit at once) and accumulates
tl.dot(psi[i-block, k-chunk], psi[j-block, k-chunk]^T) in fp32 (fp64 for fp64 x) over its K
range. Finishing a tile: divide by count, cast, store it at (bi, bj) and, off the diagonal, its
transpose at (bj, bi). For the style loss the same step also subtracts the target tile
T[bi, bj] (and compares the mirrored tile with T[bj, bi], so any target works, symmetric or
not), squares and sums into one partial per tile, and stores G in fp32 for the backward.
Tall-skinny shapes (few tiles, long K) split K over S programs per tile: stage 1 writes fp32
partial tiles to a workspace (N, S, C, C), stage 2 sums them in a fixed order and finishes
the tile there (so the squares of the style loss wait for the full sum). No atomics: the
result is bit-identical from run to run. Per-tile loss partials are summed in fixed order.
    bytes: N*C*K*itemsize read (each upper tile re-reads its two row blocks from L2)
           + N*C*C*itemsize written [+ N*C*C*itemsize(T) read, N*C*C*4 written for the loss]
           + 2*N*S*C*C*4 for the split-K workspace when S > 1
    FLOPs: about N*C*C*K (upper triangle only: half of the 2*N*C*C*K of a full product)

Backward (``gram_backward``, ``style_loss_backward``): one kernel for both,
    d psi[n] = scale * M[n] psi[n],   M = B + B^T - 2*A  (the A term only when given),
with M formed on the fly, tile by tile, from the (N, C, C) inputs: for the Gram matrix B = dG
and scale = 1/count; for the style loss B = T, A = G (saved by the forward) and
scale = -2 g / (N count), so that scale * M = 2 g / (N count) * (2G - T - T^T). The scale is read
from a device tensor (no host sync on g). M is rounded to x's dtype for fp16/bf16 (tensor
cores), kept in fp32 for fp32 x. d x is written in x's layout (channels_last in, channels_last out).
    bytes: N*C*K*itemsize read + N*C*K*itemsize written (+ the C x C matrices, from L2)
    FLOPs: 2*N*C*C*K

tl.dot precision for fp32 inputs: "tf32" where torch allows TF32 matmuls
(``fastperc.rules.matmul_tf32``), else "ieee"; fp64 always "ieee".

Deciding and doing are apart: ``plan_forward`` / ``plan_backward`` turn the shape, dtype and
device facts into a frozen plan (blocks, warps, splits, grids, flags), ``launch_forward`` /
``launch_backward`` run a plan; ``gram_forward`` and the other launchers do both.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastperc.rules import (DeviceFacts, acc_dtype, cdiv, device_facts, dot_precision, hw_strides, natural_format,
                            pow2_block, tf32_allowed, walkable)

from .common import launch, tl_dtype

# Programs to aim for when splitting K: about two waves of the GPU (under the interpreter, of
# the SMs it pretends to have, so that tall shapes split in the tests too).
WAVES = 2
# A split covers at least this many BLOCK_K chunks (less would be mostly workspace traffic).
MIN_CHUNKS_PER_SPLIT = 4


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _finish_tile(acc, n, bi, bj, C, count, g_ptr, t_ptr, part_ptr, s_tn, s_tr, s_tc,
                 BLOCK_C: tl.constexpr, N_TILES: tl.constexpr, STYLE: tl.constexpr):
    """Scale the accumulated tile (bi, bj), store it and its mirror; the style loss partial."""
    offs_i = bi * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_j = bj * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_i[:, None] < C) & (offs_j[None, :] < C)
    g = acc / count
    g_base = g_ptr + n * C * C
    out = g.to(g_ptr.dtype.element_ty)
    tl.store(g_base + offs_i[:, None] * C + offs_j[None, :], out, mask=mask)
    if bi != bj:
        tl.store(g_base + offs_j[None, :] * C + offs_i[:, None], out, mask=mask)
    if STYLE:
        t_base = t_ptr + n * s_tn
        t = tl.load(t_base + offs_i[:, None] * s_tr + offs_j[None, :] * s_tc, mask=mask, other=0.0)
        d = tl.where(mask, g - t.to(g.dtype), 0.0)
        total = tl.sum(tl.sum(d * d, axis=1), axis=0)
        if bi != bj:  # the mirrored tile G[j, i] = g[i, j] against T[j, i]
            t = tl.load(t_base + offs_j[None, :] * s_tr + offs_i[:, None] * s_tc, mask=mask, other=0.0)
            d = tl.where(mask, g - t.to(g.dtype), 0.0)
            total += tl.sum(tl.sum(d * d, axis=1), axis=0)
        tl.store(part_ptr + n * N_TILES * N_TILES + bi * N_TILES + bj, total)


@triton.jit
def _gram_tile_kernel(x_ptr, ws_ptr, g_ptr, t_ptr, part_ptr,
                      C, K, count, k_per_split,
                      s_xn, s_xc, s_xk, s_tn, s_tr, s_tc,
                      BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, N_TILES: tl.constexpr,
                      SPLIT: tl.constexpr, STYLE: tl.constexpr, ACC: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Grid (N_TILES**2, S, N): tile (bi, bj) of G[n] over K range s. Stage 1 when SPLIT."""
    pid_t = tl.program_id(0)
    bi = pid_t // N_TILES
    bj = pid_t % N_TILES
    if bi > bj:
        return
    s = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_i = bi * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_j = bj * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # 64-bit offsets: one image may span more than 2**31 elements.
    rows_i = offs_i.to(tl.int64) * s_xc
    rows_j = offs_j.to(tl.int64) * s_xc
    cols = (k_start + offs_k).to(tl.int64) * s_xk
    a_ptrs = x_ptr + n * s_xn + rows_i[:, None] + cols[None, :]    # psi[i, k]
    b_ptrs = x_ptr + n * s_xn + cols[:, None] + rows_j[None, :]    # psi[j, k]^T
    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = (k0 + offs_k) < k_end
        a = tl.load(a_ptrs, mask=(offs_i[:, None] < C) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_j[None, :] < C), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        a_ptrs += BLOCK_K * s_xk
        b_ptrs += BLOCK_K * s_xk
    if SPLIT:
        ws = ws_ptr + (n * tl.num_programs(1) + s) * C * C
        mask = (offs_i[:, None] < C) & (offs_j[None, :] < C)
        tl.store(ws + offs_i[:, None] * C + offs_j[None, :], acc, mask=mask)
    else:
        _finish_tile(acc, n, bi, bj, C, count, g_ptr, t_ptr, part_ptr, s_tn, s_tr, s_tc,
                     BLOCK_C, N_TILES, STYLE)


@triton.jit
def _gram_reduce_kernel(ws_ptr, g_ptr, t_ptr, part_ptr, C, S, count, s_tn, s_tr, s_tc,
                        BLOCK_C: tl.constexpr, N_TILES: tl.constexpr, STYLE: tl.constexpr,
                        ACC: tl.constexpr):
    """Stage 2, grid (N_TILES**2, N): sum the S partial tiles in order, then finish the tile."""
    pid_t = tl.program_id(0)
    bi = pid_t // N_TILES
    bj = pid_t % N_TILES
    if bi > bj:
        return
    n = tl.program_id(1).to(tl.int64)
    offs_i = bi * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_j = bj * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_i[:, None] < C) & (offs_j[None, :] < C)
    ptrs = ws_ptr + n * S * C * C + offs_i[:, None] * C + offs_j[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=ACC)
    for s in range(S):
        acc += tl.load(ptrs + s * C * C, mask=mask, other=0.0)
    _finish_tile(acc, n, bi, bj, C, count, g_ptr, t_ptr, part_ptr, s_tn, s_tr, s_tc,
                 BLOCK_C, N_TILES, STYLE)


@triton.jit
def _gram_backward_kernel(x_ptr, out_ptr, b_ptr, a_ptr, scale_ptr, m_scale_ptr, C, K,
                          s_xn, s_xc, s_xk, s_on, s_oc, s_ok, s_bn, s_br, s_bc,
                          BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                          HAS_A: tl.constexpr, SCALE_M: tl.constexpr, ACC: tl.constexpr,
                          PRECISION: tl.constexpr):
    """Grid (cdiv(K, BLOCK_K), cdiv(C, BLOCK_M), N): out[n, i, k] = scale * sum_j M[i, j] psi[j, k],
    M = B + B^T - 2 A (A contiguous (N, C, C), only when HAS_A). With SCALE_M, image n's M is
    multiplied by the power of two m_scale[n] before it is rounded to x's dtype for the dot, and
    the result divided by it (both exact)."""
    n = tl.program_id(2).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    # 64-bit offsets: one image may span more than 2**31 elements.
    offs_k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_J)
    i_ok = offs_i < C
    k_ok = offs_k < K
    x_base = x_ptr + n * s_xn
    b_base = b_ptr + n * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    if SCALE_M:
        m_scale = tl.load(m_scale_ptr + n).to(ACC)
    for j0 in range(0, C, BLOCK_J):
        j = j0 + offs_j
        mask = i_ok[:, None] & (j[None, :] < C)
        m = tl.load(b_base + offs_i[:, None] * s_br + j[None, :] * s_bc, mask=mask, other=0.0).to(ACC)
        m += tl.load(b_base + j[None, :] * s_br + offs_i[:, None] * s_bc, mask=mask, other=0.0).to(ACC)
        if HAS_A:
            a = tl.load(a_ptr + n * C * C + offs_i[:, None] * C + j[None, :], mask=mask, other=0.0)
            m -= 2.0 * a.to(ACC)
        if SCALE_M:
            m *= m_scale
        psi = tl.load(x_base + j.to(tl.int64)[:, None] * s_xc + offs_k[None, :] * s_xk,
                      mask=(j[:, None] < C) & k_ok[None, :], other=0.0)
        acc = tl.dot(m.to(x_ptr.dtype.element_ty), psi, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    scale = tl.load(scale_ptr).to(ACC)
    if SCALE_M:
        scale /= m_scale
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + n * s_on + offs_i.to(tl.int64)[:, None] * s_oc + offs_k[None, :] * s_ok, out,
             mask=i_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardPlan:
    """The forward of one (N, C, H, W) shape: G in BLOCK_C x BLOCK_C tiles, K = H*W in splits."""

    block_c: int
    block_k: int
    num_warps: int
    tiles: int                          # tiles per side of G (N_TILES)
    splits: int                         # programs per tile along K (1: one stage, no workspace)
    k_per_split: int                    # K per split: whole BLOCK_K chunks
    style: bool                         # style loss (else the Gram matrix)
    precision: str                      # tl.dot input_precision
    grid: tuple[int, int, int]          # _gram_tile_kernel: (tiles**2, splits, N)
    reduce_grid: tuple[int, int] | None  # _gram_reduce_kernel: (tiles**2, N) when splits > 1
    reduce_warps: int = 4


@dataclass(frozen=True)
class BackwardPlan:
    """The backward d psi = scale * M psi of one shape: BLOCK_M rows of M by BLOCK_K columns of psi."""

    block_m: int
    block_j: int
    block_k: int
    num_warps: int
    has_a: bool                         # M = B + B^T - 2A (style loss) or B + B^T (Gram)
    scale_m: bool                       # M scaled into range before the dot (fp16)
    precision: str
    grid: tuple[int, int, int]          # (cdiv(K, BLOCK_K), cdiv(C, BLOCK_M), N): no 65,535 limit on axis 0


def _forward_blocks(c: int, dtype: torch.dtype, facts: DeviceFacts) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_K, num_warps) of the forward tiles."""
    if not facts.compiled:  # interpreter: C = 40 has 2 x 2 tiles; few, long programs
        return pow2_block(c, 16, 32), 128, 4
    if dtype == torch.float64:
        return pow2_block(c, 16, 32), 16, 4
    if dtype == torch.float32:
        return pow2_block(c, 16, 64), 32, 4
    block_c = pow2_block(c, 16, 128)
    return block_c, 64, 8 if block_c == 128 else 4


def _backward_blocks(c: int, dtype: torch.dtype, facts: DeviceFacts) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_J, BLOCK_K, num_warps) of the backward tiles."""
    if not facts.compiled:
        return pow2_block(c, 16, 32), pow2_block(c, 16, 32), 256, 4
    if dtype == torch.float64:
        return pow2_block(c, 16, 32), pow2_block(c, 16, 32), 32, 4
    if dtype == torch.float32:
        return pow2_block(c, 16, 64), pow2_block(c, 16, 32), 64, 4
    return pow2_block(c, 16, 64), pow2_block(c, 16, 64), 128, 8


@functools.lru_cache(maxsize=1024)
def plan_forward(shape: tuple[int, int, int, int], dtype: torch.dtype, facts: DeviceFacts, *,
                 style: bool, tf32: bool, num_splits: int | None = None, block_c: int | None = None,
                 block_k: int | None = None) -> ForwardPlan:
    """The forward plan. ``num_splits`` forces the number of K splits (1: single stage),
    ``block_c``/``block_k`` the tile sizes (powers of two >= 16); None picks them from the shape
    and the device: S splits such that all tiles times S make about WAVES waves of programs,
    each split at least MIN_CHUNKS_PER_SPLIT chunks of BLOCK_K."""
    n, c, h, w = shape
    k = h * w
    cfg_c, cfg_k, num_warps = _forward_blocks(c, dtype, facts)
    block_c, block_k = block_c or cfg_c, block_k or cfg_k
    tiles = cdiv(c, block_c)
    if num_splits is None:
        want = cdiv(WAVES * facts.sms, n * tiles * (tiles + 1) // 2)
        num_splits = max(1, min(want, cdiv(k, block_k) // MIN_CHUNKS_PER_SPLIT))
    # Each split covers whole BLOCK_K chunks; drop splits that would be empty.
    k_per_split = cdiv(cdiv(k, block_k), max(1, num_splits)) * block_k
    splits = cdiv(k, k_per_split)
    return ForwardPlan(
        block_c=block_c, block_k=block_k, num_warps=num_warps, tiles=tiles, splits=splits,
        k_per_split=k_per_split, style=style, precision=dot_precision(dtype, tf32),
        grid=(tiles * tiles, splits, n), reduce_grid=(tiles * tiles, n) if splits > 1 else None)


@functools.lru_cache(maxsize=1024)
def plan_backward(shape: tuple[int, int, int, int], dtype: torch.dtype, facts: DeviceFacts, *,
                  has_a: bool, tf32: bool, block_m: int | None = None, block_j: int | None = None,
                  block_k: int | None = None) -> BackwardPlan:
    """The backward plan; ``block_*`` force the tile sizes (powers of two >= 16)."""
    n, c, h, w = shape
    cfg_m, cfg_j, cfg_k, num_warps = _backward_blocks(c, dtype, facts)
    block_m, block_j, block_k = block_m or cfg_m, block_j or cfg_j, block_k or cfg_k
    return BackwardPlan(
        block_m=block_m, block_j=block_j, block_k=block_k, num_warps=num_warps, has_a=has_a,
        scale_m=scales_m(dtype), precision=dot_precision(dtype, tf32),
        grid=(cdiv(h * w, block_k), cdiv(c, block_m), n))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def launch_forward(plan: ForwardPlan, x: torch.Tensor, target: torch.Tensor | None):
    """Gram matrix (target None) or style loss forward of ``plan``. Returns (G, partials or None)."""
    n, c, h, w = x.shape
    k = h * w
    acc = acc_dtype(x.dtype)
    x, (s_xn, s_xc, s_xk) = walkable(x)  # psi[n, c, k] at n s_xn + c s_xc + k s_xk
    style = plan.style
    gram = torch.empty((n, c, c), device=x.device, dtype=acc if style else x.dtype)
    if style:
        parts = torch.zeros((n, plan.tiles * plan.tiles), device=x.device, dtype=acc)
        t = target.expand(n, c, c)  # a (C, C) target broadcasts with batch stride 0
        s_tn, s_tr, s_tc = t.stride()
    else:
        parts = t = gram  # unused pointers
        s_tn = s_tr = s_tc = 0
    split = plan.splits > 1
    ws = torch.empty((n, plan.splits, c, c), device=x.device, dtype=acc) if split else gram
    common = dict(BLOCK_C=plan.block_c, N_TILES=plan.tiles, STYLE=style, ACC=tl_dtype(acc))
    launch(_gram_tile_kernel, plan.grid,
           x, ws, gram, t, parts, c, k, c * k, plan.k_per_split, s_xn, s_xc, s_xk, s_tn, s_tr, s_tc,
           BLOCK_K=plan.block_k, SPLIT=split, PRECISION=plan.precision, num_warps=plan.num_warps, **common)
    if split:
        launch(_gram_reduce_kernel, plan.reduce_grid,
               ws, gram, t, parts, c, plan.splits, c * k, s_tn, s_tr, s_tc, num_warps=plan.reduce_warps, **common)
    return gram, (parts if style else None)


def _forward_plan(x: torch.Tensor, style: bool, num_splits, block_c, block_k) -> ForwardPlan:
    facts = device_facts(x.device)
    return plan_forward(tuple(x.shape), x.dtype, facts, style=style, tf32=tf32_allowed(facts),
                        num_splits=num_splits, block_c=block_c, block_k=block_k)


def gram_forward(x: torch.Tensor, *, num_splits: int | None = None, block_c: int | None = None,
                 block_k: int | None = None) -> torch.Tensor:
    """x (N, C, H, W) -> G (N, C, C) in x's dtype (the overrides: see :func:`plan_forward`)."""
    return launch_forward(_forward_plan(x, False, num_splits, block_c, block_k), x, None)[0]


def style_loss_forward(x: torch.Tensor, target: torch.Tensor, *, num_splits: int | None = None,
                       block_c: int | None = None, block_k: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C, H, W), target (C, C) or (N, C, C) -> (loss, G): the 0-d loss
    mean_n ||G[n] - T[n]||_F^2 and G (N, C, C), both in the accumulation dtype."""
    gram, parts = launch_forward(_forward_plan(x, True, num_splits, block_c, block_k), x, target)
    return parts.sum() / x.shape[0], gram


def scales_m(dtype: torch.dtype) -> bool:
    """Whether the backward scales M into range before the dot: fp16 only (bf16 has fp32's range)."""
    return dtype == torch.float16


def m_range_scale(b: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
    """Per image n, the power of two 2^-e (e >= 0, the least such) that brings max|M[n]|,
    M = B + B^T - 2A, to at most 2^14: M may leave the fp16 range (65504) where B and A do not.
    1 where M fits already, so its rounding is unchanged; (N,) in float32, computed on the device."""
    m = b.float() + b.transpose(1, 2).float()
    if a is not None:
        m -= 2 * a.float()
    peak = m.abs().amax(dim=(1, 2))
    return torch.exp2(-torch.ceil(torch.log2(peak / 2.0**14)).clamp_min(0))


def launch_backward(plan: BackwardPlan, x: torch.Tensor, b: torch.Tensor, a: torch.Tensor | None,
                    scale: torch.Tensor) -> torch.Tensor:
    """d x = scale * M psi of ``plan`` (A given exactly when ``plan.has_a``), in x's dtype and layout."""
    n, c, h, w = x.shape
    k = h * w
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=natural_format(x))
    s_on, s_oc, s_ok = hw_strides(out)
    x, (s_xn, s_xc, s_xk) = walkable(x)  # psi[n, c, k] at n s_xn + c s_xc + k s_xk
    b = b.expand(n, c, c)  # a (C, C) target broadcasts with batch stride 0
    a = a.contiguous() if plan.has_a else b  # b: an unused pointer
    m_scale = m_range_scale(b, a if plan.has_a else None) if plan.scale_m else scale  # (else: unused)
    launch(_gram_backward_kernel, plan.grid,
           x, out, b, a, scale, m_scale, c, k, s_xn, s_xc, s_xk, s_on, s_oc, s_ok, *b.stride(),
           BLOCK_M=plan.block_m, BLOCK_J=plan.block_j, BLOCK_K=plan.block_k, HAS_A=plan.has_a,
           SCALE_M=plan.scale_m, ACC=tl_dtype(acc_dtype(x.dtype)), PRECISION=plan.precision,
           num_warps=plan.num_warps)
    return out


def _backward_plan(x: torch.Tensor, has_a: bool, block_m, block_j, block_k) -> BackwardPlan:
    facts = device_facts(x.device)
    return plan_backward(tuple(x.shape), x.dtype, facts, has_a=has_a, tf32=tf32_allowed(facts),
                         block_m=block_m, block_j=block_j, block_k=block_k)


def gram_backward(grad: torch.Tensor, x: torch.Tensor, *, block_m: int | None = None,
                  block_j: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """grad = dL/dG (N, C, C) -> d x = (dG + dG^T) psi / (CHW), in x's dtype and layout."""
    n, c, h, w = x.shape
    scale = torch.full((1,), 1.0 / (c * h * w), device=x.device, dtype=acc_dtype(x.dtype))
    return launch_backward(_backward_plan(x, False, block_m, block_j, block_k), x, grad, None, scale)


def style_loss_backward(grad: torch.Tensor, x: torch.Tensor, target: torch.Tensor, gram: torch.Tensor,
                        *, block_m: int | None = None, block_j: int | None = None,
                        block_k: int | None = None) -> torch.Tensor:
    """grad: 0-d upstream gradient, gram: the forward's G (N, C, C) ->
    d x = g * 2/(N CHW) * (2G - T - T^T) psi, in x's dtype and layout."""
    n, c, h, w = x.shape
    scale = (grad.to(acc_dtype(x.dtype)) * (-2.0 / (n * c * h * w))).reshape(1)
    return launch_backward(_backward_plan(x, True, block_m, block_j, block_k), x, target, gram, scale)
