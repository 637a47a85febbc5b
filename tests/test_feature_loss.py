"""feature_loss against the float64 reference on every available backend."""
import pytest
import torch

import fastperc
from fastperc import reference
from helpers import LAYOUTS, assert_close, backend_device_params, make_input, reference_grads

SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (1, 64, 9, 11), (3, 5, 67, 13)]


def test_reference_matches_independent_formula():
    a, b = make_input((2, 3, 4, 5), torch.float64), make_input((2, 3, 4, 5), torch.float64)
    by_loops = sum(((a[n] - b[n]) ** 2).sum() / (3 * 4 * 5) for n in range(2)) / 2
    assert torch.allclose(reference.feature_loss(a, b), by_loops, rtol=1e-12)


@pytest.mark.parametrize("backend,device,dtype", backend_device_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(backend, device, dtype, layout, shape):
    a = make_input(shape, dtype, device, layout, scale=3.0).requires_grad_(True)
    b = make_input(shape, dtype, device, "contiguous", offset=0.5).requires_grad_(True)
    grad_out = torch.tensor(1.7, device=device)
    loss = fastperc.feature_loss(a, b, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward(grad_out)
    ref, (ga, gb) = reference_grads(reference.feature_loss, [a, b], grad_out)
    assert_close(loss, ref, dtype, what="loss")
    assert a.grad.dtype == dtype
    assert_close(a.grad, ga, dtype, what="grad a")
    assert_close(b.grad, gb, dtype, what="grad b")


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_gradcheck_float64(backend, device):
    a = make_input((2, 3, 4, 5), torch.float64, device).requires_grad_(True)
    b = make_input((2, 3, 4, 5), torch.float64, device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: fastperc.feature_loss(a, b, backend=backend), (a, b))


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_opcheck(backend, device):
    a = make_input((2, 3, 4, 5), torch.float32, device).requires_grad_(True)
    b = make_input((2, 3, 4, 5), torch.float32, device)
    torch.library.opcheck(torch.ops.fastperc.feature_loss.default, (a, b, backend))
    g = torch.tensor(0.5, device=device)
    torch.library.opcheck(torch.ops.fastperc.feature_loss_backward.default, (g, a.detach(), b, backend))


def test_compile_fullgraph_forward_backward():
    a = make_input((2, 3, 6, 5)).requires_grad_(True)
    b = make_input((2, 3, 6, 5))
    compiled = torch.compile(lambda a, b: 3.0 * fastperc.feature_loss(a, b), fullgraph=True)
    loss = compiled(a, b)
    loss.backward()
    ref, (ga, _) = reference_grads(lambda a, b: 3.0 * reference.feature_loss(a, b), [a, b])
    assert_close(loss, ref, torch.float32)
    assert_close(a.grad, ga, torch.float32)


def test_autocast_bf16_inputs_give_float32_loss():
    a = make_input((2, 3, 6, 5)).requires_grad_(True)
    b = make_input((2, 3, 6, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fa = torch.nn.functional.conv2d(a, torch.ones(3, 3, 1, 1) / 3)
        fb = torch.nn.functional.conv2d(b, torch.ones(3, 3, 1, 1) / 3)
        loss = fastperc.feature_loss(fa, fb)
    assert fa.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


@pytest.mark.parametrize(
    "a,b,error,match",
    [
        (torch.randn(3, 4, 5), torch.randn(3, 4, 5), ValueError, "a: expected a 4-D tensor"),
        (torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 6), ValueError, r"b: expected the shape of a \(1, 3, 4, 5\)"),
        (torch.ones(1, 3, 4, 5, dtype=torch.int64), torch.randn(1, 3, 4, 5), TypeError, "a: expected a floating-point"),
        (torch.randn(1, 3, 4, 5), torch.ones(1, 3, 4, 5, dtype=torch.bool), TypeError, "b: expected a floating-point"),
        (torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5, dtype=torch.float64), TypeError, "b: expected the dtype of a"),
        (torch.randn(0, 3, 4, 5), torch.randn(0, 3, 4, 5), ValueError, "a: expected a non-empty"),
        ([1.0], torch.randn(1, 3, 4, 5), TypeError, "a: expected a torch.Tensor, got list"),
    ],
)
def test_bad_inputs(a, b, error, match):
    with pytest.raises(error, match=match):
        fastperc.feature_loss(a, b)


def test_autocast_promotes_mixed_dtypes():
    a = make_input((2, 3, 6, 5)).requires_grad_(True)
    b = make_input((2, 3, 6, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fa = torch.nn.functional.conv2d(a, torch.ones(3, 3, 1, 1) / 3)  # bf16 under autocast
        loss = fastperc.feature_loss(fa, b)
    ref = reference.feature_loss(fa.detach().double(), b.double())
    assert_close(loss, ref, torch.float32)
    loss.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_gradient_layout_matches_the_fake_implementation(backend, device):
    """A dense but permuted input: the gradient is laid out as torch.empty_like(a) promises."""
    a = make_input((2, 3, 5, 4), torch.float32, device).transpose(2, 3)
    b = make_input((2, 3, 4, 5), torch.float32, device)
    g = torch.tensor(1.5, device=device)
    got = torch.ops.fastperc.feature_loss_backward(g, a, b, backend)
    assert got.stride() == torch.empty_like(a).stride()
    assert_close(got, reference.feature_loss_backward(g.double(), a.double(), b.double()), torch.float32)
