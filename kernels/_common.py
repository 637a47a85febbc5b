"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import torch
import triton.language as tl

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def is_dense(t: torch.Tensor) -> bool:
    """Contiguous in NCHW or in channels_last order (no gaps, no overlap)."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def as_same_dense(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors laid out densely with identical strides, so that one flat index walks
    all of them in memory order. Copies only when the layouts differ or are not dense."""
    first = tensors[0]
    if is_dense(first) and all(t.stride() == first.stride() for t in tensors[1:]):
        return tensors
    if not is_dense(first):
        first = first.contiguous()
    fmt = torch.channels_last if not first.is_contiguous() else torch.contiguous_format
    return (first,) + tuple(t.contiguous(memory_format=fmt) for t in tensors[1:])


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor in memory order (no copy)."""
    return t.as_strided((t.numel(),), (1,))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
