"""batch_norm / batch_norm_relu beyond the op contract (tests/test_op_contract.py runs every flag,
dtype, layout and odd shape on every backend, running statistics included): the reference and
the running statistics over several steps against F.batch_norm, half input with float32
running statistics, a large mean, float64 running statistics in eval mode."""
import pytest
import torch
import torch.nn.functional as F

import fastperc
from fastperc import reference
from helpers import assert_close, backend_device_params, make_input, reference_grads
from op_table import BATCH_NORM, BN_ALL, Case, check_forward_backward
from op_table import channel_vector as _param
from op_table import running_stats as _running

C = 3


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
    case = Case((2, C, 21, 20), dict(BN_ALL, scale=0.01, offset=1000.0, momentum=1.0), "channels_last")
    check_forward_backward(BATCH_NORM, backend, device, torch.float32, case)


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
