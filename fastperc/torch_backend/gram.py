"""Gram matrix and style loss in plain torch: forward and backward.

Every product runs on the natural (N, C, HW) view of x without a copy: for NCHW-contiguous x
psi = x.view(N, C, HW) and G = psi psi^T; for channels_last x psi_t = x.permute(0, 2, 3, 1)
viewed as (N, HW, C) and G = psi_t^T psi_t, and the gradient is formed as psi_t M (M is
symmetric) straight into a channels_last result. Any other layout is reshaped (a copy).

Half precision: the 1/(CHW) scale is the ``alpha`` of ``baddbmm``, applied to the fp32
accumulator before the product is rounded to the input dtype, so G never overflows in fp16.
The style loss needs G in fp32 (G - T cancels), so half inputs are promoted to fp32 first;
the backward products run in fp32 too (their C x C factor can leave the fp16 range).
"""
from __future__ import annotations

import torch

from fastperc.rules import acc_dtype, natural_format


def _psi(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(psi, transposed): (N, C, HW), or (N, HW, C) when ``transposed`` (channels_last x)."""
    n, c, h, w = x.shape
    if natural_format(x) == torch.channels_last:
        return x.permute(0, 2, 3, 1).reshape(n, h * w, c), True
    return x.reshape(n, c, h * w), False


def _gram(psi: torch.Tensor, transposed: bool, count: int) -> torch.Tensor:
    """psi psi^T / count in psi's dtype (the scale applied before the rounding)."""
    a, b = (psi.transpose(1, 2), psi) if transposed else (psi, psi.transpose(1, 2))
    return psi.new_empty((psi.shape[0], a.shape[1], a.shape[1])).baddbmm_(a, b, beta=0, alpha=1.0 / count)


def _apply(m: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * m @ psi for a symmetric (N, C, C) m, shaped and laid out like x (natural_format).

    Computed in the accumulation dtype: m (a sum or difference of Gram-sized matrices) may
    exceed the fp16 range where each of its terms does not."""
    n, c, h, w = x.shape
    psi, transposed = _psi(x)
    acc = acc_dtype(x.dtype)
    psi, m = psi.to(acc), m.to(acc)
    a, b = (psi, m) if transposed else (m, psi)  # channels_last: (M psi)^T = psi_t M^T = psi_t M
    out = psi.new_empty(psi.shape).baddbmm_(a, b, beta=0, alpha=alpha).to(x.dtype)
    return out.view(n, h, w, c).permute(0, 3, 1, 2) if transposed else out.view(n, c, h, w)


def gram_forward(x: torch.Tensor) -> torch.Tensor:
    """G = psi psi^T / (CHW), (N, C, C) in x's dtype."""
    n, c, h, w = x.shape
    return _gram(*_psi(x), c * h * w)


def gram_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d psi = (dG + dG^T) psi / (CHW), in x's dtype and natural layout."""
    n, c, h, w = x.shape
    g = grad.to(acc_dtype(x.dtype))
    return _apply(g + g.transpose(1, 2), x, 1.0 / (c * h * w))


def style_loss_forward(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_n ||G[n] - T[n]||_F^2, G) with G (N, C, C) in the loss dtype."""
    n, c, h, w = x.shape
    psi, transposed = _psi(x)
    gram = _gram(psi.to(acc_dtype(x.dtype)), transposed, c * h * w)
    diff = gram - target.to(gram.dtype)
    return diff.pow(2).sum() / n, gram


def style_loss_backward(
    grad: torch.Tensor, x: torch.Tensor, target: torch.Tensor, gram: torch.Tensor
) -> torch.Tensor:
    """d psi = g * 2/(N CHW) * (2G - T - T^T) psi, with G the forward's (saved) Gram matrix."""
    n, c, h, w = x.shape
    t = target.to(gram.dtype)
    out = _apply(2 * gram - t - t.transpose(-1, -2), x, 2.0 / (n * c * h * w))
    return out.mul_(grad)
