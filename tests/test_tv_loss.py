"""tv_loss beyond the op contract (tests/test_op_contract.py runs it over every backend, dtype,
layout, shape, p and reduction): the reference against loops, single-pixel images, p = 1 at
ties, float64 in and out, odd views and expanded gradients, and the Triton launchers' tiling
(several row and column blocks, row loops, both memory formats) directly."""
import pytest
import torch

import fastperc
from fastperc import reference
from fastperc.rules import H200
from helpers import (
    LAYOUTS,
    ON_GPU,
    TRITON_DEVICE,
    assert_close,
    backend_device_params,
    make_input,
    needs_triton,
    reference_grads,
)
from op_table import TV_LARGE as LARGE

REDUCTIONS = ("none", "sum", "mean")


def _kernels():
    import fastperc.kernels.tv_loss as kernels

    return kernels


def _grad_out(reduction, n, device, seed=0):
    """A per-image gradient for "none" (distinct values, so a wrong image index shows)."""
    if reduction == "none":
        g = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
        return g.to(device=device, dtype=torch.float32)
    return torch.tensor(1.7, device=device)


def test_reference_matches_independent_formula():
    x = make_input((2, 3, 4, 5), torch.float64)
    for p in (1, 2):
        by_loops = torch.zeros(2, dtype=torch.float64)
        for n in range(2):
            for c in range(3):
                for i in range(4):
                    for j in range(5):
                        if i + 1 < 4:
                            by_loops[n] += (x[n, c, i + 1, j] - x[n, c, i, j]).abs() ** p
                        if j + 1 < 5:
                            by_loops[n] += (x[n, c, i, j + 1] - x[n, c, i, j]).abs() ** p
        assert torch.allclose(reference.tv_loss(x, p, "none"), by_loops, rtol=1e-12)
        assert torch.allclose(reference.tv_loss(x, p, "sum"), by_loops.sum(), rtol=1e-12)
        assert torch.allclose(reference.tv_loss(x, p), by_loops.mean(), rtol=1e-12)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_pixel_images_have_zero_loss_and_gradient(backend, device, layout, reduction):
    x = make_input((2, 2, 1, 1), torch.float32, device, layout).requires_grad_(True)
    loss = fastperc.tv_loss(x, 1, reduction, backend=backend)
    loss.backward(_grad_out(reduction, 2, device))
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend,device,dtype", backend_device_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_p1_ties_have_zero_gradient(backend, device, dtype, layout, reduction):
    """Integer-valued images: many neighbours are exactly equal, where d|d|/dd is 0 (the
    reference's and torch.abs's sign(0) = 0), not +-1."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (2, 3, 6, 7), generator=gen).to(dtype)
    x[:, :, :3, :3] = 1.0  # pixel (1, 1) equals all four of its neighbours
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(device).requires_grad_(True)
    loss = fastperc.tv_loss(x, 1, reduction, backend=backend)
    grad_out = _grad_out(reduction, 2, device)
    loss.backward(grad_out)
    ref, (gx,) = reference_grads(lambda t: reference.tv_loss(t, 1, reduction), [x], grad_out)
    assert torch.equal(loss.double(), ref)  # small integers: exact in any precision
    assert_close(x.grad, gx, dtype, what="grad x")
    assert_close(reference.tv_loss_backward(grad_out.double(), x.detach().double(), 1, reduction), gx,
                 torch.float64, what="reference backward")
    assert (x.grad[:, :, 1, 1] == 0).all()


def test_float64_input_gives_float64_loss():
    x = make_input((2, 3, 4, 5), torch.float64)
    for backend in fastperc.available_backends():
        if backend == "cuda":
            continue
        dev = TRITON_DEVICE if backend == "triton" else "cpu"
        assert fastperc.tv_loss(x.to(dev), backend=backend).dtype == torch.float64


# --- the Triton launchers' tiling ------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3, 256, 256), (4, 64, 256, 256)], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("itemsize", [2, 4])
def test_plan_fills_a_132_sm_gpu(shape, interleaved, itemsize):
    """The GPU plan (not the interpreter's) gives several programs per SM, both passes."""
    k = pytest.importorskip("fastperc.kernels.tv_loss")
    fmt = torch.channels_last if interleaved else torch.contiguous_format
    x = torch.empty(shape, device="meta", memory_format=fmt)
    pl = k.plan(shape, (x.stride(),), itemsize, H200)
    assert pl.interleaved == interleaved
    (programs,) = pl.forward_grid
    assert programs >= 4 * 132
    assert programs <= k.MAX_PARTIALS
    assert pl.backward_grid[0] >= 4 * 132
    assert pl.block_r * pl.block_f * itemsize >= 1024  # still a sizeable tile


@needs_triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_shape_spans_several_tiles_on_each_axis(layout, dtype):
    k = _kernels()
    x = make_input(LARGE, dtype, TRITON_DEVICE, layout)
    pl = k.plan_for(x)
    assert pl.interleaved == (layout == "channels_last")
    assert pl.n_row_blocks > 1 and pl.n_col_blocks > 1


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", [1, 2])
def test_forward_row_loops_and_gpu_tiles(layout, p):
    """Few partials allowed (each program loops over several row blocks) and the small tiles
    the GPU plan picks for small tensors; bitwise deterministic across calls."""
    k = _kernels()
    x = make_input((2, 2, 9, 40), torch.float32, TRITON_DEVICE, layout)
    shape, itemsize = tuple(x.shape), x.element_size()
    fwd = k.plan(shape, (x.stride(),), itemsize, H200, max_partials=4)
    assert fwd.block_r * fwd.block_f == k.MIN_TILE
    assert fwd.iters > 1 and fwd.forward_grid[0] <= 4
    loss = k.launch_forward(fwd, x, p, "none")
    assert torch.equal(loss, k.launch_forward(fwd, x, p, "none"))
    grad_out = _grad_out("none", 2, TRITON_DEVICE)
    bwd = k.plan(shape, (x.stride(), torch.empty_like(x).stride()), itemsize, H200)
    assert bwd.block_r * bwd.block_f == k.MIN_TILE
    dx = k.launch_backward(bwd, grad_out, x, p, "none")
    ref, (gx,) = reference_grads(lambda t: reference.tv_loss(t, p, "none"), [x.requires_grad_(True)], grad_out)
    assert_close(loss, ref, torch.float32)
    assert_close(dx, gx, torch.float32)


@needs_triton
def test_channels_fastest_view_with_gapped_rows():
    """A channels_last tensor sliced along W: channels fastest but rows with gaps, so read
    through the general strided path; dx comes back as torch.empty_like(x)."""
    base = make_input((2, 4, 5, 12), torch.float32, TRITON_DEVICE, "channels_last")
    x = base[:, :, :, ::3].requires_grad_(True)
    loss = fastperc.tv_loss(x, 2, "sum", backend="triton")
    (dx,) = torch.autograd.grad(loss, x)
    ref, (gx,) = reference_grads(lambda t: reference.tv_loss(t, 2, "sum"), [x])
    assert_close(loss, ref, torch.float32)
    assert dx.stride() == torch.empty_like(x).stride()
    assert_close(dx, gx, torch.float32)


@needs_triton
def test_expanded_none_gradient():
    """grad of tv.sum() for reduction "none" arrives expanded (stride 0)."""
    x = make_input((3, 2, 4, 5), torch.float32, TRITON_DEVICE).requires_grad_(True)
    fastperc.tv_loss(x, 2, "none", backend="triton").sum().backward()
    _, (gx,) = reference_grads(lambda t: reference.tv_loss(t, 2, "none").sum(), [x])
    assert_close(x.grad, gx, torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(4, 3, 256, 256), (4, 64, 256, 256)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_training_shapes_on_gpu(shape, layout, dtype):
    x = make_input(shape, dtype, "cuda", layout, scale=40.0, offset=128.0).requires_grad_(True)
    loss = fastperc.tv_loss(x, 2, "none", backend="triton")
    grad_out = _grad_out("none", shape[0], "cuda")
    (dx,) = torch.autograd.grad(loss, x, grad_out)
    assert torch.equal(loss, fastperc.tv_loss(x.detach(), 2, "none", backend="triton"))
    ref, (gx,) = reference_grads(lambda t: reference.tv_loss(t, 2, "none"), [x], grad_out)
    assert_close(loss, ref, dtype)
    assert dx.stride() == x.stride()
    assert_close(dx, gx, dtype)
