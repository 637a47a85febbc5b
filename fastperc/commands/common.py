"""What several commands share: the device, mixed precision, the loss network, the style image,
and the options that choose them.

Images are in [0, 255] (``RANGE``), the range of ``TransformerNet`` and of the loss the
commands build. Every bad value is an :class:`InputError` naming its option.
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from fastperc.commands.errors import InputError, describe_error
from fastperc.commands.images import load_image, resize_longer, to_tensor
from fastperc.losses import PerceptualLoss

RANGE = 255.0  # TransformerNet's image range; the loss sees the same images the network makes
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --amp
VGG_WEIGHT_NAMES = ("imagenet", "random")  # --vgg-weights values that are not paths


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a torch.device (default: cuda when present, else cpu), checked."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device: not a device name: {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: only cpu and cuda are supported")
    return device


def vgg_weights_arg(value: str | None) -> str | None:
    """--vgg-weights: "imagenet", "random" (None: random initialisation) or a path."""
    if value is None or value == "imagenet":
        return "imagenet"
    if value == "random":
        return None
    return value


def perceptual_loss(vgg_weights: str | None = "imagenet", **settings) -> PerceptualLoss:
    """``PerceptualLoss(**settings)`` on images in [0, 255] with the VGG weights of ``--vgg-weights``
    ("imagenet", "random" or a path). Weight files that are missing or are not VGG-16
    checkpoints, and a missing ImageNet download, are InputErrors."""
    try:
        return PerceptualLoss(weights=vgg_weights_arg(vgg_weights), input_range=RANGE, **settings)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise InputError(describe_error(exc, limit=None)) from None


def build_objective(preset: str | None = None, content_weight: float | None = None,
                    style_weight: float | None = None, tv_weight: float | None = None,
                    vgg_weights: str | None = "imagenet") -> PerceptualLoss:
    """The equation-5 loss (content, style and TV terms) with the user's preset and lambdas
    (None: the preset's)."""
    for name, value in (("--content-weight", content_weight), ("--style-weight", style_weight),
                        ("--tv-weight", tv_weight)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"{name}: expected a finite number >= 0, got {value}")
    return perceptual_loss(vgg_weights, content_weight=content_weight, style_weight=style_weight,
                           tv_weight=tv_weight, preset=preset)


def load_style(path: str | os.PathLike, style_size: int | None) -> torch.Tensor:
    """The style image as (1, 3, h, w) in [0, 255], its longer side resized to ``style_size``."""
    img = load_image(path, what="style image")
    if style_size:
        img = resize_longer(img, style_size)
    return to_tensor(img).unsqueeze(0)


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")


def add_vgg_weights_option(p: argparse.ArgumentParser, default: str | None = "imagenet") -> None:
    p.add_argument("--vgg-weights", default=default, metavar="imagenet|random|PATH",
                   help="VGG-16 loss network weights: torchvision's ImageNet checkpoint (downloaded once "
                        "to the torch hub cache), random (tests only) or a local torchvision VGG-16 "
                        "checkpoint (default imagenet)")


def add_loss_options(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The equation-5 loss settings (train, optimize, objective); without ``defaults`` every one
    defaults to None, so that ``train --resume`` can tell the given ones from the run's."""
    p.add_argument("--preset", choices=["johnson2016", "pytorch-examples"], default="johnson2016" if defaults else None,
                   help="loss definition and default weights (default johnson2016: the paper's)")
    p.add_argument("--content-weight", type=float, help="lambda_c (default: the preset's)")
    p.add_argument("--style-weight", type=float, help="lambda_s (default: the preset's)")
    p.add_argument("--tv-weight", type=float, help="lambda_TV (default: the preset's)")
    add_vgg_weights_option(p, "imagenet" if defaults else None)
