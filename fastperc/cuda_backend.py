"""The ``cuda`` backend's launchers: the CUDA C++ kernels of ``csrc/`` (``fastperc._C``).

Each function has the signature and the return values of its Triton twin in
``fastperc.kernels`` (tensors and plain Python scalars in, tensors out; no autograd, no
state), so an op module's ``BackendTable`` takes it as its ``cuda=`` entry. The extension is
loaded (or built just in time, see :mod:`fastperc._cuda_ext`) on the first call, never at
import.

    tv_loss_forward(x, p, reduction) -> tv (N,) for "none", else 0-d; float32 (float64)
    tv_loss_backward(grad, x, p, reduction) -> dx, laid out as torch.empty_like(x)
    instance_norm_forward(x, weight, bias, residual, eps, relu) -> (y, mean (2, N, C), rstd (N, C))
    instance_norm_backward(dy, x, weight, bias, mean, rstd, relu) -> (dx, dweight, dbias)
        (weight, bias each (C,) or (N, C); their gradients shaped alike)
    batch_norm_forward(x, weight, bias, residual, running_mean, running_var, training, eps, relu)
        -> (y, mean (2, 1, C), var (1, C))
    batch_norm_backward(dy, x, weight, bias, mean, var, training, eps, relu) -> (dx, dweight, dbias)

Inputs may be fp16, bf16, fp32 or fp64, NCHW or channels_last (read in place; other strides
are copied once); statistics and losses accumulate in fp32 (fp64 for fp64).
"""
from __future__ import annotations

from torch import Tensor

from fastperc._cuda_ext import load

REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
# The public ops this backend implements (the others have no ``cuda`` entry).
OPS = ("tv_loss", "instance_norm", "instance_norm_relu", "batch_norm", "batch_norm_relu")


def tv_loss_forward(x: Tensor, p: int, reduction: str) -> Tensor:
    return load().tv_loss_forward(x, p, REDUCTIONS[reduction])


def tv_loss_backward(grad: Tensor, x: Tensor, p: int, reduction: str) -> Tensor:
    return load().tv_loss_backward(grad, x, p, REDUCTIONS[reduction])


def instance_norm_forward(x, weight, bias, residual, eps: float, relu: bool):
    return load().instance_norm_forward(x, weight, bias, residual, eps, relu)


def instance_norm_backward(dy, x, weight, bias, mean, rstd, relu: bool):
    return load().instance_norm_backward(dy, x, weight, bias, mean, rstd, relu)


def batch_norm_forward(x, weight, bias, residual, running_mean, running_var, training: bool, eps: float, relu: bool):
    return load().batch_norm_forward(x, weight, bias, residual, running_mean, running_var, training, eps, relu)


def batch_norm_backward(dy, x, weight, bias, mean, var, training: bool, eps: float, relu: bool):
    return load().batch_norm_backward(dy, x, weight, bias, mean, var, training, eps, relu)

