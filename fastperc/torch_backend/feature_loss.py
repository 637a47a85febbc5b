"""Feature loss in plain torch: forward and backward."""
from __future__ import annotations

import torch

from fastperc.rules import acc_dtype


def feature_loss_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum((a - b)^2) / a.numel(), the squared norm accumulated in the loss dtype."""
    norm = torch.linalg.vector_norm(a - b, dtype=acc_dtype(a.dtype))
    return norm * norm / a.numel()


def feature_loss_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d loss / d a = 2 (a - b) * grad / a.numel()  (and d loss / d b is its negative)."""
    scale = (grad * (2.0 / a.numel())).to(a.dtype)
    return (a - b).mul_(scale)
