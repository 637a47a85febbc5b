"""Instance and batch normalisation with the fused ReLU and residual add, as custom ops.

    y = γ (x − μ) / √(σ² + ε) + β,  then ReLU if ``relu``,  then + ``residual`` if given

with μ and the biased variance σ² per (n, c) over H×W (instance norm) or per c over N×H×W
(batch norm, training mode; the running statistics in eval mode).

Custom ops (``torch.ops.fastperc.*``), all functional (they mutate nothing):

* ``instance_norm(x, weight?, bias?, residual?, eps, relu, backend) -> (y, mean, rstd)``
* ``batch_norm(x, weight?, bias?, residual?, running_mean?, running_var?, training, eps, relu,
  backend) -> (y, mean, var)``
* their ``*_backward`` ops ``-> (dx, dweight, dbias)``.

Instance norm's ``weight`` and ``bias`` are each (C,) or (N, C): one scale and shift per
sample and channel (conditional instance norm), a (C,) and an (N, C) one may be mixed; each
gradient has its parameter's shape. Batch norm's are (C,).

``mean`` (2, G, C) is the double-float mean (``mean[0] + mean[1]``), ``rstd``/``var`` (G, C),
all in the accumulation dtype (float32; float64 for float64 inputs); G = N for instance norm,
1 for batch norm. They are what the backward needs: it recomputes the ReLU mask from x and
them (no y or mask is saved; the mask must be recomputed anyway when a residual follows the
ReLU), and d residual is dy itself.

Running statistics: batch norm's custom op only reads them (eval mode). In training mode the
public wrapper updates them from the op's returned batch mean and variance, in place, as
``F.batch_norm`` does. A custom op that declares ``mutates_args`` cannot have an autograd
formula (``register_autograd`` refuses non-functional ops), and the in-place update outside
the op traces cleanly under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastperc import cuda_backend, reference
from fastperc._checks import check_image, check_positive_finite, check_same_device, check_same_shape, check_tensor
from fastperc.backends import resolve_backend
from fastperc.ops._dispatch import BackendTable, triton_kernel
from fastperc.rules import acc_dtype
from fastperc.torch_backend import norm as torch_impl


def _table(name: str) -> BackendTable:
    return BackendTable(
        name,
        reference=getattr(reference, name),
        torch=getattr(torch_impl, name),
        triton=triton_kernel("norm", name),
        cuda=getattr(cuda_backend, name),
    )


_in_forward = _table("instance_norm_forward")
_in_backward = _table("instance_norm_backward")
_bn_forward = _table("batch_norm_forward")
_bn_backward = _table("batch_norm_backward")


def _fake_outputs(x: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty((2, groups, c), dtype=acc), x.new_empty((groups, c), dtype=acc))


def _fake_grads(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """dx like x; dweight, dbias shaped as their parameter ((C,) where it is None), in A."""
    acc = acc_dtype(x.dtype)

    def grad(p: Tensor | None) -> Tensor:
        return x.new_empty(p.shape if p is not None else (x.shape[1],), dtype=acc)

    return torch.empty_like(x), grad(weight), grad(bias)


# -- instance norm -------------------------------------------------------------------------


@torch.library.custom_op("fastperc::instance_norm", mutates_args=())
def instance_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                     eps: float, relu: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_in_forward(backend, x, weight, bias, residual, eps, relu))


@instance_norm_op.register_fake
def _(x, weight, bias, residual, eps, relu, backend):
    return _fake_outputs(x, x.shape[0])


@torch.library.custom_op("fastperc::instance_norm_backward", mutates_args=())
def instance_norm_backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                              mean: Tensor, rstd: Tensor, relu: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); the parameter gradients in the accumulation dtype, each shaped as its
    parameter ((C,) or (N, C); (C,) for None)."""
    return tuple(_in_backward(backend, dy, x, weight, bias, mean, rstd, relu))


@instance_norm_backward_op.register_fake
def _(dy, x, weight, bias, mean, rstd, relu, backend):
    return _fake_grads(x, weight, bias)


def _param_grads(ctx, dweight: Tensor, dbias: Tensor, weight: Tensor | None, bias: Tensor | None):
    need = ctx.needs_input_grad
    return (dweight.to(weight.dtype) if need[1] else None), (dbias.to(bias.dtype) if need[2] else None)


def _in_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, relu, backend = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.relu = relu
    ctx.backend = backend


def _in_backward_formula(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = instance_norm_backward_op(dy, x, weight, bias, mean, rstd, ctx.relu, ctx.backend)
    dweight, dbias = _param_grads(ctx, dweight, dbias, weight, bias)
    need = ctx.needs_input_grad
    return (dx if need[0] else None), dweight, dbias, (dy if need[3] else None), None, None, None


instance_norm_op.register_autograd(_in_backward_formula, setup_context=_in_setup_context)


# -- batch norm ----------------------------------------------------------------------------


@torch.library.custom_op("fastperc::batch_norm", mutates_args=())
def batch_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                  eps: float, relu: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): batch statistics when ``training`` (biased var), else the running ones."""
    return tuple(_bn_forward(backend, x, weight, bias, residual, running_mean, running_var, training, eps, relu))


@batch_norm_op.register_fake
def _(x, weight, bias, residual, running_mean, running_var, training, eps, relu, backend):
    return _fake_outputs(x, 1)


@torch.library.custom_op("fastperc::batch_norm_backward", mutates_args=())
def batch_norm_backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           mean: Tensor, var: Tensor, training: bool, eps: float, relu: bool,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_bn_backward(backend, dy, x, weight, bias, mean, var, training, eps, relu))


@batch_norm_backward_op.register_fake
def _(dy, x, weight, bias, mean, var, training, eps, relu, backend):
    return _fake_grads(x, weight, bias)


def _bn_setup_context(ctx, inputs, output):
    x, weight, bias, residual, running_mean, running_var, training, eps, relu, backend = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.training, ctx.eps, ctx.relu, ctx.backend = training, eps, relu, backend


def _bn_backward_formula(ctx, dy, _dmean, _dvar):
    x, weight, bias, mean, var = ctx.saved_tensors
    dx, dweight, dbias = batch_norm_backward_op(dy, x, weight, bias, mean, var, ctx.training, ctx.eps,
                                                ctx.relu, ctx.backend)
    dweight, dbias = _param_grads(ctx, dweight, dbias, weight, bias)
    need = ctx.needs_input_grad
    return (dx if need[0] else None), dweight, dbias, (dy if need[3] else None), None, None, None, None, None, None


batch_norm_op.register_autograd(_bn_backward_formula, setup_context=_bn_setup_context)


# -- checks and public wrappers ------------------------------------------------------------


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def _check_channel_vector(t: Tensor | None, name: str, x: Tensor, *, per_sample: bool = False) -> None:
    """``t`` is None or a (C,) tensor on x's device; or, where ``per_sample``, an (N, C) one."""
    if t is None:
        return
    n, c = x.shape[:2]
    check_tensor(t, name, ndim=(1, 2) if per_sample else 1)
    if per_sample and tuple(t.shape) not in ((c,), (n, c)):
        raise ValueError(f"{name}: expected shape ({c},) or ({n}, {c}) (x has {n} samples of {c} channels), "
                         f"got {tuple(t.shape)}")
    if not per_sample and t.shape[0] != c:
        raise ValueError(f"{name}: expected shape ({c},) (x has {c} channels), got {tuple(t.shape)}")
    check_same_device(x, "x", t, name)


def _check_common(x, weight, bias, eps, relu, residual, *, per_sample: bool) -> tuple[float, Tensor | None]:
    """-> (eps, residual); under autocast a residual of another float dtype is cast to x's, as
    the add ``norm(x) + residual`` would promote it there. ``per_sample``: weight and bias may be
    (N, C) (instance norm)."""
    check_image(x, "x")
    _check_channel_vector(weight, "weight", x, per_sample=per_sample)
    _check_channel_vector(bias, "bias", x, per_sample=per_sample)
    if residual is not None:
        check_tensor(residual, "residual")
        check_same_shape(x, "x", residual, "residual")
        check_same_device(x, "x", residual, "residual")
        if residual.dtype != x.dtype:
            if not torch.is_autocast_enabled(x.device.type):
                raise TypeError(f"residual: expected the dtype of x ({x.dtype}), got {residual.dtype}")
            residual = residual.to(x.dtype)
    _check_flag(relu, "relu")
    return check_positive_finite(eps, "eps"), residual


def instance_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5, *,
                  relu: bool = False, residual: Tensor | None = None, backend: str | None = None) -> Tensor:
    """Instance normalisation, then ReLU if ``relu``, then ``+ residual`` if given.

        y = γ (x − μ) / √(σ² + ε) + β,  μ, σ² (biased) per (n, c) over H×W

    The order of the pytorch/examples residual block: ``instance_norm(conv2(h), w, b,
    residual=x)`` is ``in2(conv2(h)) + x`` (no ReLU after the add).

    Args:
        x: (N, C, H, W) float16/bfloat16/float32/float64, H·W > 1, any memory format (the
            output keeps it: channels_last in, channels_last out).
        weight, bias: γ and β, each (C,), or (N, C) for one scale and shift per sample and
            channel (conditional instance norm: γ[n, c], β[n, c]), or None (1 and 0); any
            float dtype. Their gradients have their shapes.
        eps: ε > 0.
        relu: apply ReLU after the affine transform.
        residual: a tensor of x's shape and dtype added last, or None (under autocast any
            float dtype: it is cast to x's).
        backend: force a backend (see :mod:`fastperc.backends`).
    Returns:
        y, shaped and typed as x. Statistics accumulate in float32 (float64 for float64 x).
    """
    eps, residual = _check_common(x, weight, bias, eps, relu, residual, per_sample=True)
    if x.shape[2] * x.shape[3] == 1:
        # As F.instance_norm: one spatial element has no variance to normalise by.
        raise ValueError(f"x: expected more than 1 spatial element (H·W > 1), got shape {tuple(x.shape)}")
    return instance_norm_op(x, weight, bias, residual, eps, relu, resolve_backend(backend, x.device))[0]


def instance_norm_relu(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5, *,
                       backend: str | None = None) -> Tensor:
    """``instance_norm(x, weight, bias, eps, relu=True)``: instance norm followed by ReLU (weight
    and bias (C,) or (N, C) as there)."""
    return instance_norm(x, weight, bias, eps, relu=True, backend=backend)


def batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               running_mean: Tensor | None = None, running_var: Tensor | None = None, training: bool = True,
               momentum: float = 0.1, eps: float = 1e-5, *, relu: bool = False, residual: Tensor | None = None,
               backend: str | None = None) -> Tensor:
    """Batch normalisation as ``F.batch_norm``, then ReLU if ``relu``, then ``+ residual``.

        y = γ (x − μ) / √(σ² + ε) + β,  μ, σ² per channel

    ``training=True``: μ and the biased σ² of the batch over (N, H, W); ``running_mean`` and
    ``running_var``, when given, are updated in place as ``F.batch_norm`` does:
    r_μ ← (1 − m) r_μ + m μ and r_σ² ← (1 − m) r_σ² + m σ² M/(M − 1), M = N·H·W.
    ``training=False``: μ and σ² are the running statistics (which are then required).

    Args:
        x: (N, C, H, W), any memory format (kept by the output).
        weight, bias: (C,) or None; running_mean, running_var: (C,) or both None.
        momentum: m in [0, 1]. ``None`` (the cumulative average of ``nn.BatchNorm2d``) needs the
            module's batch count: use :class:`fastperc.nn.BatchNorm2d`.
        eps: ε > 0. relu, residual, backend: as :func:`instance_norm`.
    """
    eps, residual = _check_common(x, weight, bias, eps, relu, residual, per_sample=False)
    _check_flag(training, "training")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: expected both or neither, got "
                         f"{'running_mean' if running_var is None else 'running_var'} only")
    _check_channel_vector(running_mean, "running_mean", x)
    _check_channel_vector(running_var, "running_var", x)
    if momentum is None:
        raise ValueError("momentum: None (a cumulative moving average) needs the number of batches seen; "
                         "use fastperc.nn.BatchNorm2d(momentum=None), or pass 1 / num_batches_tracked")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum: expected a number, got {type(momentum).__name__}")
    if not (math.isfinite(momentum) and 0 <= momentum <= 1):
        raise ValueError(f"momentum: expected a number in [0, 1], got {momentum!r}")
    if training:
        count = x.numel() // x.shape[1]
        if count == 1:
            raise ValueError(f"x: expected more than 1 value per channel when training, got shape {tuple(x.shape)}")
    elif running_mean is None:
        raise ValueError("running_mean, running_var: required when training=False (they are the statistics)")
    backend = resolve_backend(backend, x.device)
    y, mean, var = batch_norm_op(x, weight, bias, residual, None if training else running_mean,
                                 None if training else running_var, training, eps, relu, backend)
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_((mean[0, 0] + mean[1, 0]).to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var[0] * (count / (count - 1))).to(running_var.dtype),
                                                alpha=momentum)
    return y


def batch_norm_relu(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                    running_mean: Tensor | None = None, running_var: Tensor | None = None, training: bool = True,
                    momentum: float = 0.1, eps: float = 1e-5, *, backend: str | None = None) -> Tensor:
    """``batch_norm(..., relu=True)``: batch norm followed by ReLU (the paper's network)."""
    return batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, relu=True,
                      backend=backend)
