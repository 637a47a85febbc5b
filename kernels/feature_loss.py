"""Feature loss: sum((a - b)^2) / numel, forward and backward.

Forward: one read of a and b; each program writes one fp32 partial sum, the partials are
summed by a second, fixed-order stage (deterministic, no atomics). Bytes: 2 * numel * itemsize.
Backward: one read of a and b, one write of d a = 2 (a - b) g / numel. Bytes: 3 * numel * itemsize.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastperc.rules import acc_dtype, cdiv

from .common import as_same_dense, flat_view, launch

BLOCK = 4096


@dataclass(frozen=True)
class Plan:
    """Both kernels walk the flat tensors in blocks of BLOCK elements, one program each."""

    block: int
    grid: tuple[int]


def plan(numel: int) -> Plan:
    return Plan(block=BLOCK, grid=(cdiv(numel, BLOCK),))


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


def launch_forward(pl: Plan, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = as_same_dense(a, b)
    numel = a.numel()
    partials = torch.empty(pl.grid[0], device=a.device, dtype=acc_dtype(a.dtype))
    launch(_sq_diff_partial_kernel, pl.grid, flat_view(a), flat_view(b), partials, numel, BLOCK=pl.block)
    return partials.sum() / numel


def launch_backward(pl: Plan, grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(a)
    a_dense, b_dense = as_same_dense(a, b)
    numel = a.numel()
    scale = (grad.to(acc_dtype(a.dtype)) * (2.0 / numel)).reshape(1)
    result = out if a_dense.stride() == out.stride() else torch.empty_like(a_dense)
    launch(_diff_grad_kernel, pl.grid,
           flat_view(a_dense), flat_view(b_dense), scale, flat_view(result), numel, BLOCK=pl.block)
    return out if result is out else out.copy_(result)


def feature_loss_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b: (N, C, H, W) of one dtype -> 0-d loss in the accumulation dtype."""
    return launch_forward(plan(a.numel()), a, b)


def feature_loss_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """grad: 0-d upstream gradient -> d loss / d a, laid out as torch.empty_like(a) (the op's
    fake implementation promises that layout)."""
    return launch_backward(plan(a.numel()), grad, a, b)
