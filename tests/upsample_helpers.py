"""Checks of the two upsampling convolutions beyond the op contract, each written once for
both ops (tests/test_upsampling_convs.py runs them for upsample_conv2d and conv_transpose2d;
tests/op_table.py holds the ops, ConvOp, and their contract).

The oracle is each op's plain definition in torch.nn.functional, evaluated in float64 on the
same (rounded) inputs, forward and backward by autograd.
"""
from __future__ import annotations

import torch

import helpers
from fastperc import reference
from helpers import ON_GPU, assert_close, make_input, reference_grads
from op_table import UPSAMPLE, ConvOp

EDGE_SIZES = [1, 2, 3, 5]
# Several tiles in every GEMM dimension: on the GPU's blocks (64 to 128), or under the
# interpreter with blocks of 16 (the multi-tile test's plans ask for them).
MULTI_TILE_SHAPE = (2, 136, 136, 13, 11) if ON_GPU else (1, 17, 18, 5, 4)


def tolerance(backend: str, device: str, dtype: torch.dtype) -> float:
    """TF32's on CUDA where the backend's float32 convolution runs in TF32: cuDNN's (the
    reference and torch backends) by default, Triton's tl.dot where matmuls allow it."""
    return helpers.tolerance(dtype, device, op="upsample_conv2d", backend=backend)


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


def check_reference_backward_computes_only_what_is_asked(op: ConvOp) -> None:
    """reference.<op>_backward with only the weight gradient asked for: empty dx and dbias, the
    dweight of autograd of the definition (tests/test_op_contract.py checks all three)."""
    x, weight, b = op.inputs((2, 3, 4, 3, 2), torch.float64)
    grad_out = make_input((2, 4, 6, 4), torch.float64)
    _, ref_grads = reference_grads(op.definition, [x, weight, b], grad_out)
    dx, dw, db = getattr(reference, f"{op.name}_backward")(grad_out, x, weight, False, True, False)
    assert dx.numel() == 0 and db.numel() == 0
    assert_close(dw, ref_grads[1], torch.float64, what="dweight alone")


def check_autocast_casts_float32_inputs(op: ConvOp) -> None:
    """Under CPU autocast, as F.conv2d, a float32 x is cast to bf16 too: the same output as
    for a bf16 x (tests/test_op_contract.py checks a bf16 x with float32 weights against the
    definition)."""
    x, weight, b = op.inputs((2, 3, 4, 3, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op.fn(x, weight, b)
        y_bf16 = op.fn(x.to(torch.bfloat16), weight, b)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_bf16)


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
