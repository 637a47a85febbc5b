"""Input checks at the op boundary.

Every public op validates its arguments here before any kernel runs. A wrong type or an
integer/boolean tensor raises ``TypeError``; a wrong rank, shape, device or value raises
``ValueError``. Each message names the argument, what was expected and what was given.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t: object, name: str, *, ndim: int | Sequence[int] = 4) -> torch.Tensor:
    """``t`` is a floating-point tensor of rank ``ndim`` (an int or a choice of ints)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {t.dtype}"
        )
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if t.dim() not in ranks:
        expected = " or ".join(f"{r}-D" for r in ranks)
        layout = " (N, C, H, W)" if ranks == (4,) else ""
        raise ValueError(f"{name}: expected a {expected} tensor{layout}, got shape {tuple(t.shape)}")
    return t


def check_image(t: object, name: str) -> torch.Tensor:
    """``t`` is a non-empty 4-D (N, C, H, W) floating-point tensor."""
    check_tensor(t, name, ndim=4)
    if t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty (N, C, H, W) tensor, got shape {tuple(t.shape)}")
    return t


def check_same_shape(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{b_name}: expected the shape of {a_name} {tuple(a.shape)}, got {tuple(b.shape)}"
        )


def check_same_device(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{b_name}: expected a tensor on {a_name}'s device {a.device}, got {b.device}")


def check_choice(value: object, name: str, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_positive_finite(value: object, name: str) -> float:
    """A Python number that is finite and > 0 (eps, scales)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)
