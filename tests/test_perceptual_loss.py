"""PerceptualLoss against its formulas computed by hand in float64, both presets."""
import pytest
import torch
import torch.nn.functional as F

import fastperc
from fastperc import PerceptualLoss
from helpers import rel_err

MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")


def _gram(f):
    n, c, h, w = f.shape
    f = f.reshape(n, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def _by_hand(loss_fn, output, content, style, *, cw, sw, tvw, rng, examples=False):
    """The total of the module docstring, written with torch ops in float64."""
    def phi(img):
        return loss_fn.vgg((img / rng - MEAN) / STD)

    fo, fc, fs = phi(output), phi(content), phi(style)
    content_term = ((fo["relu2_2"] - fc["relu2_2"]) ** 2).mean()
    style_term = 0
    for j in LAYERS:
        gs = _gram(fs[j])[0]
        diff = _gram(fo[j]) - gs
        if examples:
            style_term = style_term + F.mse_loss(_gram(fo[j]), gs.expand_as(_gram(fo[j])))
        else:
            style_term = style_term + (diff ** 2).sum(dim=(1, 2)).mean()
    dh = output[:, :, 1:] - output[:, :, :-1]
    dw = output[:, :, :, 1:] - output[:, :, :, :-1]
    tv = ((dh ** 2).sum(dim=(1, 2, 3)) + (dw ** 2).sum(dim=(1, 2, 3))).mean()
    return cw * content_term + sw * style_term + tvw * tv


@pytest.mark.parametrize("preset", ["johnson2016", "pytorch-examples"])
def test_value_and_gradient_match_the_formulas(preset):
    torch.manual_seed(0)
    rng = 255.0 if preset == "pytorch-examples" else 1.0
    loss_fn = PerceptualLoss(weights=None, preset=preset, tv_weight=1e-3).double()
    output = (torch.rand(2, 3, 32, 32, dtype=torch.float64) * rng).requires_grad_(True)
    content = torch.rand(2, 3, 32, 32, dtype=torch.float64) * rng
    style = torch.rand(1, 3, 40, 36, dtype=torch.float64) * rng
    loss_fn.set_style(style)
    total, parts = loss_fn(output, content, return_parts=True)
    (grad,) = torch.autograd.grad(total, output)
    cw, sw = (1e5, 1e10) if preset == "pytorch-examples" else (1.0, 5.0)
    out2 = output.detach().clone().requires_grad_(True)
    expected = _by_hand(loss_fn, out2, content, style, cw=cw, sw=sw, tvw=1e-3, rng=rng,
                        examples=preset == "pytorch-examples")
    (expected_grad,) = torch.autograd.grad(expected, out2)
    assert rel_err(total, expected) < 1e-9
    assert rel_err(grad, expected_grad) < 1e-8
    assert rel_err(parts["content"] + parts["style"] + parts["tv"], total) < 1e-12


def test_vgg_gets_no_gradients_and_style_is_computed_once(monkeypatch):
    loss_fn = PerceptualLoss(weights=None)
    loss_fn.set_style(torch.rand(1, 3, 16, 16))
    calls = []
    original = fastperc.losses.gram
    monkeypatch.setattr(fastperc.losses, "gram", lambda *a: calls.append(1) or original(*a))
    output = torch.rand(2, 3, 16, 16, requires_grad=True)
    loss_fn(output, torch.rand(2, 3, 16, 16)).backward()
    assert calls == []
    assert all(p.grad is None for p in loss_fn.vgg.parameters())
    assert output.grad is not None


def test_autocast_and_channels_last():
    torch.manual_seed(0)
    loss_fn = PerceptualLoss(weights=None)
    loss_fn.set_style(torch.rand(1, 3, 16, 16))
    output = torch.rand(2, 3, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    content = torch.rand(2, 3, 16, 16)
    reference = loss_fn(output.contiguous(), content)
    channels_last = loss_fn(output, content)
    assert rel_err(channels_last, reference) < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(output, content)
    assert low.dtype == torch.float32
    assert rel_err(low, reference) < 5e-2
    low.backward()
    assert torch.isfinite(output.grad).all()


def test_errors():
    loss_fn = PerceptualLoss(weights=None)
    img = torch.rand(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match="set_style"):
        loss_fn(img, img)
    loss_fn.set_style(img)
    with pytest.raises(ValueError, match=r"output: expected RGB images \(N, 3, H, W\)"):
        loss_fn(torch.rand(1, 4, 8, 8), img)
    with pytest.raises(ValueError, match="content: expected the shape of output"):
        loss_fn(img, torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match="output: expected a 4-D"):
        loss_fn(torch.rand(3, 8, 8), img)
    with pytest.raises(ValueError, match="preset: expected one of"):
        PerceptualLoss(weights=None, preset="gatys")
    with pytest.raises(ValueError, match="layer: expected names from"):
        PerceptualLoss(weights=None, style_layers=("relu2_9",))


def test_no_style_weight_needs_no_style():
    loss_fn = PerceptualLoss(weights=None, style_weight=0.0)
    img = torch.rand(1, 3, 8, 8)
    assert loss_fn(img, img).item() == 0.0
