"""upsample_conv2d (nearest x2, reflection pad 1, 3x3 conv) against its plain definition
in float64 on every available backend, forward and backward."""
import pytest
import torch

import fastperc
from helpers import TRITON_DEVICE, backend_device_params, needs_triton
from upsample_helpers import (
    MULTI_TILE_SHAPE,
    UPSAMPLE,
    bad_input_params,
    check_autocast_bf16,
    check_compile_fullgraph,
    check_edge_sizes_exact,
    check_forward_backward,
    check_gradcheck,
    check_only_requested_gradients,
    check_opcheck,
    check_reference_backward,
    check_stats,
    forward_backward_params,
)


def test_reference_backward_formulas():
    check_reference_backward(UPSAMPLE)


def test_torch_phase_decomposition_exact_at_edge_sizes():
    check_edge_sizes_exact(UPSAMPLE, "torch")


@pytest.mark.parametrize("backend,device,dtype,shape,layout,bias", forward_backward_params())
def test_forward_backward(backend, device, dtype, shape, layout, bias):
    check_forward_backward(UPSAMPLE, backend, device, dtype, shape, layout, bias)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_only_requested_gradients(backend, device):
    check_only_requested_gradients(UPSAMPLE, backend, device)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_gradcheck_float64(backend, device):
    check_gradcheck(UPSAMPLE, backend, device)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_opcheck(backend, device):
    check_opcheck(UPSAMPLE, backend, device)


def test_compile_fullgraph_forward_backward():
    check_compile_fullgraph(UPSAMPLE)


def test_autocast_bf16():
    check_autocast_bf16(UPSAMPLE)


@needs_triton
def test_triton_multi_tile_and_fused_statistics(monkeypatch):
    check_stats(UPSAMPLE, TRITON_DEVICE, monkeypatch)
    check_forward_backward(UPSAMPLE, "triton", TRITON_DEVICE, torch.float32, MULTI_TILE_SHAPE, "channels_last", True)


def test_phase_weights_sum_the_kernel():
    """Each phase's 2x2 weights sum to the whole 3x3 kernel (a constant image stays constant
    up to the kernel's sum), and the adjoint is the transpose of the map."""
    from fastperc.torch_backend.upsample import upsample_phase_weights, upsample_phase_weights_adjoint

    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    p = upsample_phase_weights(w)
    assert torch.allclose(p.sum(dim=(2, 3)), w.sum(dim=(2, 3)).expand(2, 2, 4, 3))
    g = torch.randn_like(p)
    assert torch.allclose((p * g).sum(), (w * upsample_phase_weights_adjoint(g)).sum())


@pytest.mark.parametrize("x,weight,bias,error,match", bad_input_params(UPSAMPLE))
def test_bad_inputs(x, weight, bias, error, match):
    with pytest.raises(error, match=match):
        fastperc.upsample_conv2d(x, weight, bias)
