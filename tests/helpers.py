"""Shared test helpers: devices, backends, dtypes, layouts, tolerances."""
from __future__ import annotations

import pytest
import torch

import fastperc

# Relative error allowed against the float64 reference, by input dtype (DESIGN.md).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
# Float32 products in TF32 (cuDNN convolutions on CUDA by default; cuBLAS and Triton dots where
# torch allows TF32 matmuls). TF32 keeps fp16's 10 mantissa bits, so fp16's tolerance: rounding
# the operands costs about 3e-4 relative to the norm when rounded to nearest and 7.7e-4 when
# truncated, whatever the reduction length (emulated for K = 27 to 4608, K = 1152 = 9 * 128
# channels included), which the former 5e-4 did not cover.
TF32_TOLERANCE = 2e-3

LAYOUTS = ("contiguous", "channels_last", "noncontiguous")
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
ON_GPU = torch.cuda.is_available()
# Where the Triton kernels run: the GPU, else the CPU under TRITON_INTERPRET=1.
TRITON_DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(
    "triton" not in fastperc.available_backends(), reason="needs triton (CUDA or TRITON_INTERPRET=1)"
)


def backends_for(device: str) -> list[str]:
    """The available backends that run tensors on ``device``, but ``cuda``: it implements a
    few ops only, and tests/test_cuda_backend.py checks each of them against the reference."""
    names = [b for b in fastperc.available_backends() if b != "cuda"]
    if device == "cpu":
        names = [b for b in names if b != "triton" or not ON_GPU]
    return names


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    """Input dtypes to test on a backend.

    Under TRITON_INTERPRET=1 a bf16 tl.dot returned garbage (triton 3.9, numpy 2.4), so the
    interpreted Triton kernels are tested in fp32 and fp16 only; bf16 is tested on the GPU.
    """
    if backend == "triton" and device == "cpu":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def backend_device_params(with_dtype: bool = True) -> list:
    """pytest params (backend, device[, dtype]) over everything this machine can run."""

    params = []
    for device in DEVICES:
        for backend in backends_for(device):
            if not with_dtype:
                params.append(pytest.param(backend, device, id=f"{backend}-{device}"))
                continue
            for dtype in dtypes_for(backend, device):
                name = str(dtype).removeprefix("torch.")
                params.append(pytest.param(backend, device, dtype, id=f"{backend}-{device}-{name}"))
    return params


def make_input(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    layout: str = "contiguous",
    *,
    scale: float = 1.0,
    offset: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random (never zero) N(offset, scale^2) data of ``shape`` in the given memory layout.

    "noncontiguous" is a strided view into a larger buffer (every other column, an offset
    channel), so it is neither NCHW- nor channels_last-contiguous.
    """
    if layout == "noncontiguous":
        n, c, h, w = shape
        big = torch.randn((n, c + 1, h, 2 * w), dtype=torch.float64, generator=generator)
        x = (big * scale + offset).to(device=device, dtype=dtype)[:, 1:, :, ::2]
    else:
        x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale + offset
        x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# The ops whose float32 work is a product that may run in TF32 on CUDA, and on which unit
# (fastperc.bench.precision.UNITS): the convolutions run cuDNN in the reference and the torch
# backend and tl.dot in Triton; the Gram matrices a matrix product everywhere.
_CONV_OPS = ("upsample_conv2d", "conv_transpose2d")
_MATMUL_OPS = ("gram", "style_loss")


def tolerance(dtype: torch.dtype, device: str = "cpu", *, op: str | None = None, backend: str | None = None) -> float:
    """The relative error allowed against the float64 reference for ``op`` on ``backend``:
    TOLERANCE[dtype], or TF32_TOLERANCE for float32 on CUDA where the op's products run in TF32
    under torch's current settings (read as fastperc.bench.precision reads them)."""
    from fastperc.bench import precision

    if dtype != torch.float32 or device != "cuda":
        return TOLERANCE[dtype]
    if op in _CONV_OPS:
        units = ("matmul",) if backend == "triton" else ("conv",)
    elif op in _MATMUL_OPS:
        units = ("matmul",)
    else:
        units = ()
    return TF32_TOLERANCE if precision.fp32_precision(units, device) == "tf32" else TOLERANCE[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float64."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, tol: float | None = None,
                 what: str = "") -> None:
    """``out`` matches the float64 reference ``ref`` within the tolerance of ``dtype``."""
    assert out.shape == ref.shape, f"{what} shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what} has non-finite values"
    tol = TOLERANCE[dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err <= tol, f"{what} relative error {err:.3g} > {tol:.3g}"


def reference_grads(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor | None = None):
    """(value, grads) of ``fn`` in float64 on float64 copies of ``inputs``."""
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    g = torch.ones_like(out) if grad_out is None else grad_out.double()
    grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), grads


def skimage(submodule: str):
    """``skimage.<submodule>``, the independent implementation some tests compare against.

    Skips the calling test where scikit-image is not installed (the GPU test machine lacks it);
    the dev extra installs it, so CI runs these comparisons."""
    return pytest.importorskip(f"skimage.{submodule}", reason="compares against scikit-image: pip install -e '.[dev]'")
