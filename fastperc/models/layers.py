"""The layers the image transformation networks are built from, with pytorch/examples' keys.

The fused-or-plain choice is made by the :mod:`fastperc.nn` modules inside them (their
``fused`` flag, set over a network with :func:`fastperc.nn.set_fused`); these layers only give
the modules their place and state-dict keys, and :class:`ImageNetwork` holds the networks'
one input check and layout rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastperc import nn as fnn
from fastperc.rules import natural_format

NORMS = ("instance", "batch")


class ConvLayer(nn.Module):
    """Reflection padding of kernel_size // 2, then a convolution (key ``conv2d``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.padding = kernel_size // 2
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        return self.conv2d(F.pad(x, (p, p, p, p), mode="reflect"))


class ConvTransposeLayer(nn.Module):
    """The paper's fractionally strided conv, :class:`fastperc.nn.ConvTranspose2d` (3x3,
    stride 2, padding 1, output_padding 1), under the key ``conv_transpose``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv_transpose = fnn.ConvTranspose2d(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_transpose(x)


def make_norm(kind: str, channels: int, *, relu: bool) -> nn.Module:
    """The ``kind`` ("instance": affine instance norm, "batch": batch norm) fastperc.nn norm of
    ``channels`` channels, followed by ReLU if ``relu``."""
    if kind not in NORMS:
        raise ValueError(f"norm: expected one of {list(NORMS)}, got {kind!r}")
    if kind == "instance":
        return fnn.InstanceNorm2d(channels, relu=relu)
    return fnn.BatchNorm2d(channels, relu=relu)


class ResidualBlock(nn.Module):
    """conv, norm, ReLU, conv, norm, + input (keys conv1, in1, conv2, in2)."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3, 1)
        self.in1 = make_norm(norm, channels, relu=True)
        self.conv2 = ConvLayer(channels, channels, 3, 1)
        self.in2 = make_norm(norm, channels, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.in2(self.conv2(self.in1(self.conv1(x))), residual=x)


class ImageNetwork(fnn.Fusable, nn.Module):
    """A network from (N, 3, H, W) images to images, fused or plain (its ``fused`` flag and
    that of every fastperc.nn module inside, set by :func:`fastperc.nn.set_fused`); a subclass
    defines ``body``.

    ``forward(x)`` is ``body(x)``, except that a fused network on the CPU runs it in
    channels_last and returns the result in x's layout. oneDNN runs most of these
    convolutions faster in channels_last (up to twice on two cores) and the fused norms and
    upsampling convolutions take it in place; the plain network stays in the caller's layout,
    as pytorch/examples runs it."""

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected images (N, 3, H, W), got shape {tuple(x.shape)}")
        if self.fused and x.device.type == "cpu" and natural_format(x) != torch.channels_last:
            return self.body(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return self.body(x)
