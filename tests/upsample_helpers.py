"""Checks of the two upsampling convolutions, each written once for both ops
(tests/test_upsampling_convs.py runs them for upsample_conv2d and conv_transpose2d).

The oracle is each op's plain definition in torch.nn.functional, evaluated in float64 on the
same (rounded) inputs, forward and backward by autograd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import fastperc
from fastperc import reference
import helpers
from helpers import (
    LAYOUTS,
    ON_GPU,
    assert_close,
    backend_device_params,
    make_input,
    reference_grads,
)


@dataclass(frozen=True)
class ConvOp:
    name: str
    definition: Callable  # (x, weight, bias) -> y, the plain F.* composition
    in_dim: int  # the weight dimension of the input channels
    out_dim: int

    @property
    def fn(self) -> Callable:
        return getattr(fastperc, self.name)

    @property
    def forward_op(self):
        return getattr(torch.ops.fastperc, self.name).default

    @property
    def backward_op(self):
        return getattr(torch.ops.fastperc, f"{self.name}_backward").default

    def weight_shape(self, c_in: int, c_out: int) -> tuple[int, int, int, int]:
        shape = [0, 0, 3, 3]
        shape[self.in_dim], shape[self.out_dim] = c_in, c_out
        return tuple(shape)

    def inputs(self, shape, dtype=torch.float32, device="cpu", layout="contiguous", bias=True):
        """shape (N, C_in, C_out, H, W) -> x, weight, bias (or None), of a realistic scale."""
        n, c_in, c_out, h, w = shape
        x = make_input((n, c_in, h, w), dtype, device, layout)
        weight = make_input(self.weight_shape(c_in, c_out), dtype, device, scale=(9 * c_in) ** -0.5)
        b = make_input((c_out,), dtype, device) if bias else None
        return x, weight, b


def _upsample_definition(x, weight, bias):
    return F.conv2d(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (1, 1, 1, 1), mode="reflect"),
                    weight, bias)


def _transpose_definition(x, weight, bias):
    return F.conv_transpose2d(x, weight, bias, stride=2, padding=1, output_padding=1)


UPSAMPLE = ConvOp("upsample_conv2d", _upsample_definition, in_dim=1, out_dim=0)
TRANSPOSE = ConvOp("conv_transpose2d", _transpose_definition, in_dim=0, out_dim=1)

# (N, C_in, C_out, H, W): H or W = 1, 2, odd; C = 1; C_in != C_out; channel counts past a
# block of 16; a large C_in.
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 3, 5, 1, 1),
    (1, 4, 3, 1, 2),
    (2, 3, 5, 2, 1),
    (1, 5, 4, 3, 5),
    (2, 17, 20, 4, 3),
    (1, 3, 2, 9, 7),
    (1, 64, 8, 3, 2),
]
EDGE_SIZES = [1, 2, 3, 5]
# Several tiles in every GEMM dimension: on the GPU's blocks (64 to 128), or under the
# interpreter with blocks of 16 (the multi-tile test's plans ask for them).
MULTI_TILE_SHAPE = (2, 136, 136, 13, 11) if ON_GPU else (1, 17, 18, 5, 4)


def _interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


# The interpreted Triton kernels are slow: a chosen set of (shape, dtype, layout, bias) that
# still covers every shape feature, both dtypes, every layout and both bias settings.
INTERPRETED_CASES = [
    ((1, 1, 1, 1, 1), torch.float32, "contiguous", True),
    ((1, 4, 3, 1, 2), torch.float32, "noncontiguous", True),
    ((2, 3, 5, 2, 1), torch.float32, "contiguous", False),
    ((1, 5, 4, 3, 5), torch.float32, "channels_last", False),
    ((1, 3, 2, 9, 7), torch.float32, "noncontiguous", True),
    ((1, 64, 8, 3, 2), torch.float32, "channels_last", True),
    ((2, 3, 5, 1, 1), torch.float16, "channels_last", True),
    ((2, 17, 20, 4, 3), torch.float16, "noncontiguous", False),
]


def forward_backward_params() -> list:
    """(backend, device, dtype, shape, layout, bias). The torch backend (the phase
    decomposition) runs every shape in every layout and dtype, the bias alternating; the
    reference (the definition itself) every other shape; the interpreted Triton kernels
    INTERPRETED_CASES."""
    cases = []
    for backend, device, dtype in (p.values for p in backend_device_params()):
        if _interpreted(backend, device):
            cases += [(backend, device, dt, shape, layout, bias)
                      for shape, dt, layout, bias in INTERPRETED_CASES if dt == dtype]
            continue
        for k, shape in enumerate(SHAPES):
            if backend == "reference" and k % 2 == 1:
                continue
            for m, layout in enumerate(LAYOUTS):
                cases.append((backend, device, dtype, shape, layout, (k + m) % 2 == 0))
    return [pytest.param(*case, id=f"{case[0]}-{case[1]}-{str(case[2]).removeprefix('torch.')}-"
                                   f"{'x'.join(map(str, case[3]))}-{case[4]}-{'bias' if case[5] else 'nobias'}")
            for case in cases]


def tolerance(backend: str, device: str, dtype: torch.dtype) -> float:
    """TF32's on CUDA where the backend's float32 convolution runs in TF32: cuDNN's (the
    reference and torch backends) by default, Triton's tl.dot where matmuls allow it."""
    return helpers.tolerance(dtype, device, op="upsample_conv2d", backend=backend)


def check_forward_backward(op: ConvOp, backend, device, dtype, shape, layout, bias) -> None:
    x, weight, b = op.inputs(shape, dtype, device, layout, bias)
    leaves = [t.requires_grad_(True) for t in (x, weight, b) if t is not None]
    y = op.fn(x, weight, b, backend=backend)
    n, _, c_out, h, w = shape
    assert y.shape == (n, c_out, 2 * h, 2 * w) and y.dtype == dtype
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() and c_out > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    grad_out = make_input(tuple(y.shape), dtype, device)
    grads = torch.autograd.grad(y, leaves, grad_out)
    ref, ref_grads = reference_grads(lambda *t: op.definition(*t, *([None] * (3 - len(t)))),
                                     leaves, grad_out)
    tol = tolerance(backend, device, dtype)
    assert_close(y, ref, dtype, tol=tol, what="y")
    for name, g, r, leaf in zip(("dx", "dweight", "dbias"), grads, ref_grads, leaves):
        assert g.dtype == dtype and g.shape == leaf.shape
        assert_close(g, r, dtype, tol=tol, what=name)


def check_only_requested_gradients(op: ConvOp, backend, device) -> None:
    """Each subset of (x, weight, bias) asking for gradients gets exactly those, right."""
    shape = (1, 2, 3, 2, 2)
    base = op.inputs(shape, torch.float32, device)
    grad_out = make_input((1, 3, 4, 4), torch.float32, device)
    _, all_grads = reference_grads(op.definition, list(base), grad_out)
    for wanted in ((True, False, False), (False, True, False), (False, False, True)):
        inputs = [t.detach().clone().requires_grad_(r) for t, r in zip(base, wanted)]
        y = op.fn(*inputs, backend=backend)
        y.backward(grad_out)
        for t, r, ref in zip(inputs, wanted, all_grads):
            if r:
                assert_close(t.grad, ref, torch.float32, what=f"grad {wanted}")
            else:
                assert t.grad is None


def check_edge_sizes_exact(op: ConvOp, backend: str) -> None:
    """H, W in {1, 2, 3, 5}: the phase decomposition equals the definition in float64,
    forward and backward (reflection of the upsampled image = replication of the input)."""
    for h in EDGE_SIZES:
        for w in EDGE_SIZES:
            x, weight, b = op.inputs((2, 3, 2, h, w), torch.float64)
            leaves = [t.requires_grad_(True) for t in (x, weight, b)]
            y = op.fn(x, weight, b, backend=backend)
            grad_out = make_input(tuple(y.shape), torch.float64)
            grads = torch.autograd.grad(y, leaves, grad_out)
            ref, ref_grads = reference_grads(op.definition, leaves, grad_out)
            assert_close(y, ref, torch.float64, what=f"y at {h}x{w}")
            for name, g, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
                assert_close(g, r, torch.float64, what=f"{name} at {h}x{w}")


def check_reference_backward(op: ConvOp) -> None:
    """reference.<op>_backward's explicit formulas equal autograd of the definition."""
    explicit = getattr(reference, f"{op.name}_backward")
    for h, w in ((1, 1), (1, 4), (3, 2), (5, 3)):
        x, weight, b = op.inputs((2, 3, 4, h, w), torch.float64)
        grad_out = make_input((2, 4, 2 * h, 2 * w), torch.float64)
        _, ref_grads = reference_grads(op.definition, [x, weight, b], grad_out)
        got = explicit(grad_out, x, weight, True, True, True)
        for name, g, r in zip(("dx", "dweight", "dbias"), got, ref_grads):
            assert_close(g, r, torch.float64, what=name)
        only_w = explicit(grad_out, x, weight, False, True, False)
        assert only_w[0].numel() == 0 and only_w[2].numel() == 0
        assert_close(only_w[1], ref_grads[1], torch.float64, what="dweight alone")


def check_gradcheck(op: ConvOp, backend, device) -> None:
    """The whole Jacobian for the torch backend's own formulas; for the others (the
    reference, and the interpreted kernels that are slow) a random projection of it."""
    shape = (1, 2, 2, 2, 1) if backend == "torch" else (1, 2, 2, 1, 2)
    x, weight, b = op.inputs(shape, torch.float64, device)
    leaves = tuple(t.requires_grad_(True) for t in (x, weight, b))
    assert torch.autograd.gradcheck(lambda *t: op.fn(*t, backend=backend), leaves,
                                    fast_mode=backend != "torch")


def check_opcheck(op: ConvOp, backend, device) -> None:
    """opcheck of the forward op (with and without a bias) and of the backward op (all
    gradients, and one alone); the interpreted kernels, slow, on fewer and smaller calls
    (the layouts the op promises are the op layer's, whichever backend ran)."""
    interpreted = _interpreted(backend, device)
    shape = (1, 2, 3, 1, 2) if interpreted else (1, 2, 3, 2, 3)
    x, weight, b = op.inputs(shape, torch.float32, device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for x_in, bias in (((x_cl, None),) if interpreted else ((x, b), (x_cl, None))):
        args = (x_in.requires_grad_(True), weight.requires_grad_(True),
                None if bias is None else bias.requires_grad_(True), backend)
        torch.library.opcheck(op.forward_op, args)
    n, _, c_out, h, w = shape
    grad = make_input((n, c_out, 2 * h, 2 * w), torch.float32, device, "channels_last")
    masks = ((False, True, True),) if interpreted else ((True, True, True), (False, True, False))
    for mask in masks:
        torch.library.opcheck(op.backward_op, (grad, x_cl.detach(), weight.detach(), backend, *mask))


def check_compile_fullgraph(op: ConvOp) -> None:
    x, weight, b = op.inputs((2, 3, 4, 5, 3))
    leaves = [t.requires_grad_(True) for t in (x, weight, b)]
    compiled = torch.compile(lambda x, w, b: op.fn(x, w, b).relu().sum(), fullgraph=True)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    ref, ref_grads = reference_grads(lambda *t: op.definition(*t).relu().sum(), leaves)
    assert_close(loss, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32)


def check_autocast_bf16(op: ConvOp) -> None:
    """Under CPU autocast the op runs in bf16 like F.conv2d would, also for mixed inputs."""
    x, weight, b = op.inputs((2, 3, 4, 3, 4))
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op.fn(x, weight, b)
        y_mixed = op.fn(x.to(torch.bfloat16), weight, b)
    assert y.dtype == torch.bfloat16 and y_mixed.dtype == torch.bfloat16
    ref = op.definition(*(t.to(torch.bfloat16).double() for t in (x, weight, b)))
    assert_close(y, ref, torch.bfloat16)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def bad_input_params(op: ConvOp) -> list:
    x = torch.randn(1, 3, 4, 5)
    w = torch.randn(op.weight_shape(3, 2))
    b = torch.randn(2)
    w5 = torch.randn(op.weight_shape(3, 2)[:2] + (5, 5))
    w_wrong_in = torch.randn(op.weight_shape(4, 2))
    return [
        pytest.param(torch.randn(3, 4, 5), w, b, ValueError, "x: expected a 4-D tensor", id="3d-input"),
        pytest.param(x, w5, b, ValueError, "weight: expected a 3x3 kernel", id="5x5-kernel"),
        pytest.param(x, w[..., :2], b, ValueError, "weight: expected a 3x3 kernel", id="3x2-kernel"),
        pytest.param(x, w_wrong_in, b, ValueError, "weight: expected 3 input channels", id="channels"),
        pytest.param(x, w[0], b, ValueError, "weight: expected a 4-D tensor", id="3d-weight"),
        pytest.param(x, w, torch.randn(3), ValueError, r"bias: expected shape \(2,\)", id="bias-size"),
        pytest.param(x, w, torch.randn(1, 2), ValueError, "bias: expected a 1-D tensor", id="bias-rank"),
        pytest.param(x, w.double(), b, TypeError, "weight: expected the dtype of x", id="weight-dtype"),
        pytest.param(x, w, b.double(), TypeError, "bias: expected the dtype of x", id="bias-dtype"),
        pytest.param(x.long(), w, b, TypeError, "x: expected a floating-point", id="int-input"),
        pytest.param([1.0], w, b, TypeError, "x: expected a torch.Tensor", id="list-input"),
        pytest.param(torch.randn(0, 3, 4, 5), w, b, ValueError, "x: expected a non-empty", id="empty"),
    ]


def check_multi_tile(op: ConvOp, device) -> None:
    """The Triton launchers on plans with several tiles in every GEMM dimension (blocks of 16
    under the interpreter, the GPU's own on a GPU) and a split weight gradient, forward and
    backward against the definition; and the forward epilogue's per-(n, c) mean and biased
    variance, merged over the pixel tiles, of inputs with a large mean."""
    from fastperc.kernels import upsample_conv as uc
    from fastperc.rules import device_facts, tf32_allowed

    mode = uc.UPSAMPLE if op is UPSAMPLE else uc.TRANSPOSE
    x, weight, b = op.inputs(MULTI_TILE_SHAPE, torch.float32, device, "channels_last", True)
    facts = device_facts(x.device)
    args = (mode, tuple(x.shape), MULTI_TILE_SHAPE[2], x.dtype, facts)
    fwd = uc.plan_forward(*args, tf32=tf32_allowed(facts), interpreter_block=16)
    bwd = uc.plan_backward(*args, tf32=tf32_allowed(facts), interpreter_block=16)
    for gemm in (fwd.gemm, bwd.dx, bwd.dw):
        assert gemm.grid[0] > 1 and gemm.grid[1] > 1, gemm
    assert bwd.dw_splits > 1
    y = uc.launch_forward(fwd, x, weight, b)
    grad_out = make_input(tuple(y.shape), torch.float32, device)
    grads = uc.launch_backward(bwd, grad_out, x, weight, True, True, True)
    ref, ref_grads = reference_grads(op.definition, [x, weight, b], grad_out)
    tol = tolerance("triton", device, torch.float32)
    assert_close(y, ref, torch.float32, tol=tol, what="y")
    for name, g, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert_close(g, r, torch.float32, tol=tol, what=name)

    y, mean, var = uc.launch_forward(fwd, x * 3 + 7, weight, b, stats=True)
    ref_var, ref_mean = torch.var_mean(y.double(), dim=(2, 3), unbiased=False)
    assert fwd.tiles_m > 1 and mean.shape == var.shape == (MULTI_TILE_SHAPE[0], MULTI_TILE_SHAPE[2])
    assert_close(mean, ref_mean, torch.float32, what="mean")
    assert_close(var, ref_var, torch.float32, what="var")
