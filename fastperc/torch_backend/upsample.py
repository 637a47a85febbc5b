"""The upsampling convolutions in plain torch.

upsample_conv2d: nearest x2, reflection pad 1, 3x3 conv. An output pixel (2i + a, 2j + b),
a, b in {0, 1}, sees the upsampled rows 2i + a - 1, 2i + a, 2i + a + 1, which are the input rows
i - 1, i, i (a = 0) or i, i, i + 1 (a = 1), reflection of the upsampled image at its border
being replication of the input at its border (also for H or W = 1). So each output phase (a, b)
is a 2x2 convolution of the input replicate-padded by 1, xp, over xp[i + a + t, j + b + s],
t, s in {0, 1}, with the summed ("phase") weights

    W_ab[t, s] = sum_{k, l} A[a, t, k] A[b, s, l] w[k, l],   A[0] = [[1, 0, 0], [0, 1, 1]],
                                                             A[1] = [[1, 1, 0], [0, 0, 1]]

16 multiply-adds per input pixel and channel pair instead of the 36 of the 3x3 conv on the
upsampled image, and the upsampled tensor never exists (the phase weights are
``fastperc.rules.upsample_phase_weights``, shared with the Triton kernels). The torch path runs
all four phases as one 2x2 conv with 4 C_out output channels over xp ((H + 1) x (W + 1)
outputs, phase (a, b) at offset (a, b)) and interleaves them into the output with one strided copy; its backward is
one ``convolution_backward`` of that conv, then the adjoints of the padding and of the weight sum.
On the CPU, half-precision inputs are computed in float32: measured over 10 times faster than
fp16/bf16 convolutions on a CPU without native half arithmetic, and the border fold of the
backward then sums unrounded values.

conv_transpose2d (stride 2, padding 1, output_padding 1, 3x3): output phase (a, b) is
    y[2m + a, 2l + b] = sum_{t <= a, s <= b} x[m + t, l + s] w[1 + a - 2t, 1 + b - 2s]
(x zero beyond its last row and column): taps of 1x1, 1x2, 2x1 and 2x2, 9 per input pixel.
The Triton kernels use this; the torch path calls ``F.conv_transpose2d``, because oneDNN's
deconvolution (itself a backward-data convolution, with no inserted zeros) measured faster on
the CPU than the four phase convolutions plus the interleave (1.3 to 3 times, forward and
backward, NCHW and channels_last: the "phases" provider of benchmarks/test_bench_upsample.py),
and its backward is the one ``convolution_backward`` call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastperc.rules import acc_dtype, natural_format, upsample_phase_weights, upsample_phase_weights_adjoint


def _phase_conv_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The four phase kernels as one conv weight (4 C_out, C_in, 2, 2), output channel (o, a, b)."""
    o, c = weight.shape[:2]
    return upsample_phase_weights(weight).permute(4, 0, 1, 5, 2, 3).reshape(4 * o, c, 2, 2).to(dtype)


def _phase_view(full: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, 4 C_out, H + 1, W + 1), channel (o, a, b) -> the (N, C_out, H, 2, W, 2) view whose
    [n, o, i, a, j, b] is full[n, (o, a, b), i + a, j + b]: phase (a, b) at offset (a, b)."""
    f = full.unflatten(1, (-1, 2, 2))
    sn, so, sa, sb, sh, sw = f.stride()
    return f.as_strided((f.shape[0], f.shape[1], h, 2, w, 2),
                        (sn, so, sh, sa + sh, sw, sb + sw), f.storage_offset())


def _pixels(y: torch.Tensor) -> torch.Tensor:
    """(N, C, 2H, 2W) -> its (N, C, H, 2, W, 2) view: [n, c, i, a, j, b] = y[n, c, 2i + a, 2j + b]."""
    return y.unflatten(2, (y.shape[2] // 2, 2)).unflatten(4, (y.shape[3] // 2, 2))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Half precision runs in float32 on the CPU (faster there, and more accurate)."""
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def upsample_conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, _, h, w = x.shape
    o = weight.shape[0]
    dtype = _compute_dtype(x)
    xp = F.pad(x.to(dtype), (1, 1, 1, 1), mode="replicate")
    bias4 = None if bias is None else bias.to(dtype).repeat_interleave(4)
    full = F.conv2d(xp, _phase_conv_weight(weight, dtype), bias4)
    y = torch.empty((n, o, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=natural_format(x))
    _pixels(y).copy_(_phase_view(full, h, w))
    return y


def _fold_replicate_pad(g: torch.Tensor) -> torch.Tensor:
    """The adjoint of replicate padding by 1 (in place on g, (N, C, H + 2, W + 2)) -> (N, C, H, W) view."""
    g[:, :, 1] += g[:, :, 0]
    g[:, :, -2] += g[:, :, -1]
    g[:, :, :, 1] += g[:, :, :, 0]
    g[:, :, :, -2] += g[:, :, :, -1]
    return g[:, :, 1:-1, 1:-1]


def _bias_grad(dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dy.sum(dim=(0, 2, 3), dtype=acc_dtype(dy.dtype)).to(dtype)


def upsample_conv2d_backward(dy, x, weight, needs_x: bool, needs_weight: bool, needs_bias: bool):
    n, c, h, w = x.shape
    o = weight.shape[0]
    dx, dw = x.new_empty((0,)), weight.new_empty((0,))
    if needs_x or needs_weight:
        fmt = natural_format(x)
        dtype = _compute_dtype(x)
        g = torch.zeros((n, 4 * o, h + 1, w + 1), dtype=dtype, device=x.device).contiguous(memory_format=fmt)
        _phase_view(g, h, w).copy_(_pixels(dy))
        xp = F.pad(x.to(dtype), (1, 1, 1, 1), mode="replicate")
        gxp, gwp, _ = torch.ops.aten.convolution_backward(
            g, xp, _phase_conv_weight(weight, dtype), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [needs_x, needs_weight, False])
        if needs_x:
            # The border fold sums up to four values per pixel: in the accumulation dtype.
            dx = _fold_replicate_pad(gxp.to(acc_dtype(dtype))).to(x.dtype).contiguous(memory_format=fmt)
        if needs_weight:
            dwp = gwp.view(o, 2, 2, c, 2, 2).permute(1, 2, 4, 5, 0, 3)
            dw = upsample_phase_weights_adjoint(dwp).to(weight.dtype)
    db = _bias_grad(dy, weight.dtype) if needs_bias else weight.new_empty((0,))
    return dx, dw, db


def conv_transpose2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    dtype = _compute_dtype(x)
    b = None if bias is None else bias.to(dtype)
    y = F.conv_transpose2d(x.to(dtype), weight.to(dtype), b, stride=2, padding=1, output_padding=1)
    return y.to(x.dtype)


def conv_transpose2d_backward(dy, x, weight, needs_x: bool, needs_weight: bool, needs_bias: bool):
    dx, dw = x.new_empty((0,)), weight.new_empty((0,))
    if needs_x or needs_weight:
        dtype = _compute_dtype(x)
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy.to(dtype), x.to(dtype), weight.to(dtype), None, [2, 2], [1, 1], [1, 1], True, [1, 1], 1,
            [needs_x, needs_weight, False])
        dx = dx.to(x.dtype) if needs_x else x.new_empty((0,))
        dw = dw.to(weight.dtype) if needs_weight else weight.new_empty((0,))
    db = _bias_grad(dy, weight.dtype) if needs_bias else weight.new_empty((0,))
    return dx, dw, db
