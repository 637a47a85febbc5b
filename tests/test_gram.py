"""gram beyond the op contract (tests/test_op_contract.py runs the contract over every
backend, dtype, layout and shape): the reference against loops, fp16 near overflow, and the
Triton launchers' tiling (mirrored off-diagonal tiles, split-K) and determinism directly."""
import pytest
import torch

import fastperc
from fastperc import reference
from fastperc.rules import H200, device_facts
from helpers import (
    LAYOUTS,
    TOLERANCE,
    TRITON_DEVICE,
    assert_close,
    backend_device_params,
    make_input,
    needs_triton,
    reference_grads,
)

TALL = (1, 16, 64, 64)  # C = 16, HW = 4096: one tile, a long reduction: split-K


def _kernels():
    import fastperc.kernels.gram as kernels

    return kernels


def test_reference_matches_independent_formula():
    x = make_input((2, 3, 4, 5), torch.float64)
    by_loops = torch.stack([
        torch.stack([torch.stack([(x[n, i] * x[n, j]).sum() for j in range(3)]) for i in range(3)])
        for n in range(2)
    ]) / (3 * 4 * 5)
    assert torch.allclose(reference.gram(x), by_loops, rtol=1e-12)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_fp16_values_in_the_hundreds_do_not_overflow(backend, device):
    # psi psi^T reaches 4096 * 300^2 ~ 4e8 before the 1/(CHW) scale: fp16 overflows at 65504.
    x = make_input(TALL, torch.float16, device, scale=30.0, offset=300.0).requires_grad_(True)
    dg = make_input((1, 16, 16, 1), torch.float16, device)[..., 0]
    g = fastperc.gram(x, backend=backend)
    g.backward(dg)
    ref, (gx,) = reference_grads(reference.gram, [x], dg)
    assert_close(g, ref, torch.float16, what="gram")
    assert_close(x.grad, gx, torch.float16, what="grad x")


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_fp16_backward_of_an_upstream_gradient_near_the_fp16_limit(backend, device):
    # Image 0: dG + dG^T reaches ~1e5, beyond fp16's 65504, though dG itself is representable.
    # Image 1: dG ~ 0.1, which must keep its own precision (a scale shared across the batch
    # would push its M into fp16's subnormals), its gradient well inside fp16's normal range.
    x = make_input((2, 16, 8, 8), torch.float16, device).requires_grad_(True)
    dg = torch.cat([make_input((1, 16, 16, 1), torch.float16, device, scale=1e3, offset=5e4)[..., 0],
                    make_input((1, 16, 16, 1), torch.float16, device, scale=0.1)[..., 0]])
    fastperc.gram(x, backend=backend).backward(dg)
    _, (gx,) = reference_grads(reference.gram, [x], dg)
    for i in range(2):
        assert_close(x.grad[i], gx[i], torch.float16, what=f"grad x[{i}]")


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS + ("cropped",))
def test_triton_small_tiles_mirror_off_diagonal_tiles(layout):
    """16 x 16 tiles on C = 40: 3 x 3 tiles, 6 computed, 3 stored twice; the backward sums
    over 3 j-blocks of M formed from mirrored tiles. "cropped": (H, W) do not flatten with
    one stride, so the launcher copies x first."""
    kernels = _kernels()
    if layout == "cropped":
        x = make_input((2, 40, 9, 12), torch.float32, TRITON_DEVICE)[..., 1:]
    else:
        x = make_input((2, 40, 9, 11), torch.float32, TRITON_DEVICE, layout)
    dg = make_input((2, 40, 40, 1), torch.float32, TRITON_DEVICE)[..., 0]
    ref, (gx,) = reference_grads(reference.gram, [x], dg)
    for splits in (1, 2):
        g = kernels.gram_forward(x, num_splits=splits, block_c=16, block_k=32)
        assert_close(g, ref, torch.float32, what=f"gram (S={splits})")
    dx = kernels.gram_backward(dg, x, block_m=16, block_j=16, block_k=128)
    assert_close(dx, gx, torch.float32, what="grad x")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_split_k_matches_single_stage(dtype):
    kernels = _kernels()
    x = make_input(TALL, dtype, TRITON_DEVICE, "channels_last")
    ref = reference.gram(x.double())
    single = kernels.gram_forward(x, num_splits=1)
    forced = kernels.gram_forward(x, num_splits=5)
    plan = kernels.plan_forward(TALL, dtype, device_facts(x.device), style=False, tf32=False)
    assert plan.splits > 1 and plan.reduce_grid is not None  # the heuristic splits too
    by_heuristic = kernels.gram_forward(x)
    for g in (single, forced, by_heuristic):
        assert_close(g, ref, dtype)
    assert_close(forced, single.double(), dtype, tol=TOLERANCE[dtype])


@needs_triton
def test_triton_is_deterministic():
    x = make_input(TALL, torch.float16, TRITON_DEVICE).requires_grad_(True)
    dg = make_input((1, 16, 16, 1), torch.float16, TRITON_DEVICE)[..., 0]
    runs = []
    for _ in range(2):
        x.grad = None
        g = fastperc.gram(x, backend="triton")
        g.backward(dg)
        runs.append((g, x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@needs_triton
def test_plans_take_tf32_for_float32_only():
    """The tl.dot precision of a GPU plan: tf32 for fp32 where TF32 is allowed, else exact."""
    kernels = _kernels()
    for tf32 in (False, True):
        fwd = kernels.plan_forward(TALL, torch.float32, H200, style=False, tf32=tf32)
        bwd = kernels.plan_backward(TALL, torch.float32, H200, has_a=False, tf32=tf32)
        assert fwd.precision == bwd.precision == ("tf32" if tf32 else "ieee")
        for dtype in (torch.float16, torch.float64):
            assert kernels.plan_forward(TALL, dtype, H200, style=False, tf32=tf32).precision == "ieee"
            assert kernels.plan_backward(TALL, dtype, H200, has_a=False, tf32=tf32).precision == "ieee"
