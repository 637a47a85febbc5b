"""``feature_loss(a, b)``: the feature reconstruction loss (paper eq. 2) as a custom op.

    loss = mean_n || a[n] - b[n] ||^2 / (C H W) = sum((a - b)^2) / (N C H W)

a, b: (N, C, H, W) of one dtype; returns a 0-d float32 tensor (float64 for float64 inputs).
Backward: d a = 2 (a - b) g / (N C H W), d b = -d a.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastperc import reference
from fastperc._checks import check_image, check_same_device, check_same_shape
from fastperc.backends import resolve_backend
from fastperc.ops._dispatch import BackendTable, triton_kernel
from fastperc.rules import acc_dtype
from fastperc.torch_backend import feature_loss as torch_impl

_forward = BackendTable(
    "feature_loss",
    reference=reference.feature_loss,
    torch=torch_impl.feature_loss_forward,
    triton=triton_kernel("feature_loss", "feature_loss_forward"),
)
_backward = BackendTable(
    "feature_loss_backward",
    reference=reference.feature_loss_backward,
    torch=torch_impl.feature_loss_backward,
    triton=triton_kernel("feature_loss", "feature_loss_backward"),
)


@torch.library.custom_op("fastperc::feature_loss", mutates_args=())
def feature_loss_op(a: Tensor, b: Tensor, backend: str) -> Tensor:
    return _forward(backend, a, b)


@feature_loss_op.register_fake
def _(a: Tensor, b: Tensor, backend: str) -> Tensor:
    return a.new_empty((), dtype=acc_dtype(a.dtype))


@torch.library.custom_op("fastperc::feature_loss_backward", mutates_args=())
def feature_loss_backward_op(grad: Tensor, a: Tensor, b: Tensor, backend: str) -> Tensor:
    """The gradient with respect to ``a``; the one with respect to ``b`` is its negative."""
    return _backward(backend, grad, a, b)


@feature_loss_backward_op.register_fake
def _(grad: Tensor, a: Tensor, b: Tensor, backend: str) -> Tensor:
    return torch.empty_like(a)


def _setup_context(ctx, inputs, output):
    a, b, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.backend = backend


def _backward_formula(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = feature_loss_backward_op(grad, a, b, ctx.backend)
    grad_b = -grad_a if ctx.needs_input_grad[1] else None
    return (grad_a if ctx.needs_input_grad[0] else None), grad_b, None


feature_loss_op.register_autograd(_backward_formula, setup_context=_setup_context)


def feature_loss(a: Tensor, b: Tensor, *, backend: str | None = None) -> Tensor:
    """Feature reconstruction loss, ``sum((a - b)^2) / a.numel()`` (paper eq. 2, batch mean).

    Args:
        a, b: (N, C, H, W) features of one shape and dtype (any memory format); under
            autocast two float dtypes are promoted to the wider one.
        backend: force a backend (see :mod:`fastperc.backends`).
    Returns:
        A 0-d tensor, float32 (float64 for float64 inputs).
    """
    check_image(a, "a")
    check_image(b, "b")
    check_same_shape(a, "a", b, "b")
    check_same_device(a, "a", b, "b")
    if a.dtype != b.dtype:
        if not torch.is_autocast_enabled(a.device.type):
            raise TypeError(f"b: expected the dtype of a ({a.dtype}), got {b.dtype}")
        common = torch.promote_types(a.dtype, b.dtype)  # under autocast, as F.mse_loss
        a, b = a.to(common), b.to(common)
    return feature_loss_op(a, b, resolve_backend(backend, a.device))
