"""The degradation that makes super-resolution inputs, as in Johnson et al. 2016, section 4.2.

The paper makes a low-resolution input from a high-resolution image "by blurring with a
Gaussian kernel of width sigma = 1.0 and downsampling with bicubic interpolation". Here
(:func:`degrade`):

* the blur is a separable Gaussian of standard deviation ``sigma`` truncated at
  ``int(4 sigma + 0.5)`` pixels each side, with symmetric ("reflect" in scipy's words: the
  edge pixel repeated) padding: scipy's ``ndimage.gaussian_filter(x, sigma)``;
* the downsampling is torch's bicubic interpolation (``F.interpolate(mode="bicubic",
  align_corners=False)``, cubic coefficient a = -0.75, no antialiasing: the blur is the
  low-pass) to ``(H // scale, W // scale)``. This is not MATLAB's ``imresize`` (a = -0.5 with
  an antialiasing kernel), so numbers are comparable between fastperc runs, not digit for digit
  with papers that used MATLAB.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastperc._checks import check_image


def _symmetric_index(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``size`` axis padded by ``radius`` with the edge repeated
    (... 1 0 | 0 1 ... n-1 | n-1 n-2 ...), valid for any size >= 1."""
    i = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(i < size, i, 2 * size - 1 - i)


def gaussian_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur of every (n, c) plane of ``x`` (N, C, H, W): scipy's
    ``gaussian_filter(plane, sigma)`` (truncate 4.0, mode "reflect"). ``sigma = 0`` returns ``x``."""
    if sigma == 0:
        return x
    radius = int(4.0 * sigma + 0.5)
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = (g / g.sum()).to(dtype=x.dtype, device=x.device)
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = y.index_select(2, _symmetric_index(h, radius, x.device))
    y = y.index_select(3, _symmetric_index(w, radius, x.device))
    y = F.conv2d(y, g.view(1, 1, -1, 1))
    y = F.conv2d(y, g.view(1, 1, 1, -1))
    return y.reshape(n, c, h, w)


def degrade(hr: torch.Tensor, scale: int, sigma: float = 1.0) -> torch.Tensor:
    """The paper's low-resolution input: Gaussian blur (``sigma``), then bicubic downsampling
    by ``scale``. ``hr`` (N, C, H, W) floating point, H and W at least ``scale``; returns
    (N, C, H // scale, W // scale) on ``hr``'s device, in its dtype (values are not clipped:
    bicubic interpolation can overshoot the input range slightly).

    ``scale`` may be any int >= 2 here (the networks exist for 4 and 8).
    """
    check_image(hr, "hr")
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise TypeError(f"scale: expected an int, got {type(scale).__name__}")
    if scale < 2:
        raise ValueError(f"scale: expected an int >= 2, got {scale}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma: expected a number, got {type(sigma).__name__}")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma: expected a finite number >= 0, got {sigma!r}")
    h, w = hr.shape[-2:]
    if h < scale or w < scale:
        raise ValueError(f"hr: expected images of at least {scale}x{scale} for scale {scale}, got {h}x{w}")
    blurred = gaussian_blur(hr, float(sigma))
    return F.interpolate(blurred, size=(h // scale, w // scale), mode="bicubic", align_corners=False)
