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

import argparse
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fastperc.commands.common import (RANGE, add_device_option, add_loss_options, build_objective, load_style,
                                      resolve_device)
from fastperc.commands.errors import InputError, describe_error
from fastperc.commands.images import check_image_output, check_writable_dir, load_image, save_image, to_tensor
from fastperc.losses import PerceptualLoss


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


def _equation5_options(p: argparse.ArgumentParser) -> None:
    """The inputs and settings of the equation-5 objective: optimize and objective."""
    p.add_argument("--content", required=True, metavar="IMAGE", help="the content image")
    p.add_argument("--style", required=True, metavar="IMAGE", help="the style image")
    p.add_argument("--style-size", type=int, default=256,
                   help="longer side of the style image; use the training run's (default 256)")
    add_loss_options(p)
    add_device_option(p)


def _loss_kwargs(args: argparse.Namespace) -> dict:
    return {"preset": args.preset, "content_weight": args.content_weight, "style_weight": args.style_weight,
            "tv_weight": args.tv_weight, "vgg_weights": args.vgg_weights}


def _run_optimize(args: argparse.Namespace) -> int:
    record = optimize(args.content, args.style, args.out, iterations=args.iterations, json_path=args.json,
                      style_size=args.style_size, seed=args.seed, device=args.device, **_loss_kwargs(args))
    print(f"objective after {record['iterations']} iterations: {record['history'][-1]['objective']:.6g} "
          f"(image {record['image']}, per-iteration log {record['log']})")
    return 0


def _run_objective(args: argparse.Namespace) -> int:
    values = objective(args.content, args.style, args.image, style_size=args.style_size, device=args.device,
                       **_loss_kwargs(args))
    print(json.dumps({"image": args.image, **values}))
    return 0


def register(sub) -> None:
    """``fastperc optimize`` and ``fastperc objective``: their options, on the command's subparsers."""
    o = sub.add_parser("optimize", help="the optimisation baseline (Gatys et al.): L-BFGS on the image",
                       description="Minimise the paper's equation 5 over the image with L-BFGS from white "
                                   "noise, clipping to [0, 255] each iteration; writes the image and the "
                                   "objective per iteration as JSON.")
    _equation5_options(o)
    o.add_argument("--out", required=True, metavar="OUT", help="output image")
    o.add_argument("--iterations", type=int, default=500, help="L-BFGS iterations (default 500, the paper's)")
    o.add_argument("--json", metavar="PATH", help="objective per iteration (default: OUT with .json)")
    o.add_argument("--seed", type=int, default=0, help="seed of the white-noise start (default 0)")
    o.set_defaults(func=_run_optimize)

    b = sub.add_parser("objective", help="print the equation-5 objective of an image",
                       description="Print, as JSON, the paper's equation-5 objective (and its parts) of IMAGE "
                                   "for the content and style images: compare a network's output with the "
                                   "optimisation baseline's log.")
    _equation5_options(b)
    b.add_argument("image", metavar="IMAGE", help="the image to score (same size as the content image)")
    b.set_defaults(func=_run_objective)
