"""What the Triton launchers share: element types, dense layouts, and the one call through which
every kernel is launched (so that a launch can be recorded instead of run)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import triton.language as tl

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


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


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel, its grid, its arguments in order and its keyword
    arguments (constexprs, num_warps, num_stages)."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict


_recorded: list[Launch] | None = None


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or, inside :func:`recording`, its record."""
    if _recorded is not None:
        _recorded.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside the block, launches are recorded in the yielded list and not run, so that a
    launcher can be called on ``meta`` tensors to see what it would launch (the sm_90 compile
    check does). Not thread-safe; not re-entrant."""
    global _recorded
    if _recorded is not None:
        raise RuntimeError("recording(): already recording")
    _recorded = []
    try:
        yield _recorded
    finally:
        _recorded = None
