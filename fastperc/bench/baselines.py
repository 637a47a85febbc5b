"""What a user would write without fastperc: the eager torch compositions the fused ops
are measured against (and, compiled, the `compile` provider)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gram(x: torch.Tensor) -> torch.Tensor:
    """pytorch/examples' gram_matrix, divided by C*H*W."""
    n, c, h, w = x.shape
    f = x.reshape(n, c, h * w)
    return f.bmm(f.transpose(1, 2)) / (c * h * w)


def style_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (gram(x) - target).pow(2).sum(dim=(1, 2)).mean()


def feature_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a, b)


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    dh = x[:, :, 1:, :] - x[:, :, :-1, :]
    dw = x[:, :, :, 1:] - x[:, :, :, :-1]
    return (dh.pow(2).sum() + dw.pow(2).sum()) / x.shape[0]


class ExamplesLoss(torch.nn.Module):
    """pytorch/examples' fast_neural_style training loss, as that script computes it:
    content = mse_loss at relu2_2, style = sum of mse_loss between Gram matrices at the four
    layers, images in [0, 255] normalised with the ImageNet statistics."""

    def __init__(self, vgg, style: torch.Tensor, content_weight: float = 1e5, style_weight: float = 1e10):
        super().__init__()
        self.vgg = vgg
        self.content_weight, self.style_weight = content_weight, style_weight
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        with torch.no_grad():
            self.style_grams = [gram(f) for f in self.vgg(self.normalize(style.to(self.mean.device))).values()]

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        return (batch / 255.0 - self.mean) / self.std

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        features_y = self.vgg(self.normalize(y))
        features_x = self.vgg(self.normalize(x))
        content = self.content_weight * F.mse_loss(features_y["relu2_2"], features_x["relu2_2"])
        style = 0.0
        for fy, gs in zip(features_y.values(), self.style_grams):
            gy = gram(fy)
            style = style + F.mse_loss(gy, gs[: len(y)].expand_as(gy))
        return content + self.style_weight * style


def instance_norm_relu(x, weight, bias):
    return F.relu(F.instance_norm(x, weight=weight, bias=bias))


def instance_norm_residual(x, weight, bias, residual):
    return F.instance_norm(x, weight=weight, bias=bias) + residual


def batch_norm_relu(x, weight, bias, running_mean, running_var):
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training=True))


def upsample_conv2d(x, weight, bias):
    """pytorch/examples' UpsampleConvLayer: nearest x2, reflection pad 1, 3x3 conv."""
    return F.conv2d(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (1, 1, 1, 1), mode="reflect"),
                    weight, bias)


def conv_transpose2d(x, weight, bias):
    """The paper's fractionally strided convolution (cuDNN / oneDNN)."""
    return F.conv_transpose2d(x, weight, bias, stride=2, padding=1, output_padding=1)


def conv_transpose2d_phases(x, weight, bias):
    """The transposed conv by its phase decomposition in plain torch: four F.conv2d of 1x1,
    1x2, 2x1 and 2x2 taps, interleaved,
        y[2m + a, 2l + b] = sum_{t <= a, s <= b} x[m + t, l + s] w[1 + a - 2t, 1 + b - 2s],
    measured beside F.conv_transpose2d (the torch backend uses the latter: it measured faster
    on the CPU)."""
    n, _, h, w = x.shape
    wt = weight.transpose(0, 1)  # (C_out, C_in, 3, 3)
    xp = F.pad(x, (0, 1, 0, 1))
    taps = ([1], [2, 0])  # the kernel rows (columns) of phase 0 and 1, by tap
    layout = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
    y = torch.empty((n, wt.shape[0], 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=layout)
    pixels = y.unflatten(2, (h, 2)).unflatten(4, (w, 2))
    for a in range(2):
        for b in range(2):
            kernel = wt[:, :, taps[a]][:, :, :, taps[b]]
            pixels[:, :, :, a, :, b] = F.conv2d(xp[:, :, :h + a, :w + b], kernel, bias)
    return y
