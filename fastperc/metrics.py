"""Image quality metrics of the super-resolution literature: PSNR and SSIM.

The convention of the papers (Johnson et al. 2016 and the SR work they compare with):

* images (N, 3, H, W) with values in [0, ``data_range``] (255 by default), compared on the
  BT.601 luma ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` (R, G, B in [0, 255];
  for another ``data_range`` the same formula on the rescaled values, scaled back), or on the
  channels as given with ``y_channel=False`` (then (N, C, H, W), any C);
* ``crop_border`` pixels removed on every side before measuring (the scale factor, usually);
* SSIM with an 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, population
  (co)variances, averaged over the valid region (the positions where the whole window fits);
  several channels are averaged. This is scikit-image's ``structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.

Both are plain torch and differentiable. They compute in float32 (float64 for float64 input)
and return that dtype. ``reduction="mean"`` gives the mean over the batch (a 0-d tensor),
``"none"`` one value per image (shape (N,)).

PSNR of identical images is ``inf`` (the MSE is zero): it is returned as ``inf``, never NaN
and never an error; a batch mean containing one ``inf`` is ``inf``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastperc._checks import check_choice, check_image, check_positive_finite, check_same_device, check_same_shape

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
REDUCTIONS = ("mean", "none")
_Y_WEIGHTS = (65.481, 128.553, 24.966)


def rgb_to_y(x: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """BT.601 luma of RGB images (N, 3, H, W) in [0, data_range]: (N, 1, H, W) in the same range
    (16..235 for data_range 255)."""
    w = torch.tensor(_Y_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    # With r = x * 255 / data_range in [0, 255]: Y255 = 16 + sum(w r) / 255, Y = Y255 * data_range / 255.
    return 16.0 * data_range / 255.0 + (x * w).sum(dim=1, keepdim=True) / 255.0


def _prepare(a: object, b: object, data_range: object, y_channel: object, crop_border: object,
             reduction: object) -> tuple[torch.Tensor, torch.Tensor, float]:
    check_image(a, "a")
    check_image(b, "b")
    check_same_shape(a, "a", b, "b")
    check_same_device(a, "a", b, "b")
    dr = check_positive_finite(data_range, "data_range")
    if not isinstance(y_channel, bool):
        raise TypeError(f"y_channel: expected a bool, got {type(y_channel).__name__}")
    if isinstance(crop_border, bool) or not isinstance(crop_border, int):
        raise TypeError(f"crop_border: expected an int, got {type(crop_border).__name__}")
    if crop_border < 0:
        raise ValueError(f"crop_border: expected an int >= 0, got {crop_border}")
    check_choice(reduction, "reduction", REDUCTIONS)
    if y_channel and a.shape[1] != 3:
        raise ValueError(f"a: expected RGB images (N, 3, H, W) with y_channel=True, got shape {tuple(a.shape)} "
                         f"(pass y_channel=False to compare the channels as given)")
    h, w = a.shape[-2:]
    if 2 * crop_border >= min(h, w):
        raise ValueError(f"crop_border: {crop_border} pixels from each side leave nothing of images "
                         f"{h}x{w}")
    dtype = torch.float64 if a.dtype == torch.float64 or b.dtype == torch.float64 else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    if y_channel:
        a, b = rgb_to_y(a, dr), rgb_to_y(b, dr)
    if crop_border:
        c = crop_border
        a, b = a[..., c:h - c, c:w - c], b[..., c:h - c, c:w - c]
    return a, b, dr


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    return values.mean() if reduction == "mean" else values


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 255, y_channel: bool = True,
         crop_border: int = 0, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio 10 log10(data_range^2 / MSE) in dB, per image.

    Args:
        a, b: images (N, 3, H, W) in [0, data_range] (any (N, C, H, W) with ``y_channel=False``).
        data_range: the value range of the images (255 for [0, 255], 1 for [0, 1]).
        y_channel: compare the BT.601 luma (True, the literature's) or the channels as given.
        crop_border: pixels removed on each side first (the scale factor, by convention).
        reduction: "mean" over the batch (0-d tensor) or "none" (shape (N,)).

    Identical images give ``inf`` (a zero MSE), not NaN; a mean over a batch holding one is ``inf``.
    There the gradient is undefined (NaN): PSNR is not a training loss for exact matches.
    """
    a, b, dr = _prepare(a, b, data_range, y_channel, crop_border, reduction)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    # log10(dr^2) - log10(mse): log10(0) = -inf gives +inf, never NaN, and keeps the gradient path.
    values = 10.0 * (2.0 * math.log10(dr) - torch.log10(mse))
    return _reduce(values, reduction)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``size`` taps (odd) and standard deviation ``sigma``."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def _filter_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian of every (n, c) plane, only where the whole window fits."""
    n, c, h, w = x.shape
    planes = x.reshape(n * c, 1, h, w)
    planes = F.conv2d(planes, g.view(1, 1, -1, 1))
    planes = F.conv2d(planes, g.view(1, 1, 1, -1))
    return planes.reshape(n, c, planes.shape[-2], planes.shape[-1])


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 255, y_channel: bool = True,
         crop_border: int = 0, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with an 11x11 Gaussian window, sigma 1.5,
    averaged over the valid region (and over the channels with ``y_channel=False``).

    Arguments as :func:`psnr`. After cropping, the images must be at least 11x11.
    """
    a, b, dr = _prepare(a, b, data_range, y_channel, crop_border, reduction)
    h, w = a.shape[-2:]
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"a: SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} after cropping "
                         f"{crop_border} pixels from each side, got {h}x{w}")
    g = gaussian_window(dtype=a.dtype, device=a.device)
    c1, c2 = (SSIM_K1 * dr) ** 2, (SSIM_K2 * dr) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a * mu_a
    var_b = _filter_valid(b * b, g) - mu_b * mu_b
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return _reduce(s.flatten(1).mean(dim=1), reduction)
