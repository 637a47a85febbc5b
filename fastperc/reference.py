"""The spec: every fused op written literally in plain torch.

These functions are the oracle the backends are tested against (in float64), and the
``reference`` backend. They favour the clearest statement of the formula over speed. The
forward functions are differentiable by torch autograd; each ``*_backward`` states the
gradient formula explicitly (the reference backend's backward), and the tests check it
against autograd of the forward in float64. Shapes are NCHW; any memory format is accepted.

Losses are computed in float32 for half-precision inputs (float64 for float64 inputs) and
return a tensor of that dtype.
"""
from __future__ import annotations

import torch


def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gram(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix of each image's features (paper eq. 3).

    x: (N, C, H, W). With psi = x[n] reshaped to (C, H*W):
        G[n] = psi @ psi.T / (C * H * W)                       -> (N, C, C), x's dtype
    """
    n, c, h, w = x.shape
    psi = x.reshape(n, c, h * w).to(_loss_dtype(x))
    return (psi @ psi.transpose(1, 2) / (c * h * w)).to(x.dtype)


def style_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius distance of Gram matrices, mean over the batch (paper eq. 4).

    x: (N, C, H, W); target: (C, C), broadcast over the batch, or (N, C, C).
        loss = mean_n || G(x)[n] - target[n] ||_F^2               -> scalar
    The Gram matrix is formed in the loss dtype (float32 for half inputs).
    """
    n, c, h, w = x.shape
    acc = _loss_dtype(x)
    psi = x.reshape(n, c, h * w).to(acc)
    g = psi @ psi.transpose(1, 2) / (c * h * w)
    return (g - target.to(acc)).pow(2).sum(dim=(1, 2)).mean()


def feature_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Feature reconstruction loss (paper eq. 2), mean over the batch.

    a, b: (N, C, H, W).
        loss = mean_n || a[n] - b[n] ||_2^2 / (C * H * W)          -> scalar
    """
    n, c, h, w = a.shape
    acc = _loss_dtype(a)
    d = a.to(acc) - b.to(acc)
    return (d.pow(2).sum(dim=(1, 2, 3)) / (c * h * w)).mean()


def feature_loss_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d feature_loss / d a = 2 (a - b) * grad / (N C H W), in a's dtype (d / d b is its negative)."""
    acc = _loss_dtype(a)
    return (2 * (a.to(acc) - b.to(acc)) * grad.to(acc) / a.numel()).to(a.dtype)


def tv_loss(x: torch.Tensor, p: int = 2, reduction: str = "mean") -> torch.Tensor:
    """Total variation of each image.

    x: (N, C, H, W), p in {1, 2}.
        tv[n] = sum_{c,i,j} |x[n,c,i+1,j] - x[n,c,i,j]|^p + |x[n,c,i,j+1] - x[n,c,i,j]|^p
    reduction "none" -> tv (N,); "sum" -> sum_n tv[n]; "mean" -> mean_n tv[n].
    """
    xa = x.to(_loss_dtype(x))
    dh = xa[:, :, 1:, :] - xa[:, :, :-1, :]
    dw = xa[:, :, :, 1:] - xa[:, :, :, :-1]
    per_image = dh.abs().pow(p).sum(dim=(1, 2, 3)) + dw.abs().pow(p).sum(dim=(1, 2, 3))
    if reduction == "none":
        return per_image
    if reduction == "sum":
        return per_image.sum()
    return per_image.mean()
