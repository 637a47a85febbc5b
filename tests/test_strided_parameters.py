"""Weights, biases and targets given as strided or expanded (stride-0) views: every backend
must read them by their strides (review finding: the Triton norm and upsample kernels once
indexed weight and bias as if contiguous)."""
import pytest
import torch

import fastperc
from fastperc import reference
from helpers import assert_close, backend_device_params, make_input, tolerance

PARAMS = backend_device_params(with_dtype=False)


def _every_other(c, device, scale=1.0):
    return (torch.randn(2 * c, dtype=torch.float64) * scale + 1.0).to(device)[::2]


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("kind", ["instance", "batch"])
def test_norm_with_strided_and_expanded_parameters(backend, device, kind):
    x = make_input((2, 4, 5, 6), torch.float32, device)
    for weight, bias in [(_every_other(4, device).float(), _every_other(4, device, 0.1).float()),
                         (torch.full((1,), 2.0, device=device).expand(4), torch.full((1,), 0.5, device=device).expand(4))]:
        w = weight.detach().requires_grad_(True)
        if kind == "instance":
            got = fastperc.instance_norm(x, w, bias, relu=True, backend=backend)
            ref = reference.instance_norm(x.double(), w.double(), bias.double(), relu=True)
        else:
            got = fastperc.batch_norm(x, w, bias, relu=True, backend=backend)
            ref = reference.batch_norm(x.double(), w.double(), bias.double(), None, None, True, 0.1, 1e-5, relu=True)
        assert_close(got, ref, torch.float32, what=f"{kind} norm, weight strides {weight.stride()}")
        got.sum().backward()
        assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("op", ["upsample_conv2d", "conv_transpose2d"])
def test_conv_with_a_strided_bias(backend, device, op):
    x = make_input((1, 3, 4, 5), torch.float32, device)
    w_shape = (2, 3, 3, 3) if op == "upsample_conv2d" else (3, 2, 3, 3)
    w = make_input(w_shape, torch.float32, device)
    bias = _every_other(2, device).float()
    got = getattr(fastperc, op)(x, w, bias, backend=backend)
    ref = getattr(reference, op)(x.double(), w.double(), bias.double())
    # On CUDA the reference and torch backends run cuDNN, in TF32 by default.
    assert_close(got, ref, torch.float32, tol=tolerance(torch.float32, device, op=op, backend=backend), what=op)
