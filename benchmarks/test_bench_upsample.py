"""upsample_conv2d and conv_transpose2d: fastperc against the plain eager compositions
(cuDNN / oneDNN) and their torch.compile (on the GPU), forward and forward+backward, at the
TransformerNet's upsampling layers (fastperc.bench.shapes.UPSAMPLE: batch-4 training at 256^2,
(4, 128, 64, 64) -> 64 channels and (4, 64, 128, 128) -> 32; inference at 1024^2), NCHW and
channels_last; 1/16 of the pixels on a CPU.

Competitors: for upsample_conv2d, "eager" is F.interpolate(nearest, x2) + F.pad(reflect) +
F.conv2d; for conv_transpose2d, "eager" is F.conv_transpose2d, and "phases" is the phase
decomposition in plain torch (four F.conv2d of 1x1, 1x2, 2x1, 2x2 taps and an interleave),
measured beside it because the torch backend does not use it (F.conv_transpose2d measured
faster on the CPU).

FLOPs: ``flops`` (TFLOPs) counts the phase-decomposed work, the multiply-adds a kernel must do:
upsample_conv2d 16 C_in C_out per input pixel, conv_transpose2d 9. ``flops_naive``
(TFLOPs_naive) counts the work as written: a 3x3 conv on the 2H x 2W grid, 36 C_in C_out per
input pixel, for both (for the transposed conv, a dense conv over the zero-inserted input).
Forward+backward is three times the forward (dx and dweight are convolutions of the same size).
Bytes: the floor, each tensor read or written once: forward x, weight, y; backward adds dy,
x, dx and dweight.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastperc
from conftest import DEVICE
from fastperc.bench import baselines
from fastperc.bench.cases import MODES, SPECS, dtypes_for, providers
from fastperc.bench.shapes import UPSAMPLE, shrink

SHAPES = {label: (shrink(shape) if DEVICE != "cuda" else shape, c_out)
          for label, (shape, c_out) in UPSAMPLE.items()}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# Two shared CPU cores time noisily: more rounds than the default five for a usable median.
CPU_ROUNDS = 9


def _phases_conv_transpose2d(x, w, b):
    """y[2m + a, 2l + b] = sum_{t <= a, s <= b} x[m + t, l + s] w[1 + a - 2t, 1 + b - 2s]."""
    n, _, h, wd = x.shape
    wt = w.transpose(0, 1)  # (C_out, C_in, 3, 3)
    xp = F.pad(x, (0, 1, 0, 1))
    rows = ([1], [2, 0])  # kernel rows (columns) of phase 0 and 1, by tap
    y = torch.empty((n, wt.shape[0], 2 * h, 2 * wd), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last if not x.is_contiguous() else torch.contiguous_format)
    pixels = y.unflatten(2, (h, 2)).unflatten(4, (wd, 2))
    for a in range(2):
        for c in range(2):
            kernel = wt[:, :, rows[a]][:, :, :, rows[c]]
            pixels[:, :, :, a, :, c] = F.conv2d(xp[:, :, :h + a, :wd + c], kernel, b)
    return y


# op -> (eager composition, extra plain-torch competitors, weight shape (C_in, C_out) -> shape)
OPS = {
    "upsample_conv2d": (baselines.upsample_conv2d, {}, lambda ci, co: (co, ci, 3, 3)),
    "conv_transpose2d": (baselines.conv_transpose2d, {"phases": _phases_conv_transpose2d},
                         lambda ci, co: (ci, co, 3, 3)),
}
_COMPILED: dict = {}


def _flops(op, shape, c_out, mode):
    n, c_in, h, w = shape
    per_pixel = 16 if op == "upsample_conv2d" else 9
    phase, naive = (2 * n * h * w * c_in * c_out * k for k in (per_pixel, 36))
    factor = 1 if mode == "fwd" else 3
    return phase * factor, naive * factor


def _bytes(shape, c_out, itemsize, mode):
    n, c_in, h, w = shape
    x, y, weight = n * c_in * h * w, n * c_out * 4 * h * w, c_in * c_out * 9
    fwd = (x + y + weight) * itemsize
    return fwd if mode == "fwd" else fwd + (y + 2 * x + weight) * itemsize


def _inputs(op, shape, c_out, dtype, layout):
    c_in = shape[1]
    x = torch.randn(shape, device=DEVICE).to(dtype).contiguous(memory_format=LAYOUTS[layout]).requires_grad_(True)
    w = (torch.randn(OPS[op][2](c_in, c_out), device=DEVICE) / (9 * c_in) ** 0.5).to(dtype).requires_grad_(True)
    b = (0.1 * torch.randn(c_out, device=DEVICE)).to(dtype).requires_grad_(True)
    return [x, w, b]


def _runner(op, provider, inputs, mode):
    eager, extra, _ = OPS[op]
    if provider == "eager":
        fn = eager
    elif provider == "compile":
        fn = _COMPILED.setdefault(op, torch.compile(eager))
    elif provider in extra:
        fn = extra[provider]
    else:
        fused = getattr(fastperc, op)
        fn = lambda x, w, b: fused(x, w, b, backend=provider)  # noqa: E731
    if mode == "fwd":
        return lambda: fn(*inputs)

    def forward_backward():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return forward_backward


CASES = [pytest.param(op, label, shape, c_out, dtype, layout, mode, provider,
                      id=f"{op}-{label}-{layout}-{str(dtype).removeprefix('torch.')}-{mode}-{provider}")
         for op in OPS for label, (shape, c_out) in SHAPES.items() for layout in LAYOUTS
         for dtype in dtypes_for(DEVICE) for mode in MODES
         for provider in providers(DEVICE, SPECS[op]) + list(OPS[op][1])]


@pytest.mark.parametrize("op,label,shape,c_out,dtype,layout,mode,provider", CASES)
def test_upsample_op(measure, benchmark, op, label, shape, c_out, dtype, layout, mode, provider):
    inputs = _inputs(op, shape, c_out, dtype, layout)
    flops, naive = _flops(op, shape, c_out, mode)
    measure(_runner(op, provider, inputs, mode), op=op, shape=shape, dtype=dtype, mode=mode,
            provider=provider, bytes=_bytes(shape, c_out, dtype.itemsize, mode), flops=flops,
            rounds=CPU_ROUNDS if DEVICE != "cuda" else None,
            extra={"layout": layout, "label": label, "c_out": c_out, "flops_naive": naive})
    seconds = benchmark.extra_info["median_ms"] / 1e3
    benchmark.extra_info["TFLOPs_naive"] = naive / seconds / 1e12 if seconds > 0 else None
    if DEVICE != "cuda" and benchmark.stats is not None:
        # On shared CPU cores the fastest round is the steadier figure beside the median.
        benchmark.extra_info["min_ms"] = benchmark.stats.stats.min * 1e3
