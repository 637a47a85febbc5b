"""Feature loss: sum((a - b)^2) / numel, forward and backward.

Forward: one read of a and b; each program writes one fp32 partial sum, the partials are
summed by a second, fixed-order stage (deterministic, no atomics). Bytes: 2 * numel * itemsize.
Backward: one read of a and b, one write of d a = 2 (a - b) g / numel. Bytes: 3 * numel * itemsize.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, as_same_dense, cdiv, flat_view

BLOCK = 4096


@triton.jit
def _sq_diff_partial_kernel(a_ptr, b_ptr, partial_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc_ty = partial_ptr.dtype.element_ty
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    d = a - b
    tl.store(partial_ptr + pid, tl.sum(d * d, axis=0))


@triton.jit
def _diff_grad_kernel(a_ptr, b_ptr, scale_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    scale = tl.load(scale_ptr)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(scale.dtype)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(scale.dtype)
    tl.store(out_ptr + offs, ((a - b) * scale).to(out_ptr.dtype.element_ty), mask=mask)


def feature_loss_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b: (N, C, H, W) of one dtype -> 0-d loss in the accumulation dtype."""
    a, b = as_same_dense(a, b)
    numel = a.numel()
    grid = (cdiv(numel, BLOCK),)
    partials = torch.empty(grid[0], device=a.device, dtype=acc_dtype(a.dtype))
    _sq_diff_partial_kernel[grid](flat_view(a), flat_view(b), partials, numel, BLOCK=BLOCK)
    return partials.sum() / numel


def feature_loss_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """grad: 0-d upstream gradient -> d loss / d a, laid out as torch.empty_like(a) (the op's
    fake implementation promises that layout)."""
    out = torch.empty_like(a)
    a_dense, b_dense = as_same_dense(a, b)
    numel = a.numel()
    scale = (grad.to(acc_dtype(a.dtype)) * (2.0 / numel)).reshape(1)
    result = out if a_dense.stride() == out.stride() else torch.empty_like(a_dense)
    _diff_grad_kernel[(cdiv(numel, BLOCK),)](
        flat_view(a_dense), flat_view(b_dense), scale, flat_view(result), numel, BLOCK=BLOCK
    )
    return out if result is out else out.copy_(result)
