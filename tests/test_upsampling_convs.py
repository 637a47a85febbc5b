"""upsample_conv2d (nearest x2, reflection pad 1, 3x3 conv) and conv_transpose2d (3x3, stride 2,
padding 1, output_padding 1) against their plain definitions in float64 on every available
backend, forward and backward: each check of upsample_helpers runs for both ops."""
import pytest
import torch

from helpers import TRITON_DEVICE, backend_device_params, needs_triton
from upsample_helpers import (
    MULTI_TILE_SHAPE,
    TRANSPOSE,
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

OPS = [UPSAMPLE, TRANSPOSE]
each_op = pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)


@each_op
def test_reference_backward_formulas(op):
    check_reference_backward(op)


@each_op
def test_torch_backend_exact_at_edge_sizes(op):
    check_edge_sizes_exact(op, "torch")


@each_op
@pytest.mark.parametrize("backend,device,dtype,shape,layout,bias", forward_backward_params())
def test_forward_backward(op, backend, device, dtype, shape, layout, bias):
    check_forward_backward(op, backend, device, dtype, shape, layout, bias)


@each_op
@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_only_requested_gradients(op, backend, device):
    check_only_requested_gradients(op, backend, device)


@each_op
@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_gradcheck_float64(op, backend, device):
    check_gradcheck(op, backend, device)


@each_op
@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_opcheck(op, backend, device):
    check_opcheck(op, backend, device)


@each_op
def test_compile_fullgraph_forward_backward(op):
    check_compile_fullgraph(op)


@each_op
def test_autocast_bf16(op):
    check_autocast_bf16(op)


@needs_triton
@each_op
def test_triton_multi_tile_and_fused_statistics(op, monkeypatch):
    check_stats(op, TRITON_DEVICE, monkeypatch)
    check_forward_backward(op, "triton", TRITON_DEVICE, torch.float32, MULTI_TILE_SHAPE, "channels_last", True)


@pytest.mark.parametrize("op,x,weight,bias,error,match",
                         [pytest.param(op, *p.values, id=f"{op.name}-{p.id}") for op in OPS for p in bad_input_params(op)])
def test_bad_inputs(op, x, weight, bias, error, match):
    with pytest.raises(error, match=match):
        op.fn(x, weight, bias)


def test_phase_weights_sum_the_kernel():
    """Each upsampling phase's 2x2 weights sum to the whole 3x3 kernel (a constant image stays
    constant up to the kernel's sum), and the adjoint is the transpose of the map."""
    from fastperc.torch_backend.upsample import upsample_phase_weights, upsample_phase_weights_adjoint

    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    p = upsample_phase_weights(w)
    assert torch.allclose(p.sum(dim=(2, 3)), w.sum(dim=(2, 3)).expand(2, 2, 4, 3))
    g = torch.randn_like(p)
    assert torch.allclose((p * g).sum(), (w * upsample_phase_weights_adjoint(g)).sum())
