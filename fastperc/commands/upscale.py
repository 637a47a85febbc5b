"""The ``fastperc upscale`` and ``fastperc sr-eval`` commands: super-resolution as in Johnson
et al. 2016, section 4.2, with the low-resolution inputs made by :func:`fastperc.degrade`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastperc.checkpoints import load_state_dict_file
from fastperc.commands.common import add_device_option, resolve_device
from fastperc.commands.data import scan_images
from fastperc.commands.errors import InputError, describe_error
from fastperc.commands.images import check_writable_dir, is_video_file, load_image, save_image, to_tensor
from fastperc.commands.stylize import ReadImages, plan
from fastperc.degradation import degrade
from fastperc.metrics import SSIM_WINDOW, psnr, ssim
from fastperc.models import SuperResolutionNet

SCALES = (4, 8)  # the factors of SuperResolutionNet
MIN_LR_SIZE = 5  # smaller inputs do not survive the network's 9x9 reflection padding

def load_sr_model(path: str | os.PathLike) -> SuperResolutionNet:
    """A SuperResolutionNet with the weights of ``path`` (a state dict or a fastperc training
    checkpoint); the scale (number of upsampling layers) and the norm are read from the keys."""
    try:
        state = dict(load_state_dict_file(path, what="super-resolution model"))
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(describe_error(exc, limit=None)) from None
    ups = {k.split(".")[1] for k in state if k.startswith("up.") and k.split(".")[1].isdigit()}
    scale = 2 ** len(ups)
    if scale not in SCALES:
        raise InputError(f"{os.fspath(path)}: not a SuperResolutionNet model ({len(ups)} upsampling layers, "
                         f"expected 2 (x4) or 3 (x8))")
    norm = "batch" if "in1.running_var" in state else "instance"
    model = SuperResolutionNet(scale=scale, fused=True, norm=norm)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise InputError(f"{os.fspath(path)}: does not fit SuperResolutionNet x{scale} ({detail[:300]})") from None
    return model.eval()


def match_histogram(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``image`` (C, H, W) with each channel's histogram matched to ``reference``'s (C, h, w):
    every value is mapped to the reference value at the same quantile (scikit-image's
    ``exposure.match_histograms`` with ``channel_axis=0``). Returns float32 on the CPU."""
    src, ref = image.detach().double().cpu().numpy(), reference.detach().double().cpu().numpy()
    out = np.empty_like(src)
    for c in range(src.shape[0]):
        s_values, s_index, s_counts = np.unique(src[c].ravel(), return_inverse=True, return_counts=True)
        r_values, r_counts = np.unique(ref[c].ravel(), return_counts=True)
        s_quantiles = np.cumsum(s_counts) / src[c].size
        r_quantiles = np.cumsum(r_counts) / ref[c].size
        out[c] = np.interp(s_quantiles, r_quantiles, r_values)[s_index].reshape(src[c].shape)
    return torch.from_numpy(out).float()


def _check_scale(scale: object) -> int:
    if isinstance(scale, bool) or scale not in SCALES:
        raise InputError(f"--scale: expected 4 or 8, got {scale}")
    return int(scale)


def upscale(model: str, inputs: list[str], out: str, *, match_hist: bool = False, device: str | None = None,
            progress: bool = True) -> int:
    """Run ``fastperc upscale``: every input image (files or folders) upscaled by the model's
    factor; with ``match_hist`` each output's colour histogram is matched to its input's."""
    if not inputs:
        raise InputError("no INPUT given (image files or folders)")
    dev = resolve_device(device)
    jobs = plan(inputs, out)
    for src, _, _ in jobs:
        if is_video_file(src):
            raise InputError(f"{src}: upscale takes images, not videos")
    net = load_sr_model(model).to(dev)
    read = ReadImages(jobs, progress)
    for src, dst, x in read:
        if min(x.shape[-2:]) < MIN_LR_SIZE:
            raise InputError(f"{src}: too small ({x.shape[-1]}x{x.shape[-2]}); the network needs at least "
                             f"{MIN_LR_SIZE}x{MIN_LR_SIZE} pixels")
        with torch.no_grad():
            y = net(x.unsqueeze(0).to(dev))[0].float().clamp(0, 255).cpu()
        if match_hist:
            y = match_histogram(y, x)
        save_image(y, dst)
    written = len(jobs) - read.skipped
    print(f"upscaled {written} image{'s' * (written != 1)} x{net.scale}: {jobs[0][1] if len(jobs) == 1 else out}")
    read.report_skipped()
    return 0


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Values as an 8-bit image file would hold them: clipped to [0, 255] and rounded."""
    return x.clamp(0, 255).round()


def evaluate_image(hr: torch.Tensor, scale: int, upscaler) -> tuple[float, float]:
    """(PSNR, SSIM) of one HR image (3, H, W) in [0, 255]: cropped to a multiple of ``scale``,
    degraded (:func:`degrade`, quantised to 8 bits), upscaled by ``upscaler`` ((1, 3, h, w) ->
    (1, 3, h*scale, w*scale)), quantised, and compared on the Y channel with ``scale`` border
    pixels removed."""
    h, w = (hr.shape[-2] // scale) * scale, (hr.shape[-1] // scale) * scale
    hr = hr[None, :, :h, :w]
    lr = quantize(degrade(hr, scale))
    sr = quantize(upscaler(lr).float())
    return (psnr(sr, hr, crop_border=scale).item(), ssim(sr, hr, crop_border=scale).item())


def bicubic_upscaler(scale: int):
    def up(lr: torch.Tensor) -> torch.Tensor:
        return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)
    return up


def sr_eval(model: str, hr_dir: str, scale: int, *, out: str | None = None, device: str | None = None,
            progress: bool = True) -> dict:
    """Run ``fastperc sr-eval``: mean PSNR and SSIM (Y channel, border ``scale``) of ``model``
    (a SuperResolutionNet file, or "bicubic") on every image under ``hr_dir``; prints a table and
    writes the results as JSON to ``out`` if given. Returns the results.

    Unreadable image files are skipped with a warning and counted (``"skipped"``). An output
    identical to its HR image has an infinite PSNR, written to the JSON as ``Infinity`` (as
    Python's json module does)."""
    scale = _check_scale(scale)
    if not os.path.isdir(hr_dir):
        what = "is not a directory" if os.path.exists(hr_dir) else "no such directory"
        raise InputError(f"{hr_dir}: --hr-dir {what}")
    if out is not None:
        check_writable_dir(os.path.dirname(os.path.abspath(out)), out)
    dev = resolve_device(device)
    if model == "bicubic":
        upscaler = bicubic_upscaler(scale)
    else:
        net = load_sr_model(model).to(dev)
        if net.scale != scale:
            raise InputError(f"{model}: an x{net.scale} model, but --scale is {scale}")
        upscaler = net
    files, bad = scan_images(hr_dir)
    for message in bad:
        print(f"warning: skipping {message}", file=sys.stderr)
    if not files:
        raise InputError(f"{hr_dir}: no readable images in --hr-dir")
    # SSIM needs 11x11 pixels after removing the border; the network needs a 5x5 input.
    min_side = max(SSIM_WINDOW + 2 * scale, MIN_LR_SIZE * scale)
    rows, undecodable = [], 0
    for path in tqdm(files, unit="image", disable=not progress or len(files) < 2, dynamic_ncols=True):
        try:
            hr = to_tensor(load_image(path)).to(dev)
        except InputError as exc:  # passed the header check, fails to decode
            tqdm.write(f"warning: skipping {exc}", file=sys.stderr)
            undecodable += 1
            continue
        h, w = hr.shape[-2:]
        if min(h, w) < scale:
            raise InputError(f"{path}: {w}x{h} is smaller than the scale {scale}")
        if min(h, w) < min_side:
            raise InputError(f"{path}: {w}x{h} is too small to measure at x{scale} (at least "
                             f"{min_side}x{min_side}: SSIM's 11x11 window after a {scale}-pixel border, "
                             f"a {MIN_LR_SIZE}x{MIN_LR_SIZE} network input)")
        with torch.no_grad():
            p, s = evaluate_image(hr, scale, upscaler)
        rows.append({"image": os.path.relpath(path, hr_dir), "psnr": p, "ssim": s})
    if not rows:
        raise InputError(f"{hr_dir}: no readable images in --hr-dir")
    result = {"model": model, "scale": scale, "images": len(rows),
              "psnr": sum(r["psnr"] for r in rows) / len(rows), "ssim": sum(r["ssim"] for r in rows) / len(rows),
              "per_image": rows, "skipped": len(bad) + undecodable,
              "protocol": "HR cropped to a multiple of the scale; LR = Gaussian blur sigma 1 + bicubic downsampling, "
                          "8-bit; output 8-bit; PSNR/SSIM on BT.601 Y with a border of `scale` pixels removed"}
    width = max(len("image"), *(len(r["image"]) for r in rows), len("mean"))
    print(f"{'image':<{width}}  {'PSNR (dB)':>9}  {'SSIM':>6}")
    for r in rows:
        print(f"{r['image']:<{width}}  {r['psnr']:>9.2f}  {r['ssim']:>6.4f}")
    print(f"{'mean':<{width}}  {result['psnr']:>9.2f}  {result['ssim']:>6.4f}")
    if out is not None:
        try:
            with open(out, "w") as f:
                json.dump(result, f, indent=2, allow_nan=True)
                f.write("\n")
        except OSError as exc:
            raise InputError(f"{out}: cannot write results ({describe_error(exc)})") from None
    return result


def register(sub) -> None:
    """``fastperc upscale`` and ``fastperc sr-eval``: their options, on the command's subparsers."""
    u = sub.add_parser("upscale", help="super-resolve images with a trained SuperResolutionNet",
                       description="Upscale images and folders (recursively) by the model's factor (x4 or x8).")
    u.add_argument("--model", required=True, help="a SuperResolutionNet state dict or training checkpoint")
    u.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    u.add_argument("--out", required=True, metavar="OUT", help="output image for one input file, else a folder")
    u.add_argument("--match-histogram", action="store_true",
                   help="match each output's colour histogram to its input's")
    add_device_option(u)
    u.set_defaults(func=_run_upscale)

    e = sub.add_parser("sr-eval", help="mean PSNR and SSIM of a super-resolution model (or bicubic)",
                       description="Degrade every image under --hr-dir as the paper does (Gaussian blur sigma 1, "
                                   "bicubic downsampling), upscale it, and report mean PSNR and SSIM on the Y "
                                   "channel with a border of --scale pixels removed.")
    e.add_argument("--model", required=True, metavar="MODEL|bicubic",
                   help="a SuperResolutionNet file, or bicubic for the bicubic-interpolation baseline")
    e.add_argument("--hr-dir", required=True, metavar="DIR", help="folder of high-resolution images")
    e.add_argument("--scale", type=int, default=4, help="4 or 8 (default 4)")
    e.add_argument("--out", metavar="JSON", help="also write the results as JSON")
    add_device_option(e)
    e.set_defaults(func=_run_sr_eval)


def _run_upscale(args: argparse.Namespace) -> int:
    return upscale(args.model, args.inputs, args.out, match_hist=args.match_histogram, device=args.device)


def _run_sr_eval(args: argparse.Namespace) -> int:
    sr_eval(args.model, args.hr_dir, args.scale, out=args.out, device=args.device)
    return 0
