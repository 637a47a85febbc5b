"""nn.Module wrappers of the fused ops: the one layer of fused modules the networks are built from.

Each module keeps the parameters, buffers and state-dict keys of the ``torch.nn`` module it
replaces (it subclasses it, or holds it under that module's key), so checkpoints move between
the two unchanged. Each is :class:`Fusable`: its ``fused`` flag (True by default) chooses
between the fused op and the plain torch composition it replaces, which computes the same
function of the same weights (the composition is also what a standard-operator export needs);
:func:`set_fused` flips the flag over a whole network.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fastperc.ops import batch_norm, conv_transpose2d, instance_norm, upsample_conv2d


class Fusable:
    """A module whose ``forward`` runs the fused ops (``fused = True``) or their plain torch
    composition (``fused = False``). Mixed into modules; :func:`set_fused` sets the flag."""

    fused: bool = True


def set_fused(module: nn.Module, fused: bool) -> nn.Module:
    """Set ``fused`` on ``module`` and every :class:`Fusable` module inside it; returns ``module``.

    ``set_fused(net, False)`` makes a network run the plain torch compositions (same weights,
    same function), e.g. before an export to standard operators."""
    if not isinstance(fused, bool):
        raise TypeError(f"fused: expected a bool, got {type(fused).__name__}")
    for m in module.modules():
        if isinstance(m, Fusable):
            m.fused = fused
    return module


# -- normalisation ---------------------------------------------------------------------------


def _relu_then_add(y: Tensor, relu: bool, residual: Tensor | None) -> Tensor:
    """The plain composition's tail: ReLU if ``relu``, then ``+ residual`` if given."""
    if relu:
        y = F.relu(y, inplace=True)
    return y if residual is None else y + residual


def _per_channel(t: Tensor) -> Tensor:
    """A (C,) or (N, C) parameter, broadcastable over (N, C, H, W)."""
    return t.reshape(-1 if t.dim() == 2 else 1, t.shape[-1], 1, 1)


class InstanceNorm2d(Fusable, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (affine by default) with the fused ReLU and residual add.

    ``forward(x, residual=None)`` computes ``y = γ (x − μ)/√(σ² + ε) + β`` per (n, c) over
    H×W, then ReLU if ``relu``, then ``+ residual`` if one is given (the end of a residual
    block: ``InstanceNorm2d(c)(conv2(h), residual=x)``). Parameters ``weight`` and ``bias``
    (absent with ``affine=False``) are those of ``nn.InstanceNorm2d(c, affine=True)``; running
    statistics are not tracked (``track_running_stats=False``, as in the style networks).
    ``forward(x, residual, weight=w, bias=b)`` uses ``w``, ``b`` instead of the module's own γ,
    β for that call (each (C,) or (N, C): one scale and shift per sample, the rows of a style
    table in conditional instance norm); one left None keeps the module's.
    ``fused=False``: ``nn.InstanceNorm2d.forward``, ``F.relu`` and ``+`` (with a given weight
    or bias: the unscaled ``F.instance_norm``, then ``· γ + β``).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, *,
                 relu: bool = False, fused: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps=eps, affine=affine, track_running_stats=False,
                         device=device, dtype=dtype)
        self.relu, self.fused = relu, fused

    def forward(self, x: Tensor, residual: Tensor | None = None, *, weight: Tensor | None = None,
                bias: Tensor | None = None) -> Tensor:
        given = weight is not None or bias is not None
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        if self.fused:
            return instance_norm(x, weight, bias, self.eps, relu=self.relu, residual=residual)
        if not given:
            return _relu_then_add(super().forward(x), self.relu, residual)
        y = F.instance_norm(x, eps=self.eps)
        if weight is not None:
            y = y * _per_channel(weight)
        if bias is not None:
            y = y + _per_channel(bias)
        return _relu_then_add(y, self.relu, residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}, fused={self.fused}"


class InstanceNormReLU(InstanceNorm2d):
    """``InstanceNorm2d(num_features, relu=True)``: instance norm followed by ReLU, fused."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, *,
                 fused: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps=eps, affine=affine, relu=True, fused=fused, device=device, dtype=dtype)


class BatchNorm2d(Fusable, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with the fused ReLU and residual add.

    Same parameters, buffers (``running_mean``, ``running_var``, ``num_batches_tracked``) and
    behaviour as ``nn.BatchNorm2d``: batch statistics in training mode (running statistics
    updated with ``momentum``, or as a cumulative average when ``momentum=None``), running
    statistics in eval mode. ``forward(x, residual=None)``: normalise, ReLU if ``relu``, then
    ``+ residual``. ``fused=False``: ``nn.BatchNorm2d.forward``, ``F.relu`` and ``+``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, relu: bool = False,
                 fused: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.relu, self.fused = relu, fused

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if not self.fused:
            return _relu_then_add(super().forward(x), self.relu, residual)
        # The bookkeeping of nn.BatchNorm2d.forward, verbatim in meaning.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return batch_norm(
            x, self.weight, self.bias,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            training=use_batch_stats, momentum=factor, eps=self.eps,
            relu=self.relu, residual=residual,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}, fused={self.fused}"


class BatchNormReLU(BatchNorm2d):
    """``BatchNorm2d(num_features, relu=True)``: batch norm followed by ReLU, fused (the
    paper's own network's normalisation)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 fused: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, relu=True, fused=fused,
                         device=device, dtype=dtype)


# -- upsampling convolutions -----------------------------------------------------------------


class UpsampleConv2d(Fusable, nn.Module):
    """Nearest x2 upsampling, reflection padding 1 and a 3x3 convolution, fused
    (:func:`fastperc.upsample_conv2d`; the upsampled tensor is never built).

    pytorch/examples' ``UpsampleConvLayer(in_channels, out_channels, kernel_size=3, stride=1,
    upsample=2)``, with its parameters in a ``conv2d`` (``nn.Conv2d``) child, so its state dict
    (``conv2d.weight``, ``conv2d.bias``) loads unchanged. Only that configuration exists fused:
    another ``kernel_size``, ``stride`` or ``upsample`` is a ``ValueError``. ``fused=False``:
    ``F.interpolate``, ``F.pad(mode="reflect")`` and the ``conv2d`` child, as pytorch/examples.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 upsample: int = 2, bias: bool = True, *, fused: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        for name, value, expected in (("kernel_size", kernel_size, 3), ("stride", stride, 1),
                                      ("upsample", upsample, 2)):
            if value not in (expected, (expected, expected)):
                raise ValueError(f"{name}: expected {expected} (the fused nearest-x2 upsample + 3x3 conv), "
                                 f"got {value!r}")
        self.fused = fused
        self.conv2d = nn.Conv2d(in_channels, out_channels, 3, 1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return upsample_conv2d(x, self.conv2d.weight, self.conv2d.bias)
        return self.conv2d(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (1, 1, 1, 1), mode="reflect"))

    def extra_repr(self) -> str:
        return f"upsample=2 (nearest), reflection padding 1, fused={self.fused}"


class ConvTranspose2d(Fusable, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1,
    output_padding=1)``, the paper's fractionally strided convolution, run by the fused
    :func:`fastperc.conv_transpose2d` (four phase convolutions, no inserted zeros).

    Same parameters (``weight`` (C_in, C_out, 3, 3), ``bias``) and state dict as
    ``nn.ConvTranspose2d``. Only that configuration exists fused: other hyperparameters are a
    ``ValueError``. ``forward(x, output_size=None)`` accepts only the size it produces, (2H, 2W).
    ``fused=False``: ``nn.ConvTranspose2d.forward``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=2, padding=1,
                 output_padding=1, groups: int = 1, bias: bool = True, dilation=1,
                 padding_mode: str = "zeros", device=None, dtype=None, *, fused: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups,
                         bias, dilation, padding_mode, device=device, dtype=dtype)
        for name, value, expected in (("kernel_size", self.kernel_size, (3, 3)), ("stride", self.stride, (2, 2)),
                                      ("padding", self.padding, (1, 1)),
                                      ("output_padding", self.output_padding, (1, 1)),
                                      ("dilation", self.dilation, (1, 1)), ("groups", self.groups, 1)):
            if value != expected:
                raise ValueError(f"{name}: expected {expected} (the fused 3x3 stride-2 transposed conv), "
                                 f"got {value!r}")
        self.fused = fused

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if output_size is not None:
            expected = [2 * input.shape[-2], 2 * input.shape[-1]]
            if list(output_size)[-2:] != expected:
                raise ValueError(f"output_size: expected {expected} (stride 2, output_padding 1), "
                                 f"got {list(output_size)}")
        if self.fused:
            return conv_transpose2d(input, self.weight, self.bias)
        return super().forward(input)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused={self.fused}"
