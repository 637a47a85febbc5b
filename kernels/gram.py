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

tl.dot precision for fp32 inputs: "tf32" when torch.backends.cuda.matmul.allow_tf32 is set,
else "ieee"; fp64 always "ieee".
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, cdiv, tl_dtype

# Programs to aim for when splitting K: about two waves of the GPU. The interpreter has no
# SMs; pretending a few makes tall shapes split on the CPU too, so the tests exercise it.
_WAVES = 2
_INTERPRETER_SMS = 4
# A split covers at least this many BLOCK_K chunks (less would be mostly workspace traffic).
_MIN_CHUNKS_PER_SPLIT = 4


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
# Launch configuration
# ----------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _pow2_block(c: int, cap: int) -> int:
    """The power of two covering c, between 16 (the smallest tl.dot) and cap."""
    return max(16, min(cap, triton.next_power_of_2(c)))


def _forward_config(c: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_K, num_warps) of the forward tiles."""
    if device.type != "cuda":  # interpreter: C = 40 has 2 x 2 tiles; few, long programs
        return _pow2_block(c, 32), 128, 4
    if dtype == torch.float64:
        return _pow2_block(c, 32), 16, 4
    if dtype == torch.float32:
        return _pow2_block(c, 64), 32, 4
    block_c = _pow2_block(c, 128)
    return block_c, 64, 8 if block_c == 128 else 4


def _backward_config(c: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_J, BLOCK_K, num_warps) of the backward tiles."""
    if device.type != "cuda":
        return _pow2_block(c, 32), _pow2_block(c, 32), 256, 4
    if dtype == torch.float64:
        return _pow2_block(c, 32), _pow2_block(c, 32), 32, 4
    if dtype == torch.float32:
        return _pow2_block(c, 64), _pow2_block(c, 32), 64, 4
    return _pow2_block(c, 64), _pow2_block(c, 64), 128, 8


def _num_splits(tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """S such that tiles * S is about _WAVES waves, each split >= _MIN_CHUNKS_PER_SPLIT chunks."""
    want = cdiv(_WAVES * _sm_count(device), tiles)
    return max(1, min(want, cdiv(k, block_k) // _MIN_CHUNKS_PER_SPLIT))


def _psi_strides(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(x, stride_n, stride_c, stride_k) with psi[n, c, k] at n*stride_n + c*stride_c + k*stride_k.

    Needs (H, W) to flatten with one stride (NCHW-contiguous: stride_k = 1, channels_last:
    stride_c = 1, stride_k = C, and many slices); x is made contiguous otherwise.
    """
    _, _, h, w = x.shape
    s_n, s_c, s_h, s_w = x.stride()
    if w == 1:
        return x, s_n, s_c, s_h
    if h == 1 or s_h == w * s_w:
        return x, s_n, s_c, s_w
    x = x.contiguous()
    return x, x.stride(0), x.stride(1), 1


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _gram_launch(x: torch.Tensor, target: torch.Tensor | None, num_splits: int | None,
                 block_c: int | None, block_k: int | None):
    """Gram matrix (target None) or style loss forward. Returns (G, partials or None)."""
    n, c, h, w = x.shape
    k = h * w
    acc = acc_dtype(x.dtype)
    cfg_c, cfg_k, num_warps = _forward_config(c, x.dtype, x.device)
    block_c, block_k = block_c or cfg_c, block_k or cfg_k
    tiles = cdiv(c, block_c)
    if num_splits is None:
        num_splits = _num_splits(n * tiles * (tiles + 1) // 2, k, block_k, x.device)
    # Each split covers whole BLOCK_K chunks; drop splits that would be empty.
    k_per_split = cdiv(cdiv(k, block_k), max(1, num_splits)) * block_k
    splits = cdiv(k, k_per_split)

    x, s_xn, s_xc, s_xk = _psi_strides(x)
    style = target is not None
    gram = torch.empty((n, c, c), device=x.device, dtype=acc if style else x.dtype)
    if style:
        parts = torch.zeros((n, tiles * tiles), device=x.device, dtype=acc)
        t = target.expand(n, c, c)  # a (C, C) target broadcasts with batch stride 0
        s_tn, s_tr, s_tc = t.stride()
    else:
        parts = t = gram  # unused pointers
        s_tn = s_tr = s_tc = 0
    ws = torch.empty((n, splits, c, c), device=x.device, dtype=acc) if splits > 1 else gram
    common = dict(BLOCK_C=block_c, N_TILES=tiles, STYLE=style, ACC=tl_dtype(acc))
    _gram_tile_kernel[(tiles * tiles, splits, n)](
        x, ws, gram, t, parts, c, k, c * k, k_per_split, s_xn, s_xc, s_xk, s_tn, s_tr, s_tc,
        BLOCK_K=block_k, SPLIT=splits > 1, PRECISION=_precision(x.dtype), num_warps=num_warps,
        **common,
    )
    if splits > 1:
        _gram_reduce_kernel[(tiles * tiles, n)](
            ws, gram, t, parts, c, splits, c * k, s_tn, s_tr, s_tc, num_warps=4, **common
        )
    return gram, (parts if style else None)


def gram_forward(x: torch.Tensor, *, num_splits: int | None = None, block_c: int | None = None,
                 block_k: int | None = None) -> torch.Tensor:
    """x (N, C, H, W) -> G (N, C, C) in x's dtype.

    ``num_splits`` forces the number of K splits (1: single stage), ``block_c``/``block_k``
    the tile sizes (powers of two >= 16); None picks them from the shape and the device.
    """
    return _gram_launch(x, None, num_splits, block_c, block_k)[0]


def style_loss_forward(x: torch.Tensor, target: torch.Tensor, *, num_splits: int | None = None,
                       block_c: int | None = None, block_k: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C, H, W), target (C, C) or (N, C, C) -> (loss, G): the 0-d loss
    mean_n ||G[n] - T[n]||_F^2 and G (N, C, C), both in the accumulation dtype."""
    gram, parts = _gram_launch(x, target, num_splits, block_c, block_k)
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


def _backward_launch(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor | None, scale: torch.Tensor,
                     block_m: int | None, block_j: int | None, block_k: int | None) -> torch.Tensor:
    n, c, h, w = x.shape
    k = h * w
    acc = acc_dtype(x.dtype)
    cfg_m, cfg_j, cfg_k, num_warps = _backward_config(c, x.dtype, x.device)
    block_m, block_j, block_k = block_m or cfg_m, block_j or cfg_j, block_k or cfg_k
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _, s_on, s_oc, s_ok = _psi_strides(out)
    x, s_xn, s_xc, s_xk = _psi_strides(x)
    b = b.expand(n, c, c)  # a (C, C) target broadcasts with batch stride 0
    has_a = a is not None
    a = a.contiguous() if has_a else b  # b: an unused pointer
    scale_m = scales_m(x.dtype)
    m_scale = m_range_scale(b, a if has_a else None) if scale_m else scale  # (else: unused)
    _gram_backward_kernel[(cdiv(k, block_k), cdiv(c, block_m), n)](  # K blocks on axis 0: no 65,535 limit
        x, out, b, a, scale, m_scale, c, k, s_xn, s_xc, s_xk, s_on, s_oc, s_ok, *b.stride(),
        BLOCK_M=block_m, BLOCK_J=block_j, BLOCK_K=block_k, HAS_A=has_a, SCALE_M=scale_m,
        ACC=tl_dtype(acc), PRECISION=_precision(x.dtype), num_warps=num_warps,
    )
    return out


def gram_backward(grad: torch.Tensor, x: torch.Tensor, *, block_m: int | None = None,
                  block_j: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """grad = dL/dG (N, C, C) -> d x = (dG + dG^T) psi / (CHW), in x's dtype and layout."""
    n, c, h, w = x.shape
    scale = torch.full((1,), 1.0 / (c * h * w), device=x.device, dtype=acc_dtype(x.dtype))
    return _backward_launch(x, grad, None, scale, block_m, block_j, block_k)


def style_loss_backward(grad: torch.Tensor, x: torch.Tensor, target: torch.Tensor, gram: torch.Tensor,
                        *, block_m: int | None = None, block_j: int | None = None,
                        block_k: int | None = None) -> torch.Tensor:
    """grad: 0-d upstream gradient, gram: the forward's G (N, C, C) ->
    d x = g * 2/(N CHW) * (2G - T - T^T) psi, in x's dtype and layout."""
    n, c, h, w = x.shape
    scale = (grad.to(acc_dtype(x.dtype)) * (-2.0 / (n * c * h * w))).reshape(1)
    return _backward_launch(x, target, gram, scale, block_m, block_j, block_k)
