"""fastperc.degradation.degrade (fastperc.degrade): Gaussian blur (sigma 1) then bicubic downsampling."""
import math

import numpy as np
import pytest
import torch

from fastperc.degradation import degrade, gaussian_blur


def gaussian_filter(plane, sigma, **kwargs):
    """scipy's, the reference blur; skips the test where scipy is absent (the GPU test machine)."""
    ndimage = pytest.importorskip("scipy.ndimage", reason="compares against scipy: pip install -e '.[dev]'")
    return ndimage.gaussian_filter(plane, sigma, **kwargs)


def _cubic(t, a=-0.75):
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def _bicubic_matrix(n_in, n_out):
    """Hand-written bicubic resampling matrix (half-pixel centres, a = -0.75, edges clamped)."""
    m = np.zeros((n_out, n_in))
    ratio = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * ratio - 0.5
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            m[i, min(max(k, 0), n_in - 1)] += _cubic(src - k)
    return m


def _hand_degrade(hr, scale, sigma=1.0):
    x = hr.double().numpy()
    out = np.empty(x.shape[:2] + (x.shape[2] // scale, x.shape[3] // scale))
    mh = _bicubic_matrix(x.shape[2], out.shape[2])
    mw = _bicubic_matrix(x.shape[3], out.shape[3])
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            blurred = gaussian_filter(x[n, c], sigma, mode="reflect", truncate=4.0) if sigma else x[n, c]
            out[n, c] = mh @ blurred @ mw.T
    return out


@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (2, 3, 20, 12), (1, 1, 5, 7), (1, 3, 3, 3), (1, 2, 1, 6)])
@pytest.mark.parametrize("sigma", [1.0, 0.6, 2.5])
def test_gaussian_blur_matches_scipy(shape, sigma):
    x = torch.rand(shape, dtype=torch.float64) * 255
    want = np.stack([np.stack([gaussian_filter(p, sigma, mode="reflect", truncate=4.0) for p in img])
                     for img in x.numpy()])
    np.testing.assert_allclose(gaussian_blur(x, sigma).numpy(), want, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("scale", [4, 8, 2])
@pytest.mark.parametrize("hw", [(32, 32), (40, 24), (33, 18)])
@pytest.mark.parametrize("sigma", [1.0, 0])
def test_degrade_matches_hand_written(scale, hw, sigma):
    hr = torch.rand(2, 3, *hw, dtype=torch.float64) * 255
    lr = degrade(hr, scale, sigma=sigma)
    assert lr.shape == (2, 3, hw[0] // scale, hw[1] // scale)
    assert lr.dtype == torch.float64 and lr.device == hr.device
    np.testing.assert_allclose(lr.numpy(), _hand_degrade(hr, scale, sigma), rtol=1e-10, atol=1e-8)


def test_degrade_float32_and_constant():
    hr = torch.full((1, 3, 16, 24), 77.0)
    lr = degrade(hr, 4)
    assert lr.shape == (1, 3, 4, 6) and lr.dtype == torch.float32
    torch.testing.assert_close(lr, torch.full_like(lr, 77.0))
    x = torch.rand(1, 3, 16, 16) * 255
    torch.testing.assert_close(degrade(x, 4), degrade(x.double(), 4).float(), rtol=1e-5, atol=1e-3)


def test_degrade_blurs():
    # A checkerboard at the Nyquist frequency is nearly erased by the sigma = 1 blur.
    hr = (torch.arange(32).view(1, -1) + torch.arange(32).view(-1, 1)) % 2 * 255.0
    hr = hr.expand(1, 3, 32, 32)
    assert degrade(hr, 4).std() < 0.1 * degrade(hr, 4, sigma=0).std() + 1.0


def test_degrade_differentiable():
    hr = (torch.rand(1, 2, 8, 8, dtype=torch.float64) * 255).requires_grad_(True)
    torch.autograd.gradcheck(lambda x: degrade(x, 4), (hr,))


def test_degrade_bad_input():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(TypeError, match="hr"):
        degrade(x.numpy(), 4)
    with pytest.raises(TypeError, match="hr"):
        degrade(x.to(torch.uint8), 4)
    with pytest.raises(ValueError, match="hr"):
        degrade(x[0], 4)
    with pytest.raises(ValueError, match="at least 8x8"):
        degrade(torch.rand(1, 3, 16, 7), 8)
    with pytest.raises(ValueError, match="scale"):
        degrade(x, 1)
    with pytest.raises(TypeError, match="scale"):
        degrade(x, 4.0)
    with pytest.raises(ValueError, match="sigma"):
        degrade(x, 4, sigma=-1.0)
    with pytest.raises(ValueError, match="sigma"):
        degrade(x, 4, sigma=float("nan"))
