"""instance_norm (+ ReLU, + residual) against the float64 reference on every available backend."""
import pytest
import torch
import torch.nn.functional as F

import fastperc
from fastperc import reference
from helpers import (LAYOUTS, assert_close, backend_device_params, backends_for, make_input,
                     reference_grads)

# (relu, residual, affine): every combination of the fused steps, with and without γ and β.
FLAGS = [(relu, res, affine) for affine in (True, False) for relu in (False, True) for res in (False, True)]
FLAG_IDS = [f"relu{int(r)}-res{int(s)}-affine{int(a)}" for r, s, a in FLAGS]
# Odd sizes: batch 1, one channel, one row or column (H·W = 2 would make dx ≈ 0, all cancellation), sizes off the power-of-two tiles, more
# channels than a channels_last tile, a row longer than a tile.
SHAPES = [(1, 1, 3, 1), (2, 3, 1, 7), (1, 5, 17, 19), (2, 37, 3, 5), (1, 2, 37, 41)]


def _param(c, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)).to(device, dtype)


def _run(backend, shape, dtype, device, layout, relu, with_residual, affine, *, scale=2.0, offset=0.5):
    """Forward and backward through the op; returns outputs, grads and the float64 oracle."""
    torch.manual_seed(0)
    c = shape[1]
    x = make_input(shape, dtype, device, layout, scale=scale, offset=offset).requires_grad_(True)
    leaves = [x]
    w = b = r = None
    if affine:
        w = _param(c, device).requires_grad_(True)
        b = (0.3 * _param(c, device, seed=1)).requires_grad_(True)
        leaves += [w, b]
    if with_residual:
        r = make_input(shape, dtype, device, "contiguous").requires_grad_(True)
        leaves.append(r)
    dy = make_input(shape, dtype, device, "contiguous")
    y = fastperc.instance_norm(x, w, b, relu=relu, residual=r, backend=backend)
    grads = torch.autograd.grad(y, leaves, dy)

    def spec(x, *rest):
        it = iter(rest)
        w_, b_ = (next(it), next(it)) if affine else (None, None)
        r_ = next(it) if with_residual else None
        return reference.instance_norm(x, w_, b_, relu=relu, residual=r_)

    ref, ref_grads = reference_grads(spec, leaves, dy)
    return x, y, grads, ref, ref_grads


def _check(x, y, grads, ref, ref_grads, dtype, names=("x", "weight", "bias", "residual")):
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, ref, dtype, what="y")
    for name, g, rg in zip(names, grads, ref_grads):
        assert_close(g, rg, dtype, what=f"grad {name}")


def test_reference_matches_independent_formula():
    x = make_input((2, 3, 4, 5), torch.float64, offset=3.0)
    w, b = _param(3, "cpu", torch.float64), _param(3, "cpu", torch.float64, seed=1)
    r = make_input((2, 3, 4, 5), torch.float64)
    expected = torch.relu(F.instance_norm(x, weight=w, bias=b, eps=1e-5)) + r
    assert torch.allclose(reference.instance_norm(x, w, b, 1e-5, relu=True, residual=r), expected, rtol=1e-12)
    # Per (n, c), by hand.
    y = reference.instance_norm(x, w, b, 1e-3)
    for n in range(2):
        for c in range(3):
            v = x[n, c]
            by_hand = w[c] * (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-3) + b[c]
            assert torch.allclose(y[n, c], by_hand, rtol=1e-12)


@pytest.mark.parametrize("relu,with_residual,affine", FLAGS, ids=FLAG_IDS)
def test_reference_backward_formula_matches_autograd(relu, with_residual, affine):
    x = make_input((2, 3, 5, 4), torch.float64, scale=2.0)
    w, b = (_param(3, "cpu", torch.float64), _param(3, "cpu", torch.float64, seed=1)) if affine else (None, None)
    r = make_input((2, 3, 5, 4), torch.float64) if with_residual else None
    dy = make_input((2, 3, 5, 4), torch.float64)
    leaves = [x] + ([w, b] if affine else [])
    _, grads = reference_grads(lambda x, *wb: reference.instance_norm(x, *(wb or (None, None)), relu=relu,
                                                                       residual=r), leaves, dy)
    y, mean, rstd = reference.instance_norm_forward(x, w, b, r, 1e-5, relu)
    dx, dw, db = reference.instance_norm_backward(dy, x, w, b, mean, rstd, relu)
    assert torch.allclose(dx, grads[0], rtol=1e-10, atol=1e-12)
    if affine:
        assert torch.allclose(dw, grads[1], rtol=1e-10, atol=1e-12)
        assert torch.allclose(db, grads[2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("relu,with_residual,affine", FLAGS, ids=FLAG_IDS)
def test_every_flag_and_layout(backend, device, layout, relu, with_residual, affine):
    x, y, grads, ref, ref_grads = _run(backend, (2, 3, 5, 7), torch.float32, device, layout, relu, with_residual,
                                       affine)
    _check(x, y, grads, ref, ref_grads, torch.float32,
           names=["x"] + (["weight", "bias"] if affine else []) + (["residual"] if with_residual else []))


@pytest.mark.parametrize("backend,device,dtype", backend_device_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dtypes(backend, device, dtype, layout):
    x, y, grads, ref, ref_grads = _run(backend, (2, 4, 9, 6), dtype, device, layout, True, True, True)
    _check(x, y, grads, ref, ref_grads, dtype)
    assert grads[1].dtype == torch.float32  # parameter gradients in the parameters' dtype


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_odd_shapes(backend, device, layout, shape):
    x, y, grads, ref, ref_grads = _run(backend, shape, torch.float32, device, layout, True, True, True)
    _check(x, y, grads, ref, ref_grads, torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_output_keeps_the_memory_format(backend, device, layout):
    x = make_input((2, 5, 4, 3), torch.float32, device, layout).requires_grad_(True)
    y = fastperc.instance_norm(x, relu=True, backend=backend)
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    expected = torch.empty_like(x).stride()
    assert y.stride() == expected and dx.stride() == expected


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
@pytest.mark.parametrize("relu", [False, True])
def test_expanded_upstream_gradient(backend, device, relu):
    """y.sum().backward() hands the backward a stride-0 dy; dx still has x's layout."""
    x = make_input((2, 3, 5, 4), torch.float32, device, "channels_last").requires_grad_(True)
    w = _param(3, device).requires_grad_(True)
    r = make_input((2, 3, 5, 4), torch.float32, device).requires_grad_(True)
    fastperc.instance_norm(x, w, None, relu=relu, residual=r, backend=backend).sum().backward()
    _, ref_grads = reference_grads(lambda x, w, r: reference.instance_norm(x, w, None, relu=relu, residual=r),
                                   [x, w, r])
    assert x.grad.stride() == x.stride()
    for g, rg in zip([x.grad, w.grad, r.grad], ref_grads):
        assert torch.allclose(g.double(), rg, atol=1e-5)


def test_split_reductions_are_exercised_and_correct():
    """Shapes whose rows the Triton kernels split over several programs, each over several tiles."""
    if "triton" not in backends_for("cpu"):
        pytest.skip("needs triton (TRITON_INTERPRET=1 on a machine without a GPU)")
    from fastperc.kernels import norm as kernels
    from fastperc.rules import device_facts

    for shape, layout in [((1, 1, 100, 100), "contiguous"), ((1, 3, 60, 60), "channels_last")]:
        n, c, h, w = shape
        pl = kernels.plan(n, c, h * w, layout != "contiguous", device_facts(torch.device("cpu")), per_sample=True)
        assert pl.splits > 1 and pl.chunk > pl.block_s, (shape, layout)
        x, y, grads, ref, ref_grads = _run("triton", shape, torch.float32, "cpu", layout, True, True, True)
        _check(x, y, grads, ref, ref_grads, torch.float32)


@pytest.mark.parametrize("per_sample", [True, False], ids=["instance", "batch"])
def test_torch_channels_last_sum_of_squares_over_several_blocks(per_sample):
    """The torch backend sums squares of channels_last data in blocks of 2^18 elements: with
    4096 channels a block is 64 pixels, so 81 pixels per image take a full and a partial one."""
    from fastperc.torch_backend.norm import _sum_of_squares

    d = make_input((2, 4096, 9, 9), torch.float32, "cpu", "channels_last")
    got = _sum_of_squares(d, per_sample)
    dims = (2, 3) if per_sample else (0, 2, 3)
    want = d.double().square().sum(dim=dims, keepdim=True)
    assert got.shape == ((2, 4096, 1, 1) if per_sample else (1, 4096, 1, 1))
    assert_close(got, want, torch.float32)


def test_torch_channels_last_instance_norm_over_several_blocks():
    x, y, grads, ref, ref_grads = _run("torch", (2, 4096, 9, 9), torch.float32, "cpu", "channels_last",
                                       True, True, True)
    _check(x, y, grads, ref, ref_grads, torch.float32)


@pytest.mark.parametrize("shape,channels_last", [((4, 32, 256, 256), False), ((4, 32, 256, 256), True),
                                                 ((4, 64, 128, 128), False), ((4, 128, 64, 64), True),
                                                 ((1, 3, 2160, 3840), False), ((8, 7, 5, 3), False)])
def test_split_plan_fills_an_h200(shape, channels_last):
    """The split is chosen from the shape: a few programs per SM, each a whole number of tiles."""
    pytest.importorskip("triton")
    from fastperc.kernels.norm import PROGRAMS_PER_SM, plan
    from fastperc.rules import H200

    n, c, h, w = shape
    pl = plan(n, c, h * w, channels_last, H200, per_sample=True)
    block_s, chunk, splits = pl.block_s, pl.chunk, pl.splits
    assert pl.block_c * block_s <= 4096 and chunk % block_s == 0
    assert (splits - 1) * chunk < h * w <= splits * chunk  # the chunks tile each row exactly
    programs = n * pl.c_blocks * splits
    assert pl.partial_grid == (programs,) and pl.apply_grid == (n * pl.c_blocks * pl.s_blocks,)
    # About PROGRAMS_PER_SM programs per SM (equal chunks round it down), unless every tile has its own.
    assert programs >= PROGRAMS_PER_SM * 132 // 2 or splits == -(-h * w // block_s)
    assert splits == 1 or programs <= 2 * PROGRAMS_PER_SM * 132  # and no more split than that needs


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_large_mean_small_spread(backend, device):
    """A mean of 1000 with a spread of 0.01: E[x²] − E[x]² would lose every digit in float32."""
    shape = (2, 3, 33, 40)
    x, y, grads, ref, ref_grads = _run(backend, shape, torch.float32, device, "contiguous", True, True, True,
                                       scale=0.01, offset=1000.0)
    _check(x, y, grads, ref, ref_grads, torch.float32)
    # The test has teeth: the one-pass float32 formula is far off on this input.
    x32 = x.detach()
    naive_var = (x32 * x32).mean(dim=(2, 3), keepdim=True) - x32.mean(dim=(2, 3), keepdim=True) ** 2
    true_var = x32.double().var(dim=(2, 3), unbiased=False, keepdim=True)
    assert ((naive_var.double() - true_var).abs() / true_var).max() > 0.5


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_constant_rows_give_beta(backend, device):
    """Zero variance: x̂ = 0, so y = relu?(β) and the gradient stays finite."""
    x = torch.full((2, 3, 4, 5), 7.25, device=device).requires_grad_(True)
    w, b = _param(3, device).requires_grad_(True), torch.tensor([0.5, -0.5, 2.0], device=device).requires_grad_(True)
    y = fastperc.instance_norm(x, w, b, relu=True, backend=backend)
    assert torch.equal(y, torch.relu(b).reshape(1, 3, 1, 1).expand_as(y))
    dy = make_input((2, 3, 4, 5), torch.float32, device)
    grads = torch.autograd.grad(y, [x, w, b], dy)
    _, ref_grads = reference_grads(lambda x, w, b: reference.instance_norm(x, w, b, relu=True), [x, w, b], dy)
    for g, rg in zip(grads, ref_grads):
        assert torch.allclose(g.double(), rg, atol=1e-4)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_half_input_with_float32_parameters(backend, device):
    """Under autocast the activations are half and the module's parameters float32."""
    x = make_input((2, 3, 6, 5), torch.float16, device).requires_grad_(True)
    w, b = _param(3, device).requires_grad_(True), _param(3, device, seed=1).requires_grad_(True)
    y = fastperc.instance_norm_relu(x, w, b, backend=backend)
    grads = torch.autograd.grad(y, [x, w, b], torch.ones_like(y))
    assert y.dtype == torch.float16 and grads[0].dtype == torch.float16 and grads[1].dtype == torch.float32
    ref, ref_grads = reference_grads(lambda x, w, b: reference.instance_norm(x, w, b, relu=True), [x, w, b],
                                     torch.ones_like(y))
    assert_close(y, ref, torch.float16)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, torch.float16)


def test_instance_norm_relu_is_instance_norm_with_relu():
    x = make_input((2, 3, 4, 5))
    w, b = _param(3, "cpu"), _param(3, "cpu", seed=1)
    assert torch.equal(fastperc.instance_norm_relu(x, w, b, 1e-3), fastperc.instance_norm(x, w, b, 1e-3, relu=True))


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_deterministic(backend, device):
    x = make_input((2, 3, 40, 30), torch.float32, device).requires_grad_(True)
    w = _param(3, device).requires_grad_(True)
    dy = make_input((2, 3, 40, 30), torch.float32, device)
    runs = []
    for _ in range(2):
        y = fastperc.instance_norm(x, w, None, relu=True, backend=backend)
        runs.append((y, *torch.autograd.grad(y, [x, w], dy)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_gradcheck_float64(backend, device):
    x = make_input((2, 3, 4, 3), torch.float64, device, scale=2.0).requires_grad_(True)
    w = _param(3, device, torch.float64).requires_grad_(True)
    b = _param(3, device, torch.float64, seed=1).requires_grad_(True)
    r = make_input((2, 3, 4, 3), torch.float64, device).requires_grad_(True)

    def fn(x, w, b, r):
        return fastperc.instance_norm(x, w, b, relu=True, residual=r, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, b, r), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_opcheck(backend, device):
    x = make_input((2, 3, 4, 5), torch.float32, device, "channels_last").requires_grad_(True)
    w = _param(3, device).requires_grad_(True)
    r = make_input((2, 3, 4, 5), torch.float32, device).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastperc.instance_norm.default, (x, w, None, r, 1e-5, True, backend))
    y, mean, rstd = torch.ops.fastperc.instance_norm(x, w, None, r, 1e-5, True, backend)
    torch.library.opcheck(torch.ops.fastperc.instance_norm_backward.default,
                          (torch.randn_like(y), x.detach(), w.detach(), None, mean, rstd, True, backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_forward_backward():
    x = make_input((2, 3, 6, 5), layout="channels_last").requires_grad_(True)
    w, b = _param(3, "cpu").requires_grad_(True), _param(3, "cpu", seed=1).requires_grad_(True)
    r = make_input((2, 3, 6, 5)).requires_grad_(True)

    def block(x, w, b, r):
        h = fastperc.instance_norm(x, w, b, relu=True)
        return fastperc.instance_norm(h, w, b, residual=r)

    compiled = torch.compile(block, fullgraph=True)
    y = compiled(x, w, b, r)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w, b, r], dy)
    ref, ref_grads = reference_grads(
        lambda x, w, b, r: reference.instance_norm(reference.instance_norm(x, w, b, relu=True), w, b, residual=r),
        [x, w, b, r], dy)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, ref, torch.float32)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, torch.float32)


_X = torch.randn(2, 3, 4, 5)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.randn(3, 4, 5),), {}, ValueError, r"x: expected a 4-D tensor"),
        ((torch.ones(2, 3, 4, 5, dtype=torch.int32),), {}, TypeError, "x: expected a floating-point"),
        ((_X, torch.randn(4)), {}, ValueError, r"weight: expected shape \(3,\).*got \(4,\)"),
        ((_X, None, torch.randn(2)), {}, ValueError, r"bias: expected shape \(3,\).*got \(2,\)"),
        ((_X, torch.randn(3, 1)), {}, ValueError, r"weight: expected shape \(3,\) or \(2, 3\).*got \(3, 1\)"),
        ((_X,), {"residual": torch.randn(2, 3, 4, 6)}, ValueError, r"residual: expected the shape of x"),
        ((_X,), {"residual": torch.randn(2, 3, 4, 5, dtype=torch.float64)}, TypeError,
         "residual: expected the dtype of x"),
        ((_X, None, None, 0.0), {}, ValueError, "eps: expected a finite number > 0, got 0.0"),
        ((_X, None, None, -1e-5), {}, ValueError, "eps: expected a finite number > 0"),
        ((_X, None, None, float("nan")), {}, ValueError, "eps: expected a finite number > 0"),
        ((_X,), {"relu": 1}, TypeError, "relu: expected a bool"),
        ((torch.randn(2, 3, 1, 1),), {}, ValueError, "x: expected more than 1 spatial element"),
        ((torch.randn(0, 3, 4, 5),), {}, ValueError, "x: expected a non-empty"),
    ],
)
def test_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastperc.instance_norm(*args, **kwargs)



def test_autocast_casts_a_residual_of_another_dtype():
    x = make_input((2, 3, 4, 5), torch.float32, "cpu").requires_grad_(True)
    skip = make_input((2, 3, 4, 5), torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.nn.functional.conv2d(x, torch.eye(3).view(3, 3, 1, 1))  # bf16
        y = fastperc.instance_norm(h, residual=skip)
    assert y.dtype == torch.bfloat16
    ref = reference.instance_norm(h.detach().double(), residual=skip.to(torch.bfloat16).double())
    assert_close(y, ref, torch.bfloat16)
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
