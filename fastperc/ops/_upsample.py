"""The upsampling convolutions as custom ops: ``upsample_conv2d`` and ``conv_transpose2d``.

    upsample_conv2d(x, weight, bias=None)
        = F.conv2d(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (1, 1, 1, 1),
                         mode="reflect"), weight, bias),            weight (C_out, C_in, 3, 3)
    conv_transpose2d(x, weight, bias=None)
        = F.conv_transpose2d(x, weight, bias, stride=2, padding=1, output_padding=1),
                                                                    weight (C_in, C_out, 3, 3)

x: (N, C_in, H, W) -> (N, C_out, 2H, 2W) in x's dtype, channels_last when x is. Both are
computed on the low-resolution grid, one small convolution per output phase
(fastperc.torch_backend.upsample explains the decomposition). Backward: dx, dweight, dbias,
by one custom op per family that computes only the gradients asked for.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastperc import reference
from fastperc._checks import check_image, check_same_device, check_tensor
from fastperc.backends import resolve_backend
from fastperc.ops._dispatch import BackendTable, triton_kernel
from fastperc.rules import natural_format
from fastperc.torch_backend import upsample as torch_impl

_TABLES = {
    name: (
        BackendTable(name, reference=getattr(reference, f"{name}_forward"),
                     torch=getattr(torch_impl, f"{name}_forward"),
                     triton=triton_kernel("upsample_conv", f"{name}_forward")),
        BackendTable(f"{name}_backward", reference=getattr(reference, f"{name}_backward"),
                     torch=getattr(torch_impl, f"{name}_backward"),
                     triton=triton_kernel("upsample_conv", f"{name}_backward")),
    )
    for name in ("upsample_conv2d", "conv_transpose2d")
}


def _output(x: Tensor, out_channels: int) -> Tensor:
    n, _, h, w = x.shape
    return torch.empty((n, out_channels, 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                       memory_format=natural_format(x))


def _empty(t: Tensor) -> Tensor:
    return t.new_empty((0,))


def _laid_out(t: Tensor, like: Tensor) -> Tensor:
    """A backend's result in the layout the op promises (a no-op when it already is)."""
    return t.contiguous(memory_format=natural_format(like))


def _define(name: str, out_channels_dim: int):
    """Register the forward and backward custom ops of ``name`` and its autograd formula."""
    forward_table, backward_table = _TABLES[name]

    @torch.library.custom_op(f"fastperc::{name}", mutates_args=())
    def forward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
        return _laid_out(forward_table(backend, x, weight, bias), x)

    @forward_op.register_fake
    def _(x, weight, bias, backend):
        return _output(x, weight.shape[out_channels_dim])

    @torch.library.custom_op(f"fastperc::{name}_backward", mutates_args=())
    def backward_op(grad: Tensor, x: Tensor, weight: Tensor, backend: str, needs_x: bool,
                    needs_weight: bool, needs_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(dx, dweight, dbias); a gradient not asked for is an empty (0,) tensor."""
        dx, dw, db = backward_table(backend, grad, x, weight, needs_x, needs_weight, needs_bias)
        return (_laid_out(dx, x) if needs_x else _empty(x),
                dw.contiguous() if needs_weight else _empty(weight),
                db.contiguous() if needs_bias else _empty(weight))

    @backward_op.register_fake
    def _(grad, x, weight, backend, needs_x, needs_weight, needs_bias):
        return (torch.empty_like(x, memory_format=natural_format(x)) if needs_x else _empty(x),
                torch.empty_like(weight, memory_format=torch.contiguous_format) if needs_weight else _empty(weight),
                weight.new_empty((weight.shape[out_channels_dim],)) if needs_bias else _empty(weight))

    def setup_context(ctx, inputs, output):
        x, weight, bias, backend = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.backend = backend

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        needs_bias = needs_bias and ctx.has_bias
        dx, dw, db = backward_op(grad, x, weight, ctx.backend, needs_x, needs_weight, needs_bias)
        return (dx if needs_x else None, dw if needs_weight else None,
                db if needs_bias else None, None)

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op, backward_op


upsample_conv2d_op, upsample_conv2d_backward_op = _define("upsample_conv2d", 0)
conv_transpose2d_op, conv_transpose2d_backward_op = _define("conv_transpose2d", 1)


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast, floating-point inputs (not float64) in the autocast dtype, as F.conv2d."""
    device = tensors[0].device.type if isinstance(tensors[0], Tensor) else None
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def _check(x, weight, bias, *, in_dim: int, out_dim: int, layout: str) -> None:
    check_image(x, "x")
    check_tensor(weight, "weight", ndim=4)
    if tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight: expected a 3x3 kernel {layout}, got shape {tuple(weight.shape)}")
    if weight.shape[in_dim] != x.shape[1]:
        raise ValueError(f"weight: expected {x.shape[1]} input channels (x is {tuple(x.shape)}) in "
                         f"dimension {in_dim} of {layout}, got shape {tuple(weight.shape)}")
    if weight.shape[out_dim] == 0:
        raise ValueError(f"weight: expected at least one output channel, got shape {tuple(weight.shape)}")
    check_same_device(x, "x", weight, "weight")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected the dtype of x ({x.dtype}), got {weight.dtype}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != weight.shape[out_dim]:
            raise ValueError(f"bias: expected shape ({weight.shape[out_dim]},) (the output channels), "
                             f"got {tuple(bias.shape)}")
        check_same_device(x, "x", bias, "bias")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: expected the dtype of x ({x.dtype}), got {bias.dtype}")


def upsample_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                    backend: str | None = None) -> Tensor:
    """Nearest-neighbour x2 upsampling, reflection padding 1, then a 3x3 convolution
    (pytorch/examples' ``UpsampleConvLayer(..., kernel_size=3, upsample=2)``), without ever
    building the upsampled tensor: four 2x2 convolutions on the input, 4/9 of the work.

    Args:
        x: (N, C_in, H, W), any memory format.
        weight: (C_out, C_in, 3, 3), as ``nn.Conv2d``; bias: (C_out,) or None.
        backend: force a backend (see :mod:`fastperc.backends`).
    Returns:
        (N, C_out, 2H, 2W) in x's dtype (channels_last when x is).
    """
    x, weight, bias = _autocast(x, weight, bias)
    _check(x, weight, bias, in_dim=1, out_dim=0, layout="(C_out, C_in, 3, 3)")
    return upsample_conv2d_op(x, weight, bias, resolve_backend(backend, x.device))


def conv_transpose2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                     backend: str | None = None) -> Tensor:
    """The fractionally strided (transposed) 3x3 convolution with stride 2, padding 1 and
    output_padding 1 (the paper's upsampling layer), as four phase convolutions of 1x1, 1x2,
    2x1 and 2x2 taps: no multiply-add is spent on inserted zeros.

    Args:
        x: (N, C_in, H, W), any memory format.
        weight: (C_in, C_out, 3, 3), as ``nn.ConvTranspose2d``; bias: (C_out,) or None.
        backend: force a backend (see :mod:`fastperc.backends`).
    Returns:
        (N, C_out, 2H, 2W) in x's dtype (channels_last when x is), equal to
        ``F.conv_transpose2d(x, weight, bias, stride=2, padding=1, output_padding=1)``.
    """
    x, weight, bias = _autocast(x, weight, bias)
    _check(x, weight, bias, in_dim=0, out_dim=1, layout="(C_in, C_out, 3, 3)")
    return conv_transpose2d_op(x, weight, bias, resolve_backend(backend, x.device))
