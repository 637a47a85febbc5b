"""What a user would write without fastperc: the eager torch compositions the fused ops
are measured against (and, compiled, the `compile` provider)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gram(x: torch.Tensor) -> torch.Tensor:
    """pytorch/examples' gram_matrix, divided by C*H*W."""
    n, c, h, w = x.shape
    f = x.reshape(n, c, h * w)
    return f.bmm(f.transpose(1, 2)) / (c * h * w)


def style_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (gram(x) - target).pow(2).sum(dim=(1, 2)).mean()


def feature_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a, b)


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    dh = x[:, :, 1:, :] - x[:, :, :-1, :]
    dw = x[:, :, :, 1:] - x[:, :, :, :-1]
    return (dh.pow(2).sum() + dw.pow(2).sum()) / x.shape[0]
