"""PerceptualLoss: the loss of Johnson et al. (2016) on a fixed VGG-16 loss network.

    total = content_weight * sum_j feature_loss(phi_j(output), phi_j(content))   j in content_layers
          + style_weight   * sum_j style_term(phi_j(output), G_j(style))          j in style_layers
          + tv_weight      * tv_loss(output, p=2)                                  (mean over the batch)

phi_j are VGG-16 activations of the images divided by ``input_range`` and ImageNet-normalised.
The style term is ``style_loss`` (paper eq. 4, squared Frobenius norm of the Gram difference,
mean over the batch); the "pytorch-examples" preset divides it by C_j^2 to reproduce that
project's ``mse_loss`` between Gram matrices.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from fastperc._checks import check_tensor
from fastperc.models.vgg import IMAGENET_MEAN, IMAGENET_STD, LAYERS, VGG16Features
from fastperc.ops import feature_loss, gram, style_loss, tv_loss


@dataclass(frozen=True)
class Preset:
    content_layers: tuple[str, ...]
    style_layers: tuple[str, ...]
    content_weight: float
    style_weight: float
    tv_weight: float
    input_range: float
    style_mean_over_gram: bool  # style term divided by C^2 (pytorch/examples' mse_loss)


PRESETS = {
    # The paper's loss definitions (eqs. 2-4). The paper does not state its lambdas; the
    # weights are fast-neural-style's train.lua defaults (content 1, style 5).
    "johnson2016": Preset(("relu2_2",), ("relu1_2", "relu2_2", "relu3_3", "relu4_3"),
                          1.0, 5.0, 0.0, 1.0, False),
    # pytorch/examples fast_neural_style/neural_style.py, exactly.
    "pytorch-examples": Preset(("relu2_2",), ("relu1_2", "relu2_2", "relu3_3", "relu4_3"),
                               1e5, 1e10, 0.0, 255.0, True),
}


def _check_images(t: object, name: str) -> torch.Tensor:
    check_tensor(t, name, ndim=4)
    if t.shape[1] != 3 or t.numel() == 0:
        raise ValueError(f"{name}: expected RGB images (N, 3, H, W), got shape {tuple(t.shape)}")
    return t


class PerceptualLoss(nn.Module):
    """Content + style (+ TV) loss on VGG-16 features.

    Args:
        content_layers, style_layers: VGG-16 ReLU names (``fastperc.models.vgg.LAYERS``).
        content_weight, style_weight, tv_weight: the lambdas; None takes the preset's.
        weights: the VGG weights, as for :class:`VGG16Features` ("imagenet", None, a path).
        input_range: images lie in [0, input_range] (1.0, or 255 for pytorch/examples).
        preset: "johnson2016" (the defaults) or "pytorch-examples"; explicit arguments
            override the preset's values.
    Use:
        loss_fn.set_style(style_image)        # (S, 3, H, W): Gram targets computed once
        loss = loss_fn(output, content)       # scalar; return_parts=True adds the named parts
    """

    def __init__(self, content_layers: Iterable[str] | None = None, style_layers: Iterable[str] | None = None,
                 content_weight: float | None = None, style_weight: float | None = None,
                 tv_weight: float | None = None, weights: str | os.PathLike | None = "imagenet",
                 input_range: float | None = None, preset: str | None = None):
        super().__init__()
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"preset: expected one of {list(PRESETS)} or None, got {preset!r}")
        base = PRESETS[preset or "johnson2016"]
        self.content_layers = tuple(base.content_layers if content_layers is None else content_layers)
        self.style_layers = tuple(base.style_layers if style_layers is None else style_layers)
        for name in self.content_layers + self.style_layers:
            if name not in LAYERS:
                raise ValueError(f"layer: expected names from {list(LAYERS)}, got {name!r}")
        self.content_weight = float(base.content_weight if content_weight is None else content_weight)
        self.style_weight = float(base.style_weight if style_weight is None else style_weight)
        self.tv_weight = float(base.tv_weight if tv_weight is None else tv_weight)
        self.input_range = float(base.input_range if input_range is None else input_range)
        if not self.input_range > 0:
            raise ValueError(f"input_range: expected a number > 0, got {input_range!r}")
        self.style_mean_over_gram = base.style_mean_over_gram
        self.vgg = VGG16Features(weights, layers=tuple(dict.fromkeys(self.content_layers + self.style_layers)))
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # (x / range - mean) / std  ==  x * scale + shift, per channel
        self.register_buffer("scale", (1.0 / (self.input_range * std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1), persistent=False)
        self.style_grams: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.vgg.eval()  # the loss network is fixed
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, input_range] -> ImageNet-normalised VGG input."""
        return torch.addcmul(self.shift.to(images.dtype), images, self.scale.to(images.dtype))

    @torch.no_grad()
    def set_style(self, style_images: torch.Tensor) -> None:
        """Compute the style Gram targets once: (C, C) per layer for one style image, or
        (S, C, C) for S images (then S must equal the batch size of each forward)."""
        _check_images(style_images, "style_images")
        feats = self.vgg(self.normalize(style_images), layers=self.style_layers)
        self.style_grams = {}
        for name in self.style_layers:
            g = gram(feats[name].float())
            self.style_grams[name] = g[0] if g.shape[0] == 1 else g

    def _style_term(self, name: str, features: torch.Tensor) -> torch.Tensor:
        target = self.style_grams[name].to(features.device)
        loss = style_loss(features, target)
        if self.style_mean_over_gram:
            loss = loss / (features.shape[1] ** 2)
        return loss

    def forward(self, output: torch.Tensor, content: torch.Tensor, return_parts: bool = False):
        """Weighted total loss of ``output`` against ``content`` and the style targets.

        output, content: (N, 3, H, W) images in [0, input_range]. The content features are
        computed without gradient and only up to the content layers. With
        ``return_parts=True`` returns (total, {"content", "style", "tv"}: weighted parts).
        """
        _check_images(output, "output")
        _check_images(content, "content")
        if output.shape != content.shape:
            raise ValueError(
                f"content: expected the shape of output {tuple(output.shape)}, got {tuple(content.shape)}"
            )
        if self.style_weight != 0 and self.style_layers and not self.style_grams:
            raise RuntimeError("PerceptualLoss: call set_style(style_images) before the forward pass")
        feats = self.vgg(self.normalize(output))
        zero = output.new_zeros((), dtype=torch.float32)
        content_part = zero
        if self.content_weight != 0 and self.content_layers:
            with torch.no_grad():
                target = self.vgg(self.normalize(content), layers=self.content_layers)
            content_part = sum(feature_loss(feats[j], target[j].to(feats[j].dtype)) for j in self.content_layers)
            content_part = self.content_weight * content_part
        style_part = zero
        if self.style_weight != 0 and self.style_layers:
            style_part = self.style_weight * sum(self._style_term(j, feats[j]) for j in self.style_layers)
        tv_part = self.tv_weight * tv_loss(output, p=2) if self.tv_weight != 0 else zero
        total = content_part + style_part + tv_part
        if return_parts:
            return total, {"content": content_part, "style": style_part, "tv": tv_part}
        return total
