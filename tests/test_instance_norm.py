"""instance_norm (+ ReLU, + residual) beyond the op contract (tests/test_op_contract.py runs every
flag, dtype, layout and odd shape on every backend): the reference against F.instance_norm and
by hand, stride-0 upstream gradients, split reductions, the torch backend's blocked
channels_last sums, a large mean, constant rows, determinism."""
import pytest
import torch
import torch.nn.functional as F

import fastperc
from fastperc import reference
from helpers import assert_close, backend_device_params, backends_for, make_input, reference_grads
from op_table import IN_ALL, INSTANCE_NORM, Case, check_forward_backward
from op_table import channel_vector as _param


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
        check_forward_backward(INSTANCE_NORM, "triton", "cpu", torch.float32, Case(shape, IN_ALL, layout))


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
    case = Case((2, 4096, 9, 9), IN_ALL, "channels_last")
    check_forward_backward(INSTANCE_NORM, "torch", "cpu", torch.float32, case)


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
    case = Case((2, 3, 33, 40), dict(IN_ALL, scale=0.01, offset=1000.0))
    inputs = check_forward_backward(INSTANCE_NORM, backend, device, torch.float32, case)
    # The test has teeth: the one-pass float32 formula is far off on this input.
    x32 = inputs.kwargs["x"].detach()
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


def test_instance_norm_relu_is_instance_norm_with_relu():
    x = make_input((2, 3, 4, 5))
    w, b = _param(3, "cpu"), _param(3, "cpu", seed=1)
    assert torch.equal(fastperc.instance_norm_relu(x, w, b, 1e-3), fastperc.instance_norm(x, w, b, 1e-3, relu=True))


def test_compile_fullgraph_residual_block():
    """Two fused norms in one graph, as in a residual block (norm + ReLU, then norm + the
    skip); tests/test_op_contract.py compiles one op at a time."""
    x = make_input((2, 3, 6, 5), layout="channels_last").requires_grad_(True)
    w, b = _param(3, "cpu").requires_grad_(True), _param(3, "cpu", seed=1).requires_grad_(True)
    r = make_input((2, 3, 6, 5)).requires_grad_(True)

    def block(norm, x, w, b, r):
        return norm(norm(x, w, b, relu=True), w, b, residual=r)

    y = torch.compile(lambda *t: block(fastperc.instance_norm, *t), fullgraph=True)(x, w, b, r)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w, b, r], dy)
    ref, ref_grads = reference_grads(lambda *t: block(reference.instance_norm, *t), [x, w, b, r], dy)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, ref, torch.float32)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, torch.float32)


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
