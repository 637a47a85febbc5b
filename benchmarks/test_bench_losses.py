"""gram, style_loss, feature_loss, tv_loss: fastperc against eager torch (and torch.compile
on the GPU), forward and forward+backward, at the VGG-16 layer shapes of a batch of four
256x256 images (DESIGN.md; smaller on a CPU)."""
from __future__ import annotations

import pytest
import torch

import baselines
import fastperc
from conftest import DEVICE, forward_backward, providers
from shapes import IMAGE, VGG, VGG_GPU

DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
MODES = ["fwd", "fwd+bwd"]


def _implementation(op: str, provider: str):
    eager = getattr(baselines, op)
    if provider == "eager":
        return eager
    if provider == "compile":
        return torch.compile(eager)
    fused = getattr(fastperc, op)
    return lambda *args: fused(*args, backend=provider)


def _run(measure, op, shape, dtype, mode, provider, inputs, *, bytes_fwd, bytes_bwd, flops_fwd=0, flops_bwd=0):
    fn = _implementation(op, provider)
    if mode == "fwd":
        call, nbytes, flops = (lambda: fn(*inputs)), bytes_fwd, flops_fwd
    else:
        call, nbytes, flops = forward_backward(fn, inputs), bytes_fwd + bytes_bwd, flops_fwd + flops_bwd
    measure(call, op=op, shape=shape, dtype=dtype, mode=mode, provider=provider, bytes=nbytes, flops=flops)


def _features(shape, dtype):
    # Non-negative like a ReLU output, values of a real activation's magnitude.
    return (torch.randn(shape, device=DEVICE).relu_() * 3).to(dtype).requires_grad_(True)


@pytest.mark.parametrize("provider", providers())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", list(VGG))
def test_gram(measure, layer, dtype, mode, provider):
    shape = VGG[layer]
    n, c, h, w = shape
    x = _features(shape, dtype)
    s = x.element_size()
    _run(measure, "gram", shape, dtype, mode, provider, [x],
         bytes_fwd=n * c * h * w * s + n * c * c * s,
         bytes_bwd=n * c * c * s + 2 * n * c * h * w * s,
         flops_fwd=2 * n * c * c * h * w, flops_bwd=2 * n * c * c * h * w)


@pytest.mark.parametrize("provider", providers())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", list(VGG))
def test_style_loss(measure, layer, dtype, mode, provider):
    shape = VGG[layer]
    n, c, h, w = shape
    x = _features(shape, dtype)
    target = baselines.gram(_features((1,) + shape[1:], torch.float32).detach())[0]
    s = x.element_size()
    _run(measure, "style_loss", shape, dtype, mode, provider, [x, target],
         bytes_fwd=n * c * h * w * s + c * c * 4,
         bytes_bwd=2 * n * c * h * w * s + (n + 1) * c * c * 4,
         flops_fwd=2 * n * c * c * h * w, flops_bwd=2 * n * c * c * h * w)


@pytest.mark.parametrize("provider", providers())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_feature_loss(measure, dtype, mode, provider):
    shape = VGG["relu2_2"]  # the content layer
    a = _features(shape, dtype)
    b = _features(shape, dtype).detach()
    nbytes = a.numel() * a.element_size()
    _run(measure, "feature_loss", shape, dtype, mode, provider, [a, b],
         bytes_fwd=2 * nbytes, bytes_bwd=3 * nbytes)


@pytest.mark.parametrize("provider", providers())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["image", "relu1_2"])
def test_tv_loss(measure, name, dtype, mode, provider):
    shape = IMAGE["image"] if name == "image" else VGG["relu1_2"]
    x = (torch.rand(shape, device=DEVICE) * 255).to(dtype).requires_grad_(True)
    nbytes = x.numel() * x.element_size()
    _run(measure, "tv_loss", shape, dtype, mode, provider, [x], bytes_fwd=nbytes, bytes_bwd=2 * nbytes)


def test_shapes_follow_the_design():
    assert VGG_GPU["relu1_2"] == (4, 64, 256, 256)
