"""style_loss beyond the op contract (tests/test_op_contract.py runs the contract, the loss and
the gradients with respect to x and to the target for (C, C) and (N, C, C) asymmetric targets,
over every backend, dtype, layout and shape): the reference against loops, fp16 near overflow,
and the fused Triton forward's tiling (mirrored tiles, split-K) and determinism directly."""
import pytest
import torch

import fastperc
from fastperc import reference
from fastperc.rules import device_facts
from helpers import (
    TRITON_DEVICE,
    assert_close,
    backend_device_params,
    make_input,
    needs_triton,
    reference_grads,
)
from op_table import make_target

TALL = (1, 16, 64, 64)


def _kernels():
    import fastperc.kernels.gram as kernels

    return kernels


def test_reference_matches_independent_formula():
    x = make_input((2, 3, 4, 5), torch.float64)
    t = make_target("batched", 2, 3, dtype=torch.float64)
    by_loops = 0.0
    for n in range(2):
        psi = x[n].reshape(3, 20)
        g = psi @ psi.T / 60
        by_loops = by_loops + ((g - t[n]) ** 2).sum() / 2
    assert torch.allclose(reference.style_loss(x, t), by_loops, rtol=1e-12)


@pytest.mark.parametrize("x_scale,x_offset,t_scale", [
    (30.0, 300.0, 1000.0),  # x in the hundreds: psi psi^T overflows fp16 before the 1/(CHW) scale
    (1.0, 0.0, 5e4),        # 2G - T - T^T reaches ~2e5: rounded to fp16 before the product it is inf
], ids=["x-in-the-hundreds", "target-beyond-fp16"])
@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_fp16_does_not_overflow(backend, device, x_scale, x_offset, t_scale):
    x = make_input(TALL, torch.float16, device, scale=x_scale, offset=x_offset).requires_grad_(True)
    target = make_target("shared", 1, 16, device, scale=t_scale)
    loss = fastperc.style_loss(x, target, backend=backend)
    loss.backward()
    ref, (gx, _) = reference_grads(reference.style_loss, [x, target])
    assert_close(loss, ref, torch.float16, what="loss")
    assert_close(x.grad, gx, torch.float16, what="grad x")


@needs_triton
@pytest.mark.parametrize("kind", ["shared", "batched"])
def test_triton_small_tiles_mirror_off_diagonal_tiles(kind):
    """16 x 16 tiles on C = 40: the mirrored tiles meet T[j, i] of an asymmetric target."""
    kernels = _kernels()
    x = make_input((2, 40, 9, 11), torch.float32, TRITON_DEVICE, "channels_last")
    t = make_target(kind, 2, 40, TRITON_DEVICE)
    g = torch.tensor(0.7, device=TRITON_DEVICE)
    ref, (gx, _) = reference_grads(reference.style_loss, [x, t], g)
    for splits in (1, 2):
        loss, gram = kernels.style_loss_forward(x, t, num_splits=splits, block_c=16, block_k=32)
        assert_close(loss, ref, torch.float32, what=f"loss (S={splits})")
        assert_close(gram, reference.gram(x.double()), torch.float32, what=f"gram (S={splits})")
    dx = kernels.style_loss_backward(g, x, t, gram, block_m=16, block_j=16, block_k=128)
    assert_close(dx, gx, torch.float32, what="grad x")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_split_k_matches_single_stage(dtype):
    kernels = _kernels()
    x = make_input(TALL, dtype, TRITON_DEVICE)
    t = make_target("batched", 1, 16, TRITON_DEVICE)
    ref = reference.style_loss(x.double(), t.double())
    plan = kernels.plan_forward(TALL, dtype, device_facts(x.device), style=True, tf32=False)
    assert plan.splits > 1  # the heuristic splits
    results = [kernels.style_loss_forward(x, t, num_splits=s) for s in (1, 5, None)]
    for loss, gram in results:
        assert_close(loss, ref, dtype, what="loss")
        assert_close(gram, results[0][1].double(), torch.float32, what="gram vs S=1")


@needs_triton
def test_triton_is_deterministic():
    x = make_input(TALL, torch.float16, TRITON_DEVICE).requires_grad_(True)
    t = make_target("batched", 1, 16, TRITON_DEVICE).requires_grad_(True)
    runs = []
    for _ in range(2):
        x.grad = t.grad = None
        loss = fastperc.style_loss(x, t, backend="triton")
        loss.backward()
        runs.append((loss, x.grad, t.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
