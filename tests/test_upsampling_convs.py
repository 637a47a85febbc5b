"""upsample_conv2d (nearest x2, reflection pad 1, 3x3 conv) and conv_transpose2d (3x3, stride 2,
padding 1, output_padding 1) beyond the op contract (tests/test_op_contract.py runs it against
their plain definitions on every backend, dtype, layout and shape): each check of
upsample_helpers runs for both ops."""
import pytest
import torch

from helpers import TRITON_DEVICE, backend_device_params, needs_triton
from op_table import TRANSPOSE, UPSAMPLE
from upsample_helpers import (
    check_autocast_casts_float32_inputs,
    check_edge_sizes_exact,
    check_multi_tile,
    check_only_requested_gradients,
    check_reference_backward_computes_only_what_is_asked,
)

OPS = [UPSAMPLE, TRANSPOSE]
each_op = pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)


@each_op
def test_reference_backward_computes_only_what_is_asked(op):
    check_reference_backward_computes_only_what_is_asked(op)


@each_op
def test_torch_backend_exact_at_edge_sizes(op):
    check_edge_sizes_exact(op, "torch")


@each_op
@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_only_requested_gradients(op, backend, device):
    check_only_requested_gradients(op, backend, device)


@each_op
def test_autocast_casts_float32_inputs(op):
    check_autocast_casts_float32_inputs(op)


@needs_triton
@each_op
def test_triton_multi_tile_and_fused_statistics(op):
    check_multi_tile(op, TRITON_DEVICE)


def test_phase_weights_sum_the_kernel():
    """The phase weights are sum_{k, l} A[a, t, k] A[b, s, l] w[k, l] with the tap matrices A,
    and the adjoint is the transpose of that map."""
    from fastperc.rules import upsample_phase_weights, upsample_phase_weights_adjoint

    taps = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    p = upsample_phase_weights(w)
    assert torch.allclose(p, torch.einsum("atk,bsl,ockl->abtsoc", taps, taps, w))
    assert torch.allclose(p.sum(dim=(2, 3)), w.sum(dim=(2, 3)).expand(2, 2, 4, 3))
    g = torch.randn_like(p)
    assert torch.allclose((p * g).sum(), (w * upsample_phase_weights_adjoint(g)).sum())


@each_op
def test_torch_backend_builds_no_tensor_from_python_values(op, monkeypatch):
    """No host-to-device copy of Python values per call (a sync on CUDA, and no CUDA-graph
    capture): the forward and backward never call torch.tensor / torch.as_tensor."""
    x, weight, b = op.inputs((1, 3, 2, 4, 5))
    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, lambda *args, _name=name, **kwargs: pytest.fail(f"torch.{_name} called"))
    leaves = [t.requires_grad_(True) for t in (x, weight, b)]
    op.fn(*leaves, backend="torch").sum().backward()
    assert all(t.grad is not None for t in leaves)
