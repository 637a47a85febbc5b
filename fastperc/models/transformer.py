"""The image transformation network of fast style transfer.

``TransformerNet()`` is the pytorch/examples fast_neural_style network, with that project's
module names and state-dict keys (``conv1.conv2d.weight``, ``in1.weight``,
``res1.conv1.conv2d.weight``, ``deconv1.conv2d.weight``, ...), so checkpoints move both ways:

    conv 9x9 3->32, IN, ReLU; conv 3x3/2 32->64, IN, ReLU; conv 3x3/2 64->128, IN, ReLU;
    5 residual blocks of 128 (conv, IN, ReLU, conv, IN, + input);
    upsample x2 + conv 3x3 128->64, IN, ReLU; upsample x2 + conv 3x3 64->32, IN, ReLU;
    conv 9x9 32->3 (no output activation; images in [0, 255]).
Every conv is preceded by reflection padding of kernel_size // 2.

``variant="paper"`` is the paper's network: the upsampling layers are fractionally strided
(transposed 3x3, stride 2) convolutions, the normalisation is batch norm by default
(``norm="instance"`` selects instance norm), and the output is 127.5 * (tanh(y) + 1), in [0, 255].

``fused=True`` runs the fused ops (instance_norm and batch_norm with their ReLU and residual
add, upsample_conv2d, conv_transpose2d); ``fused=False`` runs plain torch modules.
Both compute the same function of the same weights.

Sizes: a (N, 3, H, W) input gives (N, 3, 4*ceil(ceil(H/2)/2), 4*ceil(ceil(W/2)/2)), the
pytorch/examples network's own rule (H and W multiples of 4 come back unchanged).
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from fastperc.checkpoints import load_state_dict_file
from fastperc.torch_backend.gram import natural_format
from fastperc.ops import batch_norm, conv_transpose2d, instance_norm, upsample_conv2d

VARIANTS = ("examples", "paper")
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


class UpsampleConvLayer(nn.Module):
    """Nearest x2 upsampling, reflection padding 1, 3x3 conv (key ``conv2d``).

    Fused: ``upsample_conv2d``, which never builds the upsampled tensor."""

    def __init__(self, in_channels: int, out_channels: int, fused: bool):
        super().__init__()
        self.fused = fused
        self.conv2d = nn.Conv2d(in_channels, out_channels, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return upsample_conv2d(x, self.conv2d.weight, self.conv2d.bias)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"))


class ConvTransposeLayer(nn.Module):
    """3x3 transposed conv, stride 2, padding 1, output_padding 1 (key ``conv_transpose``)."""

    def __init__(self, in_channels: int, out_channels: int, fused: bool):
        super().__init__()
        self.fused = fused
        self.conv_transpose = nn.ConvTranspose2d(in_channels, out_channels, 3, 2, padding=1, output_padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return conv_transpose2d(x, self.conv_transpose.weight, self.conv_transpose.bias)
        return self.conv_transpose(x)


def run_fused_layout(body, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """``body(x)``; a fused network on the CPU runs it in channels_last and returns the result
    in x's layout. oneDNN runs most of these convolutions faster in channels_last (up to twice
    on two cores) and the fused norms and upsampling convolutions take it in place; the plain
    network stays in the caller's layout, as pytorch/examples runs it."""
    if fused and x.device.type == "cpu" and natural_format(x) != torch.channels_last:
        return body(x.contiguous(memory_format=torch.channels_last)).contiguous()
    return body(x)


def _make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.BatchNorm2d(channels)


def _batch_norm_args(norm: nn.BatchNorm2d) -> tuple[bool, float]:
    """(training, momentum) exactly as nn.BatchNorm2d.forward derives them, counting the batch."""
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(norm.num_batches_tracked)
    return norm.training or norm.running_mean is None, momentum


def normalize(norm: nn.Module, x: torch.Tensor, *, fused: bool, relu: bool,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """norm(x), then ReLU if ``relu``, then + ``residual``: one fused op when ``fused``."""
    if fused and isinstance(norm, nn.InstanceNorm2d):
        return instance_norm(x, norm.weight, norm.bias, norm.eps, relu=relu, residual=residual)
    if fused:
        training, momentum = _batch_norm_args(norm)
        return batch_norm(x, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                          training=training, momentum=momentum, eps=norm.eps, relu=relu, residual=residual)
    y = norm(x)
    if relu:
        y = F.relu(y, inplace=True)
    return y if residual is None else y + residual


class ResidualBlock(nn.Module):
    """conv, norm, ReLU, conv, norm, + input (keys conv1, in1, conv2, in2)."""

    def __init__(self, channels: int, norm: str, fused: bool):
        super().__init__()
        self.fused = fused
        self.conv1 = ConvLayer(channels, channels, 3, 1)
        self.in1 = _make_norm(norm, channels)
        self.conv2 = ConvLayer(channels, channels, 3, 1)
        self.in2 = _make_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = normalize(self.in1, self.conv1(x), fused=self.fused, relu=True)
        return normalize(self.in2, self.conv2(y), fused=self.fused, relu=False, residual=x)


class TransformerNet(nn.Module):
    """Fast style transfer network (pytorch/examples layout; see the module docstring).

    Args:
        fused: run the fused fastperc ops (True) or plain torch modules (False).
        variant: "examples" (nearest-upsample convs, instance norm, linear output) or
            "paper" (transposed convs, scaled-tanh output).
        norm: "instance" or "batch"; default instance for "examples", batch for "paper".
    Forward: (N, 3, H, W) images in [0, 255] -> stylised images, same range.
    """

    def __init__(self, fused: bool = True, variant: str = "examples", norm: str | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
        norm = norm or ("instance" if variant == "examples" else "batch")
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {list(NORMS)}, got {norm!r}")
        self.fused, self.variant, self.norm = fused, variant, norm
        self.conv1 = ConvLayer(3, 32, 9, 1)
        self.in1 = _make_norm(norm, 32)
        self.conv2 = ConvLayer(32, 64, 3, 2)
        self.in2 = _make_norm(norm, 64)
        self.conv3 = ConvLayer(64, 128, 3, 2)
        self.in3 = _make_norm(norm, 128)
        for i in range(1, 6):
            setattr(self, f"res{i}", ResidualBlock(128, norm, fused))
        up = UpsampleConvLayer if variant == "examples" else ConvTransposeLayer
        self.deconv1 = up(128, 64, fused)
        self.in4 = _make_norm(norm, 64)
        self.deconv2 = up(64, 32, fused)
        self.in5 = _make_norm(norm, 32)
        self.deconv3 = ConvLayer(32, 3, 9, 1)

    def _block(self, conv: nn.Module, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return normalize(norm, conv(x), fused=self.fused, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected images (N, 3, H, W), got shape {tuple(x.shape)}")
        return run_fused_layout(self._forward, x, self.fused)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._block(self.conv1, self.in1, x)
        y = self._block(self.conv2, self.in2, y)
        y = self._block(self.conv3, self.in3, y)
        for i in range(1, 6):
            y = getattr(self, f"res{i}")(y)
        y = self._block(self.deconv1, self.in4, y)
        y = self._block(self.deconv2, self.in5, y)
        y = self.deconv3(y)
        if self.variant == "paper":
            y = 127.5 * (torch.tanh(y) + 1.0)
        return y

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> "TransformerNet":
        """A network with the weights of ``path``: a pytorch/examples checkpoint (old ones
        with ``inN.running_mean`` / ``running_var`` keys included), a state dict saved from
        this class, or a fastperc training checkpoint. Loaded with weights_only=True."""
        state = dict(load_state_dict_file(path, what="TransformerNet checkpoint"))
        model = cls(**kwargs)
        if model.norm == "instance":
            # InstanceNorm2d once tracked running statistics by default; they are unused.
            state = {k: v for k, v in state.items() if not re.search(r"in\d+\.running_(mean|var)$", k)}
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:2])
            raise ValueError(f"{os.fspath(path)}: does not fit TransformerNet ({detail[:300]})") from None
        return model
