"""Total-variation loss in plain torch: forward and backward.

Differences are taken in x's dtype (a difference of two close values is exact, so half
precision loses little here) and reduced in the loss dtype (float32, float64 for float64) by
``torch.linalg.vector_norm(..., dtype=)``, which upcasts inside its kernel: the squares of
half-precision image differences would overflow float16. The backward works on slices of one
``empty_like(x)`` output, in place, with the per-image scale folded into the in-place updates.
"""
from __future__ import annotations

import torch

from fastperc.rules import acc_dtype


def _tv_sum(d: torch.Tensor, p: int, dims, acc: torch.dtype) -> torch.Tensor:
    """sum |d|^p over ``dims`` (all dims for None) in ``acc``."""
    norm = torch.linalg.vector_norm(d, ord=p, dim=dims, dtype=acc)
    return norm * norm if p == 2 else norm


def tv_loss_forward(x: torch.Tensor, p: int, reduction: str) -> torch.Tensor:
    """x: (N, C, H, W) -> tv per image (N,) for "none", else its sum or batch mean (0-d)."""
    acc = acc_dtype(x.dtype)
    dh = x[:, :, 1:, :] - x[:, :, :-1, :]
    dw = x[:, :, :, 1:] - x[:, :, :, :-1]
    dims = (1, 2, 3) if reduction == "none" else None
    total = _tv_sum(dh, p, dims, acc) + _tv_sum(dw, p, dims, acc)
    if reduction == "mean":
        total = total / x.shape[0]
    return total


def tv_loss_backward(grad: torch.Tensor, x: torch.Tensor, p: int, reduction: str) -> torch.Tensor:
    """d tv / d x in x's dtype and memory format (see ``reference.tv_loss_backward``)."""
    acc = acc_dtype(x.dtype)
    # Per-image scale g_n (times 2 for p = 2) as an (N or 1, 1, 1, 1) tensor: a dimensioned
    # float32 operand makes the in-place updates of a half-precision dx compute in float32.
    scale = grad.to(acc).reshape(-1, 1, 1, 1)
    if reduction == "mean":
        scale = scale / x.shape[0]
    if p == 2:
        scale = scale * 2
    dx = torch.empty_like(x)

    dw = x[:, :, :, 1:] - x[:, :, :, :-1]
    if p == 1:
        dw.sign_()
    torch.mul(dw, -scale, out=dx[:, :, :, :-1])  # - phi'(dw[j])
    dx[:, :, :, -1].zero_()
    dx[:, :, :, 1:].addcmul_(dw, scale)  # + phi'(dw[j - 1])
    del dw

    dh = x[:, :, 1:, :] - x[:, :, :-1, :]
    if p == 1:
        dh.sign_()
    dx[:, :, 1:, :].addcmul_(dh, scale)  # + phi'(dh[i - 1])
    dx[:, :, :-1, :].addcmul_(dh, scale, value=-1)  # - phi'(dh[i])
    return dx
