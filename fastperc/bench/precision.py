"""The float32 precision a benchmark row (or a test's comparison) actually ran in on CUDA.

On CUDA, torch runs float32 cuDNN convolutions in TF32 by default and float32 cuBLAS matrix
products in IEEE float32; fastperc's Triton dots follow the matmul setting
(:func:`fastperc.rules.matmul_tf32`). A float32 timing or error is only comparable to another
computed in the same precision, so the benchmark rows say which it was.

Units: "matmul" (cuBLAS, and every Triton ``tl.dot``), "conv" (cuDNN). Elementwise and
reduction kernels have no TF32 mode: their float32 is IEEE.
"""
from __future__ import annotations

import torch

from fastperc.rules import matmul_tf32

UNITS = ("matmul", "conv")


def conv_tf32() -> bool:
    """Whether torch lets cuDNN run float32 convolutions in TF32, read so that it works with
    both of torch's APIs: ``torch.backends.cudnn.conv.fp32_precision`` ("tf32", "ieee" or
    "none": inherit ``torch.backends.cudnn.fp32_precision``, then ``torch.backends.fp32_precision``)
    where this torch has it, else the legacy ``torch.backends.cudnn.allow_tf32`` (which raises
    RuntimeError once the two APIs have been mixed)."""
    cudnn = torch.backends.cudnn
    for node in (getattr(cudnn, "conv", None), cudnn, torch.backends):
        precision = getattr(node, "fp32_precision", None) if node is not None else None
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    try:
        return bool(cudnn.allow_tf32)
    except RuntimeError:
        return False


def tf32(unit: str, device: str = "cuda") -> bool:
    """Whether float32 work on ``unit`` ("matmul" or "conv") runs in TF32 on ``device``; never
    on a CPU."""
    if unit not in UNITS:
        raise ValueError(f"unit: expected one of {UNITS}, got {unit!r}")
    if device != "cuda":
        return False
    return matmul_tf32() if unit == "matmul" else conv_tf32()


def fp32_precision(units: tuple[str, ...] | list[str], device: str) -> str:
    """"tf32" where any of ``units`` runs float32 in TF32 on ``device``, else "ieee"."""
    return "tf32" if any(tf32(u, device) for u in units) else "ieee"
