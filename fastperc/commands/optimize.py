"""The optimisation baseline of the paper (Gatys et al.) and the objective it minimises.

Equation 5 of Johnson et al. (2016):

    y* = argmin_y  lambda_c l_feat(y, y_c) + lambda_s l_style(y, y_s) + lambda_TV l_TV(y)

the same loss the feed-forward network is trained on (``PerceptualLoss``, images in [0, 255]).
``optimize`` minimises it over the image y with L-BFGS, starting from white noise and clipping
y to [0, 255] after every iteration (the paper's projected L-BFGS), and records the objective
at every iteration. ``objective`` evaluates it for any image, such as the network's output
for y_c: together they reproduce the paper's Figure 5 comparison.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fastperc.commands.images import (InputError, check_image_output, check_writable_dir, describe_error, load_image,
                             resize_longer, save_image, to_tensor)
from fastperc.losses import PerceptualLoss

RANGE = 255.0  # TransformerNet's image range; the loss sees the same images the network makes


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


def build_objective(preset: str | None = None, content_weight: float | None = None,
                    style_weight: float | None = None, tv_weight: float | None = None,
                    vgg_weights: str | None = "imagenet") -> PerceptualLoss:
    """The equation-5 loss on images in [0, 255], with the user's VGG weights and lambdas.

    ``vgg_weights``: "imagenet", "random" or a path. Weight files that are missing or are not
    VGG-16 checkpoints, and a missing ImageNet download, are InputErrors."""
    for name, value in (("--content-weight", content_weight), ("--style-weight", style_weight),
                        ("--tv-weight", tv_weight)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"{name}: expected a finite number >= 0, got {value}")
    try:
        return PerceptualLoss(content_weight=content_weight, style_weight=style_weight, tv_weight=tv_weight,
                              weights=vgg_weights_arg(vgg_weights), input_range=RANGE, preset=preset)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise InputError(describe_error(exc, limit=None)) from None


def load_style(path: str | os.PathLike, style_size: int | None) -> torch.Tensor:
    """The style image as (1, 3, h, w) in [0, 255], its longer side resized to ``style_size``."""
    img = load_image(path, what="style image")
    if style_size:
        img = resize_longer(img, style_size)
    return to_tensor(img).unsqueeze(0)


def evaluate(loss_fn: PerceptualLoss, image: torch.Tensor, content: torch.Tensor) -> dict[str, float]:
    """The objective of ``image`` (1, 3, H, W) for the content image and the loss's style."""
    with torch.no_grad():
        total, parts = loss_fn(image, content, return_parts=True)
    return {"objective": float(total), **{k: float(v) for k, v in parts.items()}}


def _content_and_loss(content_path, style_path, style_size, loss_options, device):
    content = to_tensor(load_image(content_path, what="content image")).unsqueeze(0).to(device)
    style = load_style(style_path, style_size).to(device)
    loss_fn = build_objective(**loss_options).to(device)
    loss_fn.set_style(style)
    return content, loss_fn


def objective(content_path: str, style_path: str, image_path: str, *, style_size: int | None = 256,
              device: str | None = None, **loss_options) -> dict[str, float]:
    """The equation-5 objective of the image at ``image_path`` (same size as the content image)."""
    dev = resolve_device(device)
    image = to_tensor(load_image(image_path)).unsqueeze(0).to(dev)
    content, loss_fn = _content_and_loss(content_path, style_path, style_size, loss_options, dev)
    if image.shape != content.shape:
        raise InputError(f"{image_path}: is {image.shape[3]}x{image.shape[2]}, but the content image "
                         f"{content_path} is {content.shape[3]}x{content.shape[2]}; they must be the same size")
    return evaluate(loss_fn, image, content)


def optimize(content_path: str, style_path: str, out: str, *, iterations: int = 500,
             json_path: str | None = None, style_size: int | None = 256, seed: int = 0,
             device: str | None = None, progress: bool = True, **loss_options) -> dict:
    """Minimise equation 5 over the image with projected L-BFGS from white noise.

    Writes the image to ``out`` and, to ``json_path`` (default: ``out`` with ``.json``), the
    objective and its parts after 0, 1, ..., ``iterations`` iterations. Returns that record."""
    if iterations < 0:
        raise InputError(f"--iterations: expected a number >= 0, got {iterations}")
    json_path = json_path or str(Path(out).with_suffix(".json"))
    check_image_output(out)
    if os.path.isdir(json_path):
        raise InputError(f"{json_path}: is a directory, expected a .json file name")
    check_writable_dir(os.path.dirname(json_path), json_path)
    dev = resolve_device(device)
    content, loss_fn = _content_and_loss(content_path, style_path, style_size, loss_options, dev)

    gen = torch.Generator().manual_seed(seed)
    y = (torch.rand(content.shape, generator=gen) * RANGE).to(dev).requires_grad_(True)  # white noise
    opt = torch.optim.LBFGS([y], lr=1.0, max_iter=1, history_size=100, line_search_fn=None)
    history: list[dict] = []

    def closure():
        opt.zero_grad(set_to_none=True)
        total, parts = loss_fn(y, content, return_parts=True)
        total.backward()
        # The objective of the image as it stands: after len(history) iterations.
        history.append({"iteration": len(history), "objective": total.item(),
                        **{k: v.item() for k, v in parts.items()}})
        return total

    start = time.perf_counter()
    bar = tqdm(range(iterations), desc="L-BFGS", unit="it", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        opt.step(closure)
        with torch.no_grad():
            y.clamp_(0, RANGE)  # projection onto the valid image range
        bar.set_postfix(objective=f"{history[-1]['objective']:.4g}")
    bar.close()
    final = evaluate(loss_fn, y.detach(), content)
    history.append({"iteration": iterations, **final})
    seconds = time.perf_counter() - start

    save_image(y.detach()[0], out)
    record = {
        "content": str(content_path), "style": str(style_path), "image": str(out), "log": str(json_path),
        "iterations": iterations, "seconds": seconds, "device": str(dev),
        "settings": {"preset": loss_options.get("preset") or "johnson2016", "content_weight": loss_fn.content_weight,
                     "style_weight": loss_fn.style_weight, "tv_weight": loss_fn.tv_weight,
                     "style_size": style_size, "vgg_weights": loss_options.get("vgg_weights", "imagenet"),
                     "seed": seed},
        "history": history,
    }
    try:
        with open(json_path, "w") as f:
            json.dump(record, f, indent=1)
    except OSError as exc:
        raise InputError(f"{json_path}: cannot write ({describe_error(exc)})") from None
    return record

