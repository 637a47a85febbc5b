"""batch_norm / batch_norm_relu against the float64 reference and F.batch_norm on every backend."""
import pytest
import torch
import torch.nn.functional as F

import fastperc
from fastperc import reference
from helpers import LAYOUTS, assert_close, backend_device_params, make_input, reference_grads

C = 3
# (relu, residual, training)
FLAGS = [(relu, res, training) for training in (True, False) for relu in (False, True) for res in (False, True)]
FLAG_IDS = [f"relu{int(r)}-res{int(s)}-{'train' if t else 'eval'}" for r, s, t in FLAGS]


def _param(c, device, dtype=torch.float32, seed=0, scale=0.5, offset=1.0):
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(c, generator=g, dtype=torch.float64)).to(device, dtype)


def _running(c, device, dtype=torch.float32):
    return _param(c, device, dtype, seed=2, offset=0.2), _param(c, device, dtype, seed=3, scale=0.2, offset=1.5)


def _run(backend, shape, dtype, device, layout, relu, with_residual, training, *, affine=True, scale=2.0,
         offset=0.5, momentum=0.1):
    c = shape[1]
    x = make_input(shape, dtype, device, layout, scale=scale, offset=offset).requires_grad_(True)
    w = _param(c, device).requires_grad_(True) if affine else None
    b = _param(c, device, seed=1, offset=0.1).requires_grad_(True) if affine else None
    r = make_input(shape, dtype, device, "contiguous").requires_grad_(True) if with_residual else None
    rm, rv = _running(c, device)
    rm_ref, rv_ref = rm.double().clone(), rv.double().clone()
    leaves = [t for t in (x, w, b, r) if t is not None]
    dy = make_input(shape, dtype, device, "contiguous")
    y = fastperc.batch_norm(x, w, b, rm, rv, training, momentum, relu=relu, residual=r, backend=backend)
    grads = torch.autograd.grad(y, leaves, dy)

    def spec(*args):
        it = iter(args)
        x_ = next(it)
        w_, b_ = (next(it), next(it)) if affine else (None, None)
        r_ = next(it) if with_residual else None
        return reference.batch_norm(x_, w_, b_, rm_ref, rv_ref, training, momentum, relu=relu, residual=r_)

    ref, ref_grads = reference_grads(spec, leaves, dy)
    return x, y, grads, ref, ref_grads, (rm, rv), (rm_ref, rv_ref)


def _check(x, y, grads, ref, ref_grads, running, running_ref, dtype):
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, ref, dtype, what="y")
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert_close(g, rg, dtype, what=f"grad {i}")
    assert_close(running[0], running_ref[0], torch.float32, what="running_mean")
    assert_close(running[1], running_ref[1], torch.float32, what="running_var")


@pytest.mark.parametrize("training", [True, False])
def test_reference_matches_f_batch_norm(training):
    x = make_input((3, C, 4, 5), torch.float64, offset=2.0)
    w, b = _param(C, "cpu", torch.float64), _param(C, "cpu", torch.float64, seed=1)
    r = make_input((3, C, 4, 5), torch.float64)
    rm, rv = _running(C, "cpu", torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    expected = torch.relu(F.batch_norm(x, rm2, rv2, w, b, training, 0.3, 1e-3)) + r
    y = reference.batch_norm(x, w, b, rm, rv, training, 0.3, 1e-3, relu=True, residual=r)
    assert torch.allclose(y, expected, rtol=1e-12)
    assert torch.allclose(rm, rm2, rtol=1e-12) and torch.allclose(rv, rv2, rtol=1e-12)


@pytest.mark.parametrize("relu,with_residual,training", FLAGS, ids=FLAG_IDS)
def test_reference_backward_formula_matches_autograd(relu, with_residual, training):
    x = make_input((3, C, 5, 4), torch.float64, scale=2.0)
    w, b = _param(C, "cpu", torch.float64), _param(C, "cpu", torch.float64, seed=1, offset=0.1)
    r = make_input((3, C, 5, 4), torch.float64) if with_residual else None
    rm, rv = _running(C, "cpu", torch.float64)
    dy = make_input((3, C, 5, 4), torch.float64)
    _, grads = reference_grads(
        lambda x, w, b: reference.batch_norm(x, w, b, rm.clone(), rv.clone(), training, relu=relu, residual=r),
        [x, w, b], dy)
    _, mean, var = reference.batch_norm_forward(x, w, b, r, rm, rv, training, 1e-5, relu)
    for got, want in zip(reference.batch_norm_backward(dy, x, w, b, mean, var, training, 1e-5, relu), grads):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("relu,with_residual,training", FLAGS, ids=FLAG_IDS)
def test_every_flag_and_layout(backend, device, layout, relu, with_residual, training):
    _check(*_run(backend, (2, C, 5, 7), torch.float32, device, layout, relu, with_residual, training), torch.float32)


@pytest.mark.parametrize("backend,device,dtype", backend_device_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dtypes(backend, device, dtype, layout):
    _check(*_run(backend, (3, 4, 7, 6), dtype, device, layout, True, True, True), dtype)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,training", [((3, 1, 1, 1), True), ((1, 5, 1, 1), False), ((1, 2, 1, 9), True),
                                            ((3, 37, 5, 3), True), ((2, 2, 33, 35), True)], ids=str)
def test_odd_shapes(backend, device, layout, shape, training):
    _check(*_run(backend, shape, torch.float32, device, layout, True, True, training), torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_without_affine_parameters(backend, device):
    _check(*_run(backend, (2, C, 4, 5), torch.float32, device, "channels_last", True, False, True, affine=False),
           torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
def test_running_statistics_as_f_batch_norm(backend, device, momentum):
    """Unbiased variance in the running estimate, biased in the normalisation, over several steps."""
    w, b = _param(C, device), _param(C, device, seed=1)
    rm, rv = _running(C, device)
    rm_t, rv_t = rm.clone(), rv.clone()
    for step in range(3):
        x = make_input((2, C, 3, 4), torch.float32, device, offset=step)
        y = fastperc.batch_norm_relu(x, w, b, rm, rv, True, momentum, 1e-4, backend=backend)
        expected = torch.relu(F.batch_norm(x, rm_t, rv_t, w, b, True, momentum, 1e-4))
        assert_close(y, expected, torch.float32)
        assert torch.allclose(rm, rm_t, rtol=1e-5, atol=1e-6) and torch.allclose(rv, rv_t, rtol=1e-5, atol=1e-6)
    y = fastperc.batch_norm_relu(x, w, b, rm, rv, training=False, backend=backend)
    assert_close(y, torch.relu(F.batch_norm(x, rm_t, rv_t, w, b, False)), torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_half_input_float32_running_statistics(backend, device):
    x = make_input((2, C, 5, 4), torch.float16, device, "channels_last")
    w, b = _param(C, device), _param(C, device, seed=1)
    rm, rv = _running(C, device)
    rm_t, rv_t = rm.clone(), rv.clone()
    y = fastperc.batch_norm_relu(x, w, b, rm, rv, backend=backend)
    expected = torch.relu(F.batch_norm(x.float(), rm_t, rv_t, w, b, True))
    assert y.dtype == torch.float16 and rm.dtype == torch.float32
    assert_close(y, expected, torch.float16)
    assert torch.allclose(rm, rm_t, rtol=1e-3, atol=1e-4) and torch.allclose(rv, rv_t, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_large_mean_small_spread(backend, device):
    """A mean of 1000 with a spread of 0.01 normalises correctly, and the running mean follows."""
    _check(*_run(backend, (2, C, 21, 20), torch.float32, device, "channels_last", True, True, True,
                 scale=0.01, offset=1000.0, momentum=1.0), torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_gradcheck_float64(backend, device):
    x = make_input((3, C, 2, 3), torch.float64, device, scale=2.0).requires_grad_(True)
    w = _param(C, device, torch.float64).requires_grad_(True)
    b = _param(C, device, torch.float64, seed=1, offset=0.1).requires_grad_(True)
    r = make_input((3, C, 2, 3), torch.float64, device).requires_grad_(True)
    rm, rv = _running(C, device, torch.float64)
    for training in (True, False):
        def fn(x, w, b, r):
            return fastperc.batch_norm(x, w, b, rm.clone(), rv.clone(), training, relu=True, residual=r,
                                       backend=backend)

        assert torch.autograd.gradcheck(fn, (x, w, b, r), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_opcheck(backend, device):
    x = make_input((2, C, 4, 5), torch.float32, device, "channels_last").requires_grad_(True)
    w = _param(C, device).requires_grad_(True)
    b = _param(C, device, seed=1).requires_grad_(True)
    rm, rv = _running(C, device)
    op = torch.ops.fastperc.batch_norm.default
    torch.library.opcheck(op, (x, w, b, None, None, None, True, 1e-5, True, backend))
    torch.library.opcheck(op, (x, w, None, None, rm, rv, False, 1e-5, False, backend),
                          test_utils=("test_schema", "test_faketensor"))
    y, mean, var = op(x, w, b, None, None, None, True, 1e-5, True, backend)
    torch.library.opcheck(torch.ops.fastperc.batch_norm_backward.default,
                          (torch.randn_like(y), x.detach(), w.detach(), b.detach(), mean, var, True, 1e-5, True,
                           backend), test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_updates_running_statistics():
    x = make_input((2, C, 6, 5), layout="channels_last").requires_grad_(True)
    w, b = _param(C, "cpu").requires_grad_(True), _param(C, "cpu", seed=1).requires_grad_(True)
    rm, rv = _running(C, "cpu")
    rm_eager, rv_eager = rm.clone(), rv.clone()

    def step(x, w, b, rm, rv):
        return fastperc.batch_norm_relu(x, w, b, rm, rv, True, 0.25)

    compiled = torch.compile(step, fullgraph=True)
    y = compiled(x, w, b, rm, rv)
    y_eager = step(x, w, b, rm_eager, rv_eager)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w, b], dy)
    grads_eager = torch.autograd.grad(y_eager, [x, w, b], dy)
    assert torch.allclose(y, y_eager, rtol=1e-6, atol=1e-6)
    for g, ge in zip(grads, grads_eager):
        assert torch.allclose(g, ge, rtol=1e-5, atol=1e-6)
    assert torch.allclose(rm, rm_eager) and torch.allclose(rv, rv_eager)
    assert not torch.allclose(rm, _running(C, "cpu")[0])


_X = torch.randn(2, C, 4, 5)
_RM, _RV = torch.zeros(C), torch.ones(C)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.randn(2, C, 4),), {}, ValueError, r"x: expected a 4-D tensor"),
        ((torch.ones(2, C, 4, 5, dtype=torch.int64),), {}, TypeError, "x: expected a floating-point"),
        ((_X, torch.randn(C + 1)), {}, ValueError, r"weight: expected shape \(3,\)"),
        ((_X, None, torch.randn(C - 1)), {}, ValueError, r"bias: expected shape \(3,\)"),
        ((_X, None, None, torch.zeros(4), torch.ones(4)), {}, ValueError, r"running_mean: expected shape \(3,\)"),
        ((_X, None, None, _RM), {}, ValueError, "running_mean, running_var: expected both or neither"),
        ((_X, None, None, None, None, False), {}, ValueError, "required when training=False"),
        ((_X,), {"residual": torch.randn(2, C, 5, 4)}, ValueError, "residual: expected the shape of x"),
        ((_X,), {"eps": 0.0}, ValueError, "eps: expected a finite number > 0"),
        ((_X,), {"eps": -1.0}, ValueError, "eps: expected a finite number > 0"),
        ((_X, None, None, _RM, _RV, True, None), {}, ValueError, "momentum: None .* use fastperc.nn.BatchNorm2d"),
        ((_X, None, None, _RM, _RV, True, 1.5), {}, ValueError, r"momentum: expected a number in \[0, 1\]"),
        ((_X,), {"training": 1}, TypeError, "training: expected a bool"),
        ((torch.randn(1, C, 1, 1),), {}, ValueError, "expected more than 1 value per channel when training"),
    ],
)
def test_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastperc.batch_norm(*args, **kwargs)


def _float64_running_statistics_params() -> list:
    params = backend_device_params(with_dtype=False)
    if "cuda" in fastperc.available_backends():
        params.append(pytest.param("cuda", "cuda", id="cuda-cuda"))
    return params


@pytest.mark.parametrize("backend,device", _float64_running_statistics_params())
def test_eval_float64_running_statistics_keep_their_low_word(backend, device):
    """Eval mode with float64 running statistics and a float32 input: the running mean is
    1000 + δ with δ below float32's resolution there (6e-5) and the data spread 1e-3 around it,
    so rounding the mean to float32 moves x̂ by about 1%. Every backend keeps the low word
    (fastperc.rules.running_stats) and matches the float64 reference, forward and dweight."""
    g = torch.Generator().manual_seed(0)
    mean = 1000 + torch.tensor([1.3e-5, 2.2e-5, -3.1e-5], dtype=torch.float64)
    var = torch.tensor([1e-6, 4e-6, 2e-6], dtype=torch.float64)
    x = (mean.reshape(1, C, 1, 1) + 1e-3 * torch.randn(2, C, 4, 5, dtype=torch.float64, generator=g)).float()
    weight = (1 + 0.1 * torch.randn(C, generator=g)).requires_grad_(True)
    rm, rv, xd = mean.to(device), var.to(device), x.to(device)
    wd = weight.detach().to(device).requires_grad_(True)
    y = fastperc.batch_norm(xd, wd, None, rm, rv, training=False, eps=1e-8, backend=backend)
    dy = make_input(tuple(x.shape), torch.float32, device)
    y.backward(dy)
    ref, (dw_ref,) = reference_grads(
        lambda w: reference.batch_norm(x.double(), w, None, mean, var, training=False, eps=1e-8), [weight], dy.cpu())
    assert_close(y.cpu(), ref, torch.float32, what="y")
    assert_close(wd.grad.cpu(), dw_ref, torch.float32, what="dweight")
