"""tv_loss against the float64 reference on every available backend, and the Triton launchers'
tiling (several row and column blocks, row loops, both memory formats) directly."""
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

REDUCTIONS = ("none", "sum", "mean")
# H = 1, W = 1, H = W = 1 (no neighbours at all), sizes not multiples of any block, C = 1.
SHAPES = [(2, 3, 5, 7), (1, 3, 1, 6), (1, 3, 6, 1), (2, 2, 1, 1), (2, 3, 17, 19), (1, 1, 9, 8)]
# Several row blocks and column blocks of the Triton tiles in both memory formats, fp32 and fp16
# (checked in test_large_shape_spans_several_tiles_on_each_axis).
LARGE = (1, 2, 9, 520)


def _kernels():
    import fastperc.kernels.tv_loss as kernels

    return kernels


def _grad_out(reduction, n, device, seed=0):
    """A per-image gradient for "none" (distinct values, so a wrong image index shows)."""
    if reduction == "none":
        g = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
        return g.to(device=device, dtype=torch.float32)
    return torch.tensor(1.7, device=device)


def _check(backend, device, dtype, layout, shape, p, reduction):
    x = make_input(shape, dtype, device, layout, scale=2.0, offset=0.5).requires_grad_(True)
    loss = fastperc.tv_loss(x, p, reduction, backend=backend)
    assert loss.dtype == torch.float32
    assert loss.shape == ((shape[0],) if reduction == "none" else ())
    grad_out = _grad_out(reduction, shape[0], device)
    # autograd.grad hands back the op's own dx (x.grad would be restrided to x's layout).
    (dx,) = torch.autograd.grad(loss, x, grad_out)
    ref, (gx,) = reference_grads(lambda t: reference.tv_loss(t, p, reduction), [x], grad_out)
    assert_close(loss, ref, dtype, what="loss")
    assert dx.dtype == dtype
    assert dx.stride() == torch.empty_like(x).stride(), "dx is not laid out as its fake impl says"
    assert_close(dx, gx, dtype, what="grad x")


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


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 3, 1, 6), (3, 2, 6, 1), (1, 2, 1, 1)], ids=str)
def test_reference_backward_matches_autograd(p, reduction, shape):
    x = make_input(shape, torch.float64, layout="channels_last")
    g = _grad_out(reduction, shape[0], "cpu").double()
    _, (gx,) = reference_grads(lambda t: reference.tv_loss(t, p, reduction), [x], g)
    dx = reference.tv_loss_backward(g, x, p, reduction)
    assert dx.stride() == x.stride()
    assert_close(dx, gx, torch.float64)


@pytest.mark.parametrize("backend,device,dtype", backend_device_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", [1, 2])
def test_forward_backward(backend, device, dtype, layout, shape, p):
    """reduction "none" with a distinct gradient per image: the general case of the scale."""
    _check(backend, device, dtype, layout, shape, p, "none")


@pytest.mark.parametrize("backend,device,dtype", backend_device_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reductions(backend, device, dtype, layout, p, reduction):
    _check(backend, device, dtype, layout, (2, 2, 5, 7), p, reduction)


@pytest.mark.parametrize("backend,device,dtype", backend_device_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("p", [1, 2])
def test_large_shape(backend, device, dtype, layout, p):
    _check(backend, device, dtype, layout, LARGE, p, "mean" if p == 1 else "none")


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


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(backend, device, p, reduction):
    x = make_input((2, 2, 3, 4), torch.float64, device, generator=torch.Generator().manual_seed(5))
    if p == 1:  # |d| is not differentiable at 0: keep every difference away from the kink
        for dim in (2, 3):
            assert x.diff(dim=dim).abs().min() > 1e-3
    x.requires_grad_(True)
    # The interpreted kernels take ~30 ms a launch: check a random projection there.
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(
        lambda t: fastperc.tv_loss(t, p, reduction, backend=backend), (x,), fast_mode=fast
    )


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_opcheck(backend, device):
    x = make_input((2, 3, 4, 5), torch.float32, device, "channels_last").requires_grad_(True)
    torch.library.opcheck(torch.ops.fastperc.tv_loss.default, (x, 2, "none", backend))
    torch.library.opcheck(torch.ops.fastperc.tv_loss.default, (x, 1, "mean", backend))
    g = _grad_out("none", 2, device)
    torch.library.opcheck(torch.ops.fastperc.tv_loss_backward.default, (g, x.detach(), 1, "none", backend))


def test_compile_fullgraph_forward_backward():
    x = make_input((2, 3, 6, 5)).requires_grad_(True)

    def f(t, tv):
        return tv(t, 2) + 0.25 * (tv(t, 1, "none") * torch.tensor([1.0, 2.0])).sum()

    compiled = torch.compile(lambda t: f(t, fastperc.tv_loss), fullgraph=True)
    loss = compiled(x)
    loss.backward()
    ref, (gx,) = reference_grads(lambda t: f(t, reference.tv_loss), [x])
    assert_close(loss, ref, torch.float32)
    assert_close(x.grad, gx, torch.float32)


def test_autocast_bf16_inputs_give_float32_loss():
    x = make_input((2, 3, 6, 5)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.conv2d(x, torch.ones(3, 3, 1, 1) / 3)
        loss = fastperc.tv_loss(y)
    assert y.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_float64_input_gives_float64_loss():
    x = make_input((2, 3, 4, 5), torch.float64)
    for backend in fastperc.available_backends():
        if backend == "cuda":
            continue
        dev = TRITON_DEVICE if backend == "triton" else "cpu"
        assert fastperc.tv_loss(x.to(dev), backend=backend).dtype == torch.float64


@pytest.mark.parametrize(
    "x,kwargs,error,match",
    [
        (torch.randn(3, 4, 5), {}, ValueError, r"x: expected a 4-D tensor \(N, C, H, W\), got shape \(3, 4, 5\)"),
        (torch.randn(1, 2, 3, 4, 5), {}, ValueError, "x: expected a 4-D tensor"),
        (torch.randn(0, 3, 4, 5), {}, ValueError, "x: expected a non-empty"),
        (torch.ones(1, 3, 4, 5, dtype=torch.int64), {}, TypeError, "x: expected a floating-point tensor .* got dtype torch.int64"),
        (torch.ones(1, 3, 4, 5, dtype=torch.bool), {}, TypeError, "x: expected a floating-point tensor .* got dtype torch.bool"),
        ([[1.0]], {}, TypeError, "x: expected a torch.Tensor, got list"),
        (torch.randn(1, 3, 4, 5), {"p": 3}, ValueError, r"p: expected the int 1 or 2, got 3 \(int\)"),
        (torch.randn(1, 3, 4, 5), {"p": 0}, ValueError, "p: expected the int 1 or 2, got 0"),
        (torch.randn(1, 3, 4, 5), {"p": True}, ValueError, r"p: expected the int 1 or 2, got True \(bool\)"),
        (torch.randn(1, 3, 4, 5), {"p": 2.0}, ValueError, r"p: expected the int 1 or 2, got 2.0 \(float\)"),
        (torch.randn(1, 3, 4, 5), {"p": "2"}, ValueError, "p: expected the int 1 or 2, got '2'"),
        (torch.randn(1, 3, 4, 5), {"reduction": "avg"}, ValueError,
         r"reduction: expected one of \['none', 'sum', 'mean'\], got 'avg'"),
        (torch.randn(1, 3, 4, 5), {"reduction": None}, ValueError, "reduction: expected one of .* got None"),
        (torch.randn(1, 3, 4, 5), {"backend": "tpu"}, ValueError, "backend: expected one of the available backends"),
    ],
)
def test_bad_inputs(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastperc.tv_loss(x, **kwargs)


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
