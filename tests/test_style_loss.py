"""style_loss against the float64 reference on every available backend: the loss, the gradient
with respect to x and to the target, (C, C) and (N, C, C) targets, asymmetric targets; and the
fused Triton forward's tiling (mirrored tiles, split-K) directly."""
import pytest
import torch

import fastperc
from fastperc import reference
from fastperc.rules import device_facts
from helpers import (
    LAYOUTS,
    TRITON_DEVICE,
    assert_close,
    backend_device_params,
    make_input,
    needs_triton,
    reference_grads,
)

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 17, 3, 3), (2, 40, 9, 11)]
TALL = (1, 16, 64, 64)


def _kernels():
    import fastperc.kernels.gram as kernels

    return kernels


def make_target(kind: str, n: int, c: int, device: str = "cpu", dtype=torch.float32, scale: float = 1.0):
    """An asymmetric target: "shared" (C, C), a transposed (non-contiguous) view, or "batched" (N, C, C).

    Centred at -2 * scale, away from the Gram matrices of the test inputs, so that G - T does not
    cancel (a loss near 0 would be ill-conditioned in any precision)."""
    if kind == "shared":
        t = make_input((1, 1, c, c), torch.float64, scale=scale, offset=-2 * scale)[0, 0].t()
    else:
        t = make_input((n, c, c, 1), torch.float64, scale=scale, offset=-2 * scale)[..., 0]
    return t.to(device=device, dtype=dtype)


def test_reference_matches_independent_formula():
    x = make_input((2, 3, 4, 5), torch.float64)
    t = make_target("batched", 2, 3, dtype=torch.float64)
    by_loops = 0.0
    for n in range(2):
        psi = x[n].reshape(3, 20)
        g = psi @ psi.T / 60
        by_loops = by_loops + ((g - t[n]) ** 2).sum() / 2
    assert torch.allclose(reference.style_loss(x, t), by_loops, rtol=1e-12)


@pytest.mark.parametrize("kind", ["shared", "batched"])
def test_reference_backward_matches_autograd(kind):
    x = make_input((2, 5, 3, 4), torch.float64, layout="channels_last")
    t = make_target(kind, 2, 5, dtype=torch.float64)
    g = torch.tensor(1.3, dtype=torch.float64)
    _, (gx, _) = reference_grads(reference.style_loss, [x, t], g)
    assert_close(reference.style_loss_backward(g, x, t), gx, torch.float64)


@pytest.mark.parametrize("backend,device,dtype", backend_device_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["shared", "batched"])
def test_forward_backward(backend, device, dtype, layout, shape, kind):
    n, c = shape[:2]
    x = make_input(shape, dtype, device, layout, scale=2.0, offset=0.5).requires_grad_(True)
    target = make_target(kind, n, c, device).requires_grad_(True)  # float32 for every x dtype
    grad_out = torch.tensor(1.7, device=device)
    loss = fastperc.style_loss(x, target, backend=backend)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected and loss.shape == ()
    loss.backward(grad_out)
    ref, (gx, gt) = reference_grads(reference.style_loss, [x, target], grad_out)
    assert_close(loss, ref, dtype, what="loss")
    assert x.grad.dtype == dtype and target.grad.dtype == target.dtype
    assert_close(x.grad, gx, dtype, what="grad x")
    assert_close(target.grad, gt, dtype, what="grad target")
    if layout == "channels_last" and not x.is_contiguous():
        assert x.grad.is_contiguous(memory_format=torch.channels_last)


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


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_gradcheck_float64(backend, device):
    x = make_input((2, 3, 2, 3), torch.float64, device).requires_grad_(True)
    t = make_target("shared", 2, 3, device, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, t: fastperc.style_loss(x, t, backend=backend), (x, t), fast_mode=True
    )


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_opcheck(backend, device):
    x = make_input((2, 3, 4, 5), torch.float32, device, "channels_last").requires_grad_(True)
    t = make_target("batched", 2, 3, device)
    torch.library.opcheck(torch.ops.fastperc.style_loss.default, (x, t, backend))
    loss, gram = torch.ops.fastperc.style_loss(x.detach(), t, backend)
    g = torch.tensor(0.5, device=device)
    torch.library.opcheck(torch.ops.fastperc.style_loss_backward.default, (g, x.detach(), t, gram, backend))


def test_compile_fullgraph_forward_backward():
    x = make_input((2, 3, 6, 5)).requires_grad_(True)
    t = make_target("shared", 2, 3).requires_grad_(True)
    compiled = torch.compile(lambda x, t: 3.0 * fastperc.style_loss(x, t), fullgraph=True)
    loss = compiled(x, t)
    loss.backward()
    ref, (gx, gt) = reference_grads(lambda x, t: 3.0 * reference.style_loss(x, t), [x, t])
    assert_close(loss, ref, torch.float32)
    assert_close(x.grad, gx, torch.float32)
    assert_close(t.grad, gt, torch.float32)


def test_autocast_bf16_inputs_give_float32_loss():
    x = make_input((2, 3, 6, 5)).requires_grad_(True)
    t = make_target("shared", 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = torch.nn.functional.conv2d(x, torch.ones(3, 3, 1, 1) / 3)
        loss = fastperc.style_loss(f, t)
    assert f.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


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


@pytest.mark.parametrize(
    "x,target,error,match",
    [
        (torch.randn(3, 4, 5), torch.randn(3, 3), ValueError, "x: expected a 4-D tensor"),
        (torch.randn(2, 3, 4, 5), torch.randn(4, 4), ValueError,
         r"target: expected shape \(3, 3\) or \(2, 3, 3\) for x of shape \(2, 3, 4, 5\), got \(4, 4\)"),
        (torch.randn(2, 3, 4, 5), torch.randn(1, 3, 3), ValueError, r"target: expected shape .*got \(1, 3, 3\)"),
        (torch.randn(2, 3, 4, 5), torch.randn(3), ValueError, "target: expected a 2-D or 3-D tensor"),
        (torch.randn(2, 3, 4, 5), torch.randn(2, 1, 3, 3), ValueError, "target: expected a 2-D or 3-D tensor"),
        (torch.randn(2, 3, 4, 5), torch.ones(3, 3, dtype=torch.int64), TypeError, "target: expected a floating-point"),
        (torch.ones(2, 3, 4, 5, dtype=torch.bool), torch.randn(3, 3), TypeError, "x: expected a floating-point"),
        (torch.randn(2, 3, 4, 5), torch.randn(3, 3, device="meta"), ValueError,
         "target: expected a tensor on x's device cpu, got meta"),
        (torch.randn(2, 3, 4, 5), [[1.0]], TypeError, "target: expected a torch.Tensor, got list"),
    ],
)
def test_bad_inputs(x, target, error, match):
    with pytest.raises(error, match=match):
        fastperc.style_loss(x, target)
