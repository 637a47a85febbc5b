"""conv_transpose2d (3x3, stride 2, padding 1, output_padding 1) against its plain definition
in float64 on every available backend, forward and backward."""
import pytest
import torch

import fastperc
from helpers import TRITON_DEVICE, backend_device_params, needs_triton
from upsample_helpers import (
    MULTI_TILE_SHAPE,
    TRANSPOSE,
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
    check_reference_backward(TRANSPOSE)


def test_torch_backend_exact_at_edge_sizes():
    check_edge_sizes_exact(TRANSPOSE, "torch")


@pytest.mark.parametrize("backend,device,dtype,shape,layout,bias", forward_backward_params())
def test_forward_backward(backend, device, dtype, shape, layout, bias):
    check_forward_backward(TRANSPOSE, backend, device, dtype, shape, layout, bias)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_only_requested_gradients(backend, device):
    check_only_requested_gradients(TRANSPOSE, backend, device)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_gradcheck_float64(backend, device):
    check_gradcheck(TRANSPOSE, backend, device)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_opcheck(backend, device):
    check_opcheck(TRANSPOSE, backend, device)


def test_compile_fullgraph_forward_backward():
    check_compile_fullgraph(TRANSPOSE)


def test_autocast_bf16():
    check_autocast_bf16(TRANSPOSE)


@needs_triton
def test_triton_multi_tile_and_fused_statistics(monkeypatch):
    check_stats(TRANSPOSE, TRITON_DEVICE, monkeypatch)
    check_forward_backward(TRANSPOSE, "triton", TRITON_DEVICE, torch.float32, MULTI_TILE_SHAPE, "channels_last", True)


@pytest.mark.parametrize("x,weight,bias,error,match", bad_input_params(TRANSPOSE))
def test_bad_inputs(x, weight, bias, error, match):
    with pytest.raises(error, match=match):
        fastperc.conv_transpose2d(x, weight, bias)
