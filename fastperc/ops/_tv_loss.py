"""``tv_loss(x, p=2, reduction="mean")``: the total-variation regulariser as a custom op.

    tv[n] = sum_{c,i,j} |x[n,c,i+1,j] - x[n,c,i,j]|^p + |x[n,c,i,j+1] - x[n,c,i,j]|^p

x: (N, C, H, W); p in {1, 2}; reduction "none" -> tv (N,), "sum" -> sum_n tv[n], "mean" ->
mean_n tv[n]. Returns float32 (float64 for float64 inputs).
Backward: dx = g_n * (phi'(dh[i-1,j]) - phi'(dh[i,j]) + phi'(dw[i,j-1]) - phi'(dw[i,j])) with
phi'(d) = 2 d (p = 2) or sign(d) (p = 1; sign(0) = 0, as torch.abs's gradient), differences
outside the image 0, and g_n = grad[n] ("none"), grad ("sum") or grad / N ("mean"); dx has
x's dtype and memory format.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastperc import cuda_backend, reference
from fastperc._checks import check_choice, check_image
from fastperc.backends import resolve_backend
from fastperc.ops._dispatch import BackendTable, triton_kernel
from fastperc.rules import acc_dtype
from fastperc.torch_backend import tv_loss as torch_impl

REDUCTIONS = ("none", "sum", "mean")

_forward = BackendTable(
    "tv_loss",
    reference=reference.tv_loss,
    torch=torch_impl.tv_loss_forward,
    triton=triton_kernel("tv_loss", "tv_loss_forward"),
    cuda=cuda_backend.tv_loss_forward,
)
_backward = BackendTable(
    "tv_loss_backward",
    reference=reference.tv_loss_backward,
    torch=torch_impl.tv_loss_backward,
    triton=triton_kernel("tv_loss", "tv_loss_backward"),
    cuda=cuda_backend.tv_loss_backward,
)


@torch.library.custom_op("fastperc::tv_loss", mutates_args=())
def tv_loss_op(x: Tensor, p: int, reduction: str, backend: str) -> Tensor:
    return _forward(backend, x, p, reduction)


@tv_loss_op.register_fake
def _(x: Tensor, p: int, reduction: str, backend: str) -> Tensor:
    shape = (x.shape[0],) if reduction == "none" else ()
    return x.new_empty(shape, dtype=acc_dtype(x.dtype))


@torch.library.custom_op("fastperc::tv_loss_backward", mutates_args=())
def tv_loss_backward_op(grad: Tensor, x: Tensor, p: int, reduction: str, backend: str) -> Tensor:
    """d tv_loss / d x; grad is (N,) for reduction "none", else 0-d."""
    return _backward(backend, grad, x, p, reduction)


@tv_loss_backward_op.register_fake
def _(grad: Tensor, x: Tensor, p: int, reduction: str, backend: str) -> Tensor:
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, p, reduction, backend = inputs
    ctx.save_for_backward(x)
    ctx.p, ctx.reduction, ctx.backend = p, reduction, backend


def _backward_formula(ctx, grad):
    (x,) = ctx.saved_tensors
    return tv_loss_backward_op(grad, x, ctx.p, ctx.reduction, ctx.backend), None, None, None


tv_loss_op.register_autograd(_backward_formula, setup_context=_setup_context)


def tv_loss(x: Tensor, p: int = 2, reduction: str = "mean", *, backend: str | None = None) -> Tensor:
    """Total variation: per image, the sum over neighbouring pixels of |difference|^p.

        tv[n] = sum_{c,i,j} |x[n,c,i+1,j] - x[n,c,i,j]|^p + |x[n,c,i,j+1] - x[n,c,i,j]|^p

    Args:
        x: (N, C, H, W) floating-point images or features (any memory format). An image with
            H = W = 1 has no neighbours: its tv is 0, and so is its gradient.
        p: the exponent, the Python int 1 or 2 (not a float such as 2.0, not a bool). For
            p = 1 the gradient of |d| at d = 0 is 0, as torch.abs's.
        reduction: "none" (tv per image, shape (N,)), "sum" (over the batch) or "mean" (over
            the batch, the default).
        backend: force a backend (see :mod:`fastperc.backends`).
    Returns:
        float32 (float64 for float64 x): (N,) for "none", else 0-d.
    Raises:
        TypeError: x is not a floating-point tensor.
        ValueError: x is not a non-empty 4-D tensor; p is not the int 1 or 2; reduction is
            unknown; the backend cannot run.
    """
    check_image(x, "x")
    if type(p) is not int or p not in (1, 2):
        raise ValueError(f"p: expected the int 1 or 2, got {p!r} ({type(p).__name__})")
    check_choice(reduction, "reduction", REDUCTIONS)
    return tv_loss_op(x, p, reduction, resolve_backend(backend, x.device))
