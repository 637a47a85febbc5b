"""Super-resolution network of the paper's supplementary material (x4 and x8).

    conv 9x9 3->64, BN, ReLU; 4 residual blocks of 64 (conv, BN, ReLU, conv, BN, + input);
    log2(scale) x [transposed conv 3x3 stride 2 64->64, BN, ReLU]; conv 9x9 64->3;
    output 127.5 * (tanh(y) + 1), in [0, 255].
Input (N, 3, h, w) in [0, 255] -> output (N, 3, h*scale, w*scale).
"""
from __future__ import annotations

import torch
from torch import nn

from fastperc import nn as fnn
from fastperc.models.layers import ConvLayer, ConvTransposeLayer, ImageNetwork, ResidualBlock, make_norm

SCALES = (4, 8)


class SuperResolutionNet(ImageNetwork):
    """x4 / x8 single-image super-resolution network with batch norm (or instance norm).

    Args:
        scale: 4 or 8.
        fused: run the fused fastperc ops (True) or plain torch modules (False); the flag of
            every fastperc.nn module inside, which :func:`fastperc.nn.set_fused` changes later.
        norm: "batch" (the paper's) or "instance".
    """

    def __init__(self, scale: int = 4, fused: bool = True, norm: str = "batch"):
        super().__init__()
        if isinstance(scale, bool) or scale not in SCALES:
            raise ValueError(f"scale: expected one of {list(SCALES)}, got {scale!r}")
        self.scale = scale
        self.conv1 = ConvLayer(3, 64, 9, 1)
        self.in1 = make_norm(norm, 64, relu=True)
        self.res = nn.Sequential(*(ResidualBlock(64, norm) for _ in range(4)))
        steps = scale.bit_length() - 1
        self.up = nn.ModuleList(ConvTransposeLayer(64, 64) for _ in range(steps))
        self.up_norm = nn.ModuleList(make_norm(norm, 64, relu=True) for _ in range(steps))
        self.conv_out = ConvLayer(64, 3, 9, 1)
        fnn.set_fused(self, fused)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        y = self.in1(self.conv1(x))
        y = self.res(y)
        for conv, norm in zip(self.up, self.up_norm):
            y = norm(conv(y))
        return 127.5 * (torch.tanh(self.conv_out(y)) + 1.0)
