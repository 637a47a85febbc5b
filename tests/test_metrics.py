"""fastperc.metrics: PSNR and SSIM against scikit-image and hand-computed values."""
import math

import numpy as np
import pytest
import torch

from fastperc.metrics import psnr, rgb_to_y, ssim
from helpers import skimage

SHAPES = [(1, 3, 11, 11), (2, 3, 23, 19), (3, 3, 32, 40)]


def _pair(shape, dtype=torch.float64, noise=20.0, data_range=255.0):
    a = torch.rand(shape, dtype=torch.float64) * data_range
    b = (a + torch.randn_like(a) * noise * data_range / 255).clamp(0, data_range)
    return a.to(dtype), b.to(dtype)


def _y_numpy(x, data_range=255.0):
    """Y channel in float64 numpy, written out independently of rgb_to_y."""
    x = x.double().numpy() * (255.0 / data_range)
    y = 16.0 + (65.481 * x[:, 0] + 128.553 * x[:, 1] + 24.966 * x[:, 2]) / 255.0
    return y * (data_range / 255.0)


def _sk_psnr(a, b, data_range):
    return skimage("metrics").peak_signal_noise_ratio(a, b, data_range=data_range)


def _sk_ssim(a, b, data_range, channel_axis=None):
    return skimage("metrics").structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                                    use_sample_covariance=False, data_range=data_range,
                                                    channel_axis=channel_axis)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("crop", [0, 2])
@pytest.mark.parametrize("data_range", [255.0, 1.0])
def test_y_channel_matches_skimage(shape, crop, data_range):
    if crop and min(shape[-2:]) - 2 * crop < 11:
        crop = 0
    a, b = _pair(shape, data_range=data_range)
    ya, yb = _y_numpy(a, data_range), _y_numpy(b, data_range)
    if crop:
        ya, yb = ya[:, crop:-crop, crop:-crop], yb[:, crop:-crop, crop:-crop]
    want_p = [_sk_psnr(ya[i], yb[i], data_range) for i in range(shape[0])]
    want_s = [_sk_ssim(ya[i], yb[i], data_range) for i in range(shape[0])]
    got_p = psnr(a, b, data_range=data_range, crop_border=crop, reduction="none")
    got_s = ssim(a, b, data_range=data_range, crop_border=crop, reduction="none")
    assert got_p.shape == got_s.shape == (shape[0],)
    np.testing.assert_allclose(got_p.numpy(), want_p, rtol=1e-10)
    np.testing.assert_allclose(got_s.numpy(), want_s, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(psnr(a, b, data_range=data_range, crop_border=crop).item(), np.mean(want_p))
    np.testing.assert_allclose(ssim(a, b, data_range=data_range, crop_border=crop).item(), np.mean(want_s))


def test_float32_close_to_skimage():
    a, b = _pair((2, 3, 24, 24))
    ya, yb = _y_numpy(a), _y_numpy(b)
    got_p = psnr(a.float(), b.float(), reduction="none")
    got_s = ssim(a.float(), b.float(), reduction="none")
    assert got_p.dtype == got_s.dtype == torch.float32
    np.testing.assert_allclose(got_p.numpy(), [_sk_psnr(ya[i], yb[i], 255)
                                               for i in range(2)], rtol=1e-5)
    np.testing.assert_allclose(got_s.numpy(), [_sk_ssim(ya[i], yb[i], 255) for i in range(2)], rtol=1e-4)
    half = ssim(a.half(), b.half())
    assert half.dtype == torch.float32 and torch.isfinite(half)


@pytest.mark.parametrize("channels", [1, 3])
def test_without_y_channel_matches_skimage(channels):
    a, b = _pair((2, channels, 17, 21))
    for i in range(2):
        an, bn = a[i].numpy(), b[i].numpy()
        want_s = _sk_ssim(an[0], bn[0], 255) if channels == 1 else _sk_ssim(an, bn, 255, channel_axis=0)
        np.testing.assert_allclose(ssim(a, b, y_channel=False, reduction="none")[i].item(), want_s, rtol=1e-10)
        np.testing.assert_allclose(psnr(a, b, y_channel=False, reduction="none")[i].item(),
                                   _sk_psnr(an, bn, 255), rtol=1e-10)


def test_rgb_to_y_known_values():
    x = torch.tensor([[0.0, 0.0, 0.0], [255.0, 255.0, 255.0], [255.0, 0.0, 0.0]]).view(3, 3, 1, 1)
    y = rgb_to_y(x).flatten()
    torch.testing.assert_close(y, torch.tensor([16.0, 16.0 + 65.481 + 128.553 + 24.966, 16.0 + 65.481]))
    torch.testing.assert_close(rgb_to_y(x / 255.0, 1.0).flatten(), y / 255.0)


@pytest.mark.parametrize("offset", [1.0, 3.0, 10.0])
def test_constant_offset_psnr_hand_computed(offset):
    a = torch.rand(2, 1, 16, 16, dtype=torch.float64) * 200
    got = psnr(a, a + offset, y_channel=False, reduction="none")
    torch.testing.assert_close(got, torch.full((2,), 10 * math.log10(255.0 ** 2 / offset ** 2),
                                               dtype=torch.float64))
    # On Y an equal offset of R, G and B moves Y by offset * (65.481 + 128.553 + 24.966) / 255.
    rgb = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 200
    dy = offset * (65.481 + 128.553 + 24.966) / 255
    torch.testing.assert_close(psnr(rgb, rgb + offset), torch.tensor(10 * math.log10(255.0 ** 2 / dy ** 2),
                                                                     dtype=torch.float64))


def test_constant_images_ssim_hand_computed():
    # Constant images: the variances and covariance are 0, so
    # SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    a = torch.full((1, 1, 12, 12), 100.0, dtype=torch.float64)
    b = torch.full((1, 1, 12, 12), 140.0, dtype=torch.float64)
    c1 = (0.01 * 255) ** 2
    want = (2 * 100 * 140 + c1) / (100 ** 2 + 140 ** 2 + c1)
    torch.testing.assert_close(ssim(a, b, y_channel=False), torch.tensor(want, dtype=torch.float64))


def test_crop_border_ignores_the_border():
    a, _ = _pair((1, 3, 30, 30))
    b = a.clone()
    b[..., :3, :] = 0
    b[..., :, -3:] = 255
    assert psnr(a, b, crop_border=3).item() == math.inf
    assert ssim(a, b, crop_border=3).item() == pytest.approx(1.0, abs=1e-12)
    assert math.isfinite(psnr(a, b, crop_border=2).item())
    assert ssim(a, b, crop_border=2).item() < 1.0


def test_identical_images():
    a, b = _pair((3, 3, 16, 16))
    b[1] = a[1]
    p = psnr(a, b, reduction="none")
    assert p[1].item() == math.inf and torch.isfinite(p[[0, 2]]).all()
    assert psnr(a, b).item() == math.inf
    assert not torch.isnan(p).any()
    torch.testing.assert_close(ssim(a, a, reduction="none"), torch.ones(3, dtype=torch.float64))


def test_differentiable():
    a, b = _pair((1, 3, 12, 13))
    a.requires_grad_(True)
    torch.autograd.gradcheck(lambda x: psnr(x, b, crop_border=1), (a,))
    torch.autograd.gradcheck(lambda x: ssim(x, b), (a,))
    # Gradient direction: moving a towards b raises both metrics.
    (psnr(a, b) + ssim(a, b)).backward()
    with torch.no_grad():
        closer = a + 1e-3 * a.grad / a.grad.norm()
        assert psnr(closer, b) > psnr(a, b) and ssim(closer, b) > ssim(a, b)


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_bad_input(fn):
    a = torch.rand(1, 3, 16, 16)
    with pytest.raises(TypeError, match="a: expected a torch.Tensor"):
        fn(a.numpy(), a)
    with pytest.raises(TypeError, match="b: expected a floating-point tensor"):
        fn(a, (a * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="b: expected the shape of a"):
        fn(a, a[..., :15])
    with pytest.raises(ValueError, match="a: expected a 4-D tensor"):
        fn(a[0], a[0])
    with pytest.raises(ValueError, match="y_channel=True"):
        fn(a[:, :1], a[:, :1])
    with pytest.raises(ValueError, match="data_range"):
        fn(a, a, data_range=0)
    with pytest.raises(ValueError, match="data_range"):
        fn(a, a, data_range=float("inf"))
    with pytest.raises(TypeError, match="crop_border"):
        fn(a, a, crop_border=1.5)
    with pytest.raises(ValueError, match="crop_border"):
        fn(a, a, crop_border=-1)
    with pytest.raises(ValueError, match="crop_border"):
        fn(a, a, crop_border=8)
    with pytest.raises(ValueError, match="reduction"):
        fn(a, a, reduction="sum")
    with pytest.raises(TypeError, match="y_channel"):
        fn(a, a, y_channel=1)


def test_ssim_too_small():
    a = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a, a, crop_border=3)
    assert torch.isfinite(psnr(a, a * 0.5, crop_border=3))
