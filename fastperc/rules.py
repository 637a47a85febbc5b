"""The shared rules of fastperc: the bottom layer.

Every rule that more than one layer or backend relies on is written here, once: the
accumulation dtype, the natural memory format and the one-stride walk over H·W, the device
facts that launch plans are computed from, the block-size arithmetic, the precision policy of
float32 products (matrix products and convolutions), the eval-mode batch-norm statistics and
the phase decomposition of the upsampling convolution. This module imports torch and the standard library only (never
another fastperc module, never triton), so that every other module may import it.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

# -- dtypes -------------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32, or float64 for float64 inputs. Losses, statistics and
    every reduction accumulate in it, and losses are returned in it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- memory layout ------------------------------------------------------------------------------


def natural_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for channels_last-dense x (and not also NCHW-contiguous), else contiguous:
    the layout a result computed from x (its gradient, an op's output) is given."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def hw_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(s_n, s_c, s_hw) when the (H, W) plane of the 4-D ``t`` can be walked as one axis of
    H·W positions with one stride s_hw (NCHW-contiguous: s_hw = 1; channels_last: s_hw = C;
    many slices), else None. Position k = h·W + w is at n·s_n + c·s_c + k·s_hw."""
    _, _, h, w = t.shape
    s_n, s_c, s_h, s_w = t.stride()
    if w == 1:
        return s_n, s_c, s_h
    if h == 1 or s_h == w * s_w:
        return s_n, s_c, s_w
    return None


def walkable(t: torch.Tensor, *, output: bool = False) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` and its :func:`hw_strides`; where H·W cannot be walked with one stride, a
    contiguous copy of ``t`` instead (or, for an ``output`` to be written and copied back into
    ``t``, an uninitialised contiguous buffer of its shape)."""
    strides = hw_strides(t)
    if strides is None:
        t = torch.empty(t.shape, dtype=t.dtype, device=t.device) if output else t.contiguous()
        strides = hw_strides(t)
    return t, strides


# -- block sizes --------------------------------------------------------------------------------


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pow2_block(n: int, lo: int, hi: int) -> int:
    """The power of two covering n, clamped to [lo, hi] (lo and hi powers of two)."""
    return max(lo, min(hi, next_pow2(n)))


# -- device facts -------------------------------------------------------------------------------

def interpreter_requested(value: str | None) -> bool:
    """Whether a TRITON_INTERPRET value asks for Triton's CPU interpreter, as triton itself
    reads it: 1, true, yes, on or y, in any case."""
    return (value or "").lower() in ("1", "true", "yes", "on", "y")


# Read once, when fastperc is imported (triton reads it before it decorates a kernel).
INTERPRETED: bool = interpreter_requested(os.environ.get("TRITON_INTERPRET"))

# The streaming multiprocessors the interpreter pretends to have: it has none, and runs the
# programs one after another, but the plans that size their splits from the SM count should
# still split on small shapes there, so that the tests exercise the split reductions.
INTERPRETER_SMS = 2


@dataclass(frozen=True)
class DeviceFacts:
    """What a launch plan knows about the device its kernels run on.

    compiled: the kernels are compiled for a CUDA GPU; False where Triton's interpreter runs
        them (tensors on the CPU, or TRITON_INTERPRET set), which favours few, large programs.
    sms: streaming multiprocessors (INTERPRETER_SMS under the interpreter).
    """

    compiled: bool
    sms: int


H200 = DeviceFacts(compiled=True, sms=132)  # sm_90, the GPU the project is tuned for


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_facts(device: torch.device) -> DeviceFacts:
    """The :class:`DeviceFacts` of ``device`` (the GPU's properties are read once per GPU)."""
    if device.type != "cuda" or INTERPRETED:
        return DeviceFacts(compiled=False, sms=INTERPRETER_SMS)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return DeviceFacts(compiled=True, sms=_cuda_sms(index))


# -- precision policy ---------------------------------------------------------------------------


def _tf32_setting(nodes, legacy) -> bool:
    """The first of ``nodes``' ``fp32_precision`` that says "tf32" or "ieee" (torch's API since
    2.9; "none" inherits from the next node), else the legacy flag ``legacy()``, which raises
    RuntimeError once the new API has set the precision (torch's default then: no TF32)."""
    for node in nodes:
        precision = getattr(node, "fp32_precision", None)
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    try:
        return bool(legacy())
    except RuntimeError:
        return False


def matmul_tf32() -> bool:
    """Whether torch allows TF32 for float32 matrix products on CUDA, read so that it works
    with both of torch's APIs: ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee",
    or "none": inherit ``torch.backends.fp32_precision``) where this torch has it, else the
    legacy ``torch.backends.cuda.matmul.allow_tf32``. (Since torch 2.9, reading ``allow_tf32``
    raises RuntimeError once the new API has set TF32, so it is read only as the last resort.)
    Read at every launch: a program may change it between calls."""
    matmul = torch.backends.cuda.matmul
    return _tf32_setting((matmul, torch.backends), lambda: matmul.allow_tf32)


def conv_tf32() -> bool:
    """Whether torch lets cuDNN run float32 convolutions in TF32 (its default), read as
    :func:`matmul_tf32` reads the matmul setting: ``torch.backends.cudnn.conv.fp32_precision``,
    then ``torch.backends.cudnn.fp32_precision``, then ``torch.backends.fp32_precision`` (each
    "none" inheriting from the next), where this torch has them, else the legacy
    ``torch.backends.cudnn.allow_tf32``. Read at every launch."""
    cudnn = torch.backends.cudnn
    return _tf32_setting((getattr(cudnn, "conv", None), cudnn, torch.backends), lambda: cudnn.allow_tf32)


def dot_precision(dtype: torch.dtype, tf32: bool) -> str:
    """The ``input_precision`` of a Triton ``tl.dot`` on ``dtype`` operands: "tf32" for float32
    where ``tf32`` (see :func:`tf32_allowed`), else "ieee" (half precision runs on tensor
    cores as it is, float64 is exact)."""
    return "tf32" if dtype == torch.float32 and tf32 else "ieee"


def tf32_allowed(facts: DeviceFacts, *, replaces: str = "matmul") -> bool:
    """TF32 products in compiled kernels where torch allows them for the kind of op the kernel
    replaces, never under the interpreter (which computes every dot exactly).

    The policy: a fused op runs float32 in the precision of what it replaces. ``replaces``
    "matmul" (the Gram and style-loss products, which replace bmm): :func:`matmul_tf32`, off
    by default; "conv" (the upsampling convolutions, which replace cuDNN convolutions):
    :func:`conv_tf32`, on by default."""
    if replaces not in ("matmul", "conv"):
        raise ValueError(f"replaces: expected 'matmul' or 'conv', got {replaces!r}")
    return facts.compiled and (matmul_tf32() if replaces == "matmul" else conv_tf32())


# -- normalisation statistics -------------------------------------------------------------------


def split_mean(mu: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """A mean as a double-float in ``acc``: (2, ...) with [0] = mu rounded to acc and [1] the
    remainder rounded, so that x − mu = (x − [0]) − [1] stays exact when |mu| ≫ σ."""
    mu = mu.double()
    hi = mu.to(acc)
    return torch.stack([hi, (mu - hi.double()).to(acc)])


def running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm: the running statistics (C,) as the saved statistics every backend
    returns for inputs of ``dtype``: (mean (2, 1, C) double-float, var (1, C)) in the
    accumulation dtype, new tensors (a custom op's outputs never alias its inputs). The mean's
    low word keeps what float64 running statistics hold beyond the accumulation dtype."""
    acc = acc_dtype(dtype)
    mean = split_mean(running_mean.reshape(1, -1), acc)
    return mean, running_var.to(acc).reshape(1, -1).clone()


# -- the upsampling convolution's phase decomposition ------------------------------------------
#
# Nearest x2, reflection pad 1, 3x3 conv: output pixel (2i + a, 2j + b) of phase (a, b) sees
# the input rows i - 1, i, i (a = 0) or i, i, i + 1 (a = 1), so each phase is a 2x2 conv of the
# input replicate-padded by 1 with the summed weights
#     W_ab[t, s] = sum_{k, l} A[a, t, k] A[b, s, l] w[k, l],  A[0] = [[1, 0, 0], [0, 1, 1]],
#                                                             A[1] = [[1, 1, 0], [0, 0, 1]]
# (fastperc.torch_backend.upsample and fastperc.kernels.upsample_conv both run it). The sums are
# formed by slicing and adding the weight, on its device: no constant tensor is built per call.


def _fold_taps(w: torch.Tensor) -> torch.Tensor:
    """(3, ...) kernel rows k -> (2, 2, ...) [a, t]: sum_k A[a, t, k] w[k]."""
    k0, k1, k2 = w.unbind(0)
    return torch.stack([torch.stack([k0, k1 + k2]), torch.stack([k0 + k1, k2])])


def _fold_taps_adjoint(g: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`_fold_taps`: (2, 2, ...) [a, t] -> (3, ...) [k]: sum_{a, t} A[a, t, k] g[a, t]."""
    return torch.stack([g[0, 0] + g[1, 0], g[0, 1] + g[1, 0], g[0, 1] + g[1, 1]])


def upsample_phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> the phase weights W[a, b, t, s, o, c], (2, 2, 2, 2, C_out, C_in),
    summed in the accumulation dtype."""
    w = weight.to(acc_dtype(weight.dtype)).permute(2, 3, 0, 1)           # [k, l, o, c]
    rows = _fold_taps(w)                                                  # [a, t, l, o, c]
    cols = _fold_taps(rows.permute(2, 0, 1, 3, 4))                        # [b, s, a, t, o, c]
    return cols.permute(2, 0, 3, 1, 4, 5).contiguous()                    # [a, b, t, s, o, c]


def upsample_phase_weights_adjoint(grad: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`upsample_phase_weights`: dW[a, b, t, s, o, c] -> dw (C_out, C_in, 3, 3)."""
    g = grad.to(acc_dtype(grad.dtype)).permute(1, 3, 0, 2, 4, 5)          # [b, s, a, t, o, c]
    cols = _fold_taps_adjoint(g)                                          # [l, a, t, o, c]
    rows = _fold_taps_adjoint(cols.permute(1, 2, 0, 3, 4))                # [k, l, o, c]
    return rows.permute(2, 3, 0, 1).contiguous()                          # [o, c, k, l]
