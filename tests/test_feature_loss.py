"""feature_loss beyond the op contract (tests/test_op_contract.py runs it over every backend,
dtype, layout and shape): the reference against loops, a dense but permuted input's gradient."""
import pytest
import torch

from fastperc import reference
from helpers import assert_close, backend_device_params, make_input


def test_reference_matches_independent_formula():
    a, b = make_input((2, 3, 4, 5), torch.float64), make_input((2, 3, 4, 5), torch.float64)
    by_loops = sum(((a[n] - b[n]) ** 2).sum() / (3 * 4 * 5) for n in range(2)) / 2
    assert torch.allclose(reference.feature_loss(a, b), by_loops, rtol=1e-12)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_gradient_layout_matches_the_fake_implementation(backend, device):
    """A dense but permuted input: the gradient is laid out as torch.empty_like(a) promises."""
    a = make_input((2, 3, 5, 4), torch.float32, device).transpose(2, 3)
    b = make_input((2, 3, 4, 5), torch.float32, device)
    g = torch.tensor(1.5, device=device)
    got = torch.ops.fastperc.feature_loss_backward(g, a, b, backend)
    assert got.stride() == torch.empty_like(a).stride()
    assert_close(got, reference.feature_loss_backward(g.double(), a.double(), b.double()), torch.float32)
