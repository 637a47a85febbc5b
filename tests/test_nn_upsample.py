"""fastperc.nn.UpsampleConv2d and fastperc.nn.ConvTranspose2d: the modules they replace load
into them unchanged and give the same outputs and gradients, fused (``fused=True``) and as the
plain torch composition (``fused=False``)."""
import pytest
import torch

from examples_net import UpsampleConvLayer
from fastperc.nn import ConvTranspose2d, UpsampleConv2d
from helpers import assert_close, make_input


def _grads(module, x, grad_out):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_out)
    return y, x.grad, {name: p.grad for name, p in module.named_parameters()}


def _assert_same_outputs_and_gradients(ours, theirs, x):
    """ours(x) equals theirs(x), and so do the gradients of x and of every parameter."""
    with torch.no_grad():
        grad_out = make_input(theirs(x).shape)
    y0, dx0, dp0 = _grads(theirs, x, grad_out)
    y1, dx1, dp1 = _grads(ours, x, grad_out)
    assert_close(y1, y0, torch.float32, what="y")
    assert_close(dx1, dx0, torch.float32, what="dx")
    assert set(dp1) == set(dp0)
    for name in dp0:
        assert_close(dp1[name], dp0[name], torch.float32, what=name)


@pytest.mark.parametrize("fused_op", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_upsample_conv2d_loads_pytorch_examples_layer(layout, fused_op):
    torch.manual_seed(0)
    examples = UpsampleConvLayer(5, 3, kernel_size=3, stride=1, upsample=2)
    fused = UpsampleConv2d(5, 3, fused=fused_op)
    assert set(fused.state_dict()) == set(examples.state_dict()) == {"conv2d.weight", "conv2d.bias"}
    fused.load_state_dict(examples.state_dict())
    _assert_same_outputs_and_gradients(fused, examples, make_input((2, 5, 3, 4), layout=layout))
    # Its own state dict goes back into the pytorch/examples layer.
    examples.load_state_dict(fused.state_dict())


def test_upsample_conv2d_without_bias_and_arguments():
    m = UpsampleConv2d(4, 2, bias=False, dtype=torch.float64)
    assert m.conv2d.bias is None and list(m.state_dict()) == ["conv2d.weight"]
    x = make_input((1, 4, 2, 3), torch.float64)
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(torch.nn.functional.interpolate(x, scale_factor=2), (1, 1, 1, 1), mode="reflect"),
        m.conv2d.weight)
    assert_close(m(x), ref, torch.float64)
    m.fused = False
    assert_close(m(x), ref, torch.float64)
    assert "fused=False" in repr(m)
    for kwargs, name in (({"kernel_size": 5}, "kernel_size"), ({"stride": 2}, "stride"),
                         ({"upsample": 4}, "upsample")):
        with pytest.raises(ValueError, match=name):
            UpsampleConv2d(4, 2, **kwargs)


@pytest.mark.parametrize("fused_op", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose2d_is_an_nn_conv_transpose2d(bias, fused_op):
    torch.manual_seed(0)
    plain = torch.nn.ConvTranspose2d(5, 3, 3, stride=2, padding=1, output_padding=1, bias=bias)
    fused = ConvTranspose2d(5, 3, bias=bias, fused=fused_op)
    assert isinstance(fused, torch.nn.ConvTranspose2d)
    assert set(fused.state_dict()) == set(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    x = make_input((2, 5, 3, 4), layout="channels_last")
    _assert_same_outputs_and_gradients(fused, plain, x)
    assert fused(x, output_size=[6, 8]).shape == (2, 3, 6, 8)
    with pytest.raises(ValueError, match="output_size"):
        fused(x, output_size=[5, 7])


@pytest.mark.parametrize("kwargs,name", [({"kernel_size": 4}, "kernel_size"), ({"stride": 1}, "stride"),
                                         ({"padding": 0}, "padding"), ({"output_padding": 0}, "output_padding"),
                                         ({"dilation": 2}, "dilation"), ({"groups": 2}, "groups")])
def test_conv_transpose2d_rejects_other_configurations(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ConvTranspose2d(4, 2, **kwargs)
