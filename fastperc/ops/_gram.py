"""``gram(x)`` and ``style_loss(x, target)``: the Gram matrix (paper eq. 3) and the style
reconstruction loss (paper eq. 4) as custom ops.

    G[n] = psi psi^T / (C H W),  psi = x[n] as C x HW          (N, C, C) in x's dtype
    loss = mean_n || G[n] - T[n] ||_F^2                         0-d float32 (float64 for float64 x)

Backward: d psi = (dG + dG^T) psi / (C H W) for the Gram matrix and
d psi = g * 2/(N C H W) * (2G - T - T^T) psi for the style loss; d T = -2 g (G - T) / N,
summed over the batch for a broadcast (C, C) target.

Design: ``fastperc::style_loss`` returns ``(loss, gram)``, the Gram matrix in the loss dtype
that the fused forward forms anyway. It is marked non-differentiable and saved for the
backward, which therefore never recomputes it (the x gradient reads it to form 2G - T - T^T,
the target gradient is a C x C expression of it); the public wrapper returns the loss alone.
The x gradients are laid out like x (channels_last in, channels_last out; see
:func:`fastperc.rules.natural_format`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastperc import reference
from fastperc._checks import check_image, check_same_device, check_tensor
from fastperc.backends import resolve_backend
from fastperc.ops._dispatch import BackendTable, triton_kernel
from fastperc.rules import acc_dtype, natural_format
from fastperc.torch_backend import gram as torch_impl


def _reference_style_loss(x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    return reference.style_loss(x, target), reference.gram(x.to(acc_dtype(x.dtype)))


def _reference_style_loss_backward(grad: Tensor, x: Tensor, target: Tensor, gram: Tensor) -> Tensor:
    return reference.style_loss_backward(grad, x, target)  # the spec recomputes G


_gram_forward = BackendTable(
    "gram",
    reference=reference.gram,
    torch=torch_impl.gram_forward,
    triton=triton_kernel("gram", "gram_forward"),
)
_gram_backward = BackendTable(
    "gram_backward",
    reference=reference.gram_backward,
    torch=torch_impl.gram_backward,
    triton=triton_kernel("gram", "gram_backward"),
)
_style_forward = BackendTable(
    "style_loss",
    reference=_reference_style_loss,
    torch=torch_impl.style_loss_forward,
    triton=triton_kernel("gram", "style_loss_forward"),
)
_style_backward = BackendTable(
    "style_loss_backward",
    reference=_reference_style_loss_backward,
    torch=torch_impl.style_loss_backward,
    triton=triton_kernel("gram", "style_loss_backward"),
)


def _empty_grad(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=natural_format(x))


# ---------------------------------------------------------------------------------------- gram


@torch.library.custom_op("fastperc::gram", mutates_args=())
def gram_op(x: Tensor, backend: str) -> Tensor:
    return _gram_forward(backend, x)


@gram_op.register_fake
def _(x: Tensor, backend: str) -> Tensor:
    n, c = x.shape[:2]
    return x.new_empty((n, c, c))


@torch.library.custom_op("fastperc::gram_backward", mutates_args=())
def gram_backward_op(grad: Tensor, x: Tensor, backend: str) -> Tensor:
    return _gram_backward(backend, grad, x).contiguous(memory_format=natural_format(x))


@gram_backward_op.register_fake
def _(grad: Tensor, x: Tensor, backend: str) -> Tensor:
    return _empty_grad(x)


def _gram_setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x)
    ctx.backend = backend


def _gram_backward_formula(ctx, grad):
    (x,) = ctx.saved_tensors
    return gram_backward_op(grad, x, ctx.backend), None


gram_op.register_autograd(_gram_backward_formula, setup_context=_gram_setup_context)


# ---------------------------------------------------------------------------------- style loss


@torch.library.custom_op("fastperc::style_loss", mutates_args=())
def style_loss_op(x: Tensor, target: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(loss, gram): gram is G(x) in the loss dtype, kept for the backward."""
    return _style_forward(backend, x, target)


@style_loss_op.register_fake
def _(x: Tensor, target: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    n, c = x.shape[:2]
    dtype = acc_dtype(x.dtype)
    return x.new_empty((), dtype=dtype), x.new_empty((n, c, c), dtype=dtype)


@torch.library.custom_op("fastperc::style_loss_backward", mutates_args=())
def style_loss_backward_op(grad: Tensor, x: Tensor, target: Tensor, gram: Tensor, backend: str) -> Tensor:
    """The gradient with respect to x; ``gram`` is the forward's Gram matrix."""
    return _style_backward(backend, grad, x, target, gram).contiguous(memory_format=natural_format(x))


@style_loss_backward_op.register_fake
def _(grad: Tensor, x: Tensor, target: Tensor, gram: Tensor, backend: str) -> Tensor:
    return _empty_grad(x)


def _style_setup_context(ctx, inputs, output):
    x, target, backend = inputs
    _, gram = output
    ctx.mark_non_differentiable(gram)
    ctx.save_for_backward(x, target, gram)
    ctx.backend = backend


def _style_backward_formula(ctx, grad, _grad_gram):
    x, target, gram = ctx.saved_tensors
    grad_x = grad_t = None
    if ctx.needs_input_grad[0]:
        grad_x = style_loss_backward_op(grad, x, target, gram, ctx.backend)
    if ctx.needs_input_grad[1]:
        # d T[n] = -2 g (G[n] - T[n]) / N, summed over n for a broadcast (C, C) target.
        diff = gram - target.to(gram.dtype)
        grad_t = (diff.sum(0) if target.dim() == 2 else diff) * (-2.0 / x.shape[0] * grad)
        grad_t = grad_t.to(target.dtype)
    return grad_x, grad_t, None


style_loss_op.register_autograd(_style_backward_formula, setup_context=_style_setup_context)


# ------------------------------------------------------------------------------ public wrappers


def gram(x: Tensor, *, backend: str | None = None) -> Tensor:
    """Gram matrix of each image's features (paper eq. 3).

    Args:
        x: (N, C, H, W) features (any memory format), float16/bfloat16/float32/float64.
        backend: force a backend (see :mod:`fastperc.backends`).
    Returns:
        G (N, C, C) in x's dtype, ``G[n] = psi psi^T / (C H W)`` with psi = x[n] as C x HW,
        accumulated in fp32 with the 1/(CHW) scale applied before the cast (no fp16 overflow).
    """
    check_image(x, "x")
    return gram_op(x, resolve_backend(backend, x.device))


def style_loss(x: Tensor, target: Tensor, *, backend: str | None = None) -> Tensor:
    """Style reconstruction loss (paper eq. 4): ``mean_n ||gram(x)[n] - target[n]||_F^2``.

    Args:
        x: (N, C, H, W) features (any memory format), float16/bfloat16/float32/float64.
        target: target Gram matrix, (C, C) (broadcast over the batch) or (N, C, C), any float
            dtype, symmetric or not, on x's device. Differentiable too.
        backend: force a backend (see :mod:`fastperc.backends`).
    Returns:
        A 0-d tensor, float32 (float64 for float64 x); the Gram matrix is formed in that dtype.
    """
    check_image(x, "x")
    check_tensor(target, "target", ndim=(2, 3))
    n, c = x.shape[:2]
    if tuple(target.shape) not in ((c, c), (n, c, c)):
        raise ValueError(
            f"target: expected shape ({c}, {c}) or ({n}, {c}, {c}) for x of shape {tuple(x.shape)}, "
            f"got {tuple(target.shape)}"
        )
    check_same_device(x, "x", target, "target")
    return style_loss_op(x, target, resolve_backend(backend, x.device))[0]
