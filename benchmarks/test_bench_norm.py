"""instance_norm_relu, instance_norm + residual and batch_norm_relu: fastperc against eager
F.instance_norm / F.batch_norm followed by ReLU (or the add), and its torch.compile (on the
GPU), forward and forward+backward, at the TransformerNet's activation shapes (4, 32, 256,
256), (4, 64, 128, 128), (4, 128, 64, 64) (1/16 of the pixels on a CPU), NCHW and
channels_last.

Bytes are the floor of the fused op: forward reads x (and the residual) and writes y;
backward reads dy and x and writes dx (d residual is dy itself, and the per-channel
parameters and statistics are negligible). GB/s = bytes / median time, in extra_info
beside the time, with the layout.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastperc
from conftest import DEVICE
from fastperc.bench.cases import MODES, dtypes_for, providers
from fastperc.bench.shapes import TRANSFORMER, scaled

SHAPES = scaled(TRANSFORMER, small=DEVICE != "cuda")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _eager_in_relu(x, w, b):
    return F.relu(F.instance_norm(x, weight=w, bias=b))


def _eager_in_residual(x, w, b, r):
    return F.instance_norm(x, weight=w, bias=b) + r


def _eager_bn_relu(x, w, b, rm, rv):
    return F.relu(F.batch_norm(x, rm, rv, w, b, True))


# op -> (eager composition, fused call given a backend, has a residual, has running statistics)
OPS = {
    "instance_norm_relu": (_eager_in_relu,
                           lambda be: lambda x, w, b: fastperc.instance_norm_relu(x, w, b, backend=be),
                           False, False),
    "instance_norm+residual": (_eager_in_residual,
                               lambda be: lambda x, w, b, r: fastperc.instance_norm(x, w, b, residual=r, backend=be),
                               True, False),
    "batch_norm_relu": (_eager_bn_relu,
                        lambda be: lambda x, w, b, rm, rv: fastperc.batch_norm_relu(x, w, b, rm, rv, backend=be),
                        False, True),
}
_COMPILED: dict = {}


def _inputs(op, shape, dtype, layout):
    _, _, residual, running = OPS[op]
    c = shape[1]
    fmt = LAYOUTS[layout]
    # A convolution's output: signed, not centred, of a real activation's magnitude.
    x = (torch.randn(shape, device=DEVICE) * 3 + 0.5).to(dtype).contiguous(memory_format=fmt).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(c, device=DEVICE)).requires_grad_(True)
    b = (0.1 * torch.randn(c, device=DEVICE)).requires_grad_(True)
    inputs = [x, w, b]
    if residual:
        inputs.append(torch.randn(shape, device=DEVICE).to(dtype).contiguous(memory_format=fmt).requires_grad_(True))
    if running:
        inputs += [torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)]
    return inputs


def _bytes(op, shape, itemsize, mode):
    numel = 1
    for s in shape:
        numel *= s
    fwd = (3 if OPS[op][2] else 2) * numel * itemsize
    return fwd if mode == "fwd" else fwd + 3 * numel * itemsize


def _runner(op, provider, inputs, mode):
    eager, fused, _, _ = OPS[op]
    if provider == "eager":
        fn = eager
    elif provider == "compile":
        fn = _COMPILED.setdefault(op, torch.compile(eager))
    else:
        fn = fused(provider)
    if mode == "fwd":
        return lambda: fn(*inputs)
    leaves = [t for t in inputs if t.requires_grad]

    def forward_backward():
        out = fn(*inputs)
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    return forward_backward


CASES = [pytest.param(op, label, shape, dtype, layout, mode,
                      id=f"{op}-{label}-{layout}-{str(dtype).removeprefix('torch.')}-{mode}")
         for op in OPS for label, shape in SHAPES.items() for layout in LAYOUTS
         for dtype in dtypes_for(DEVICE) for mode in MODES]


@pytest.mark.parametrize("provider", providers(DEVICE))
@pytest.mark.parametrize("op,label,shape,dtype,layout,mode", CASES)
def test_norm_op(measure, op, label, shape, dtype, layout, mode, provider):
    inputs = _inputs(op, shape, dtype, layout)
    measure(_runner(op, provider, inputs, mode), op=op, shape=shape, dtype=dtype, mode=mode, provider=provider,
            bytes=_bytes(op, shape, dtype.itemsize, mode), extra={"layout": layout, "label": label})
