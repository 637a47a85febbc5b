"""`fastperc stylize`: run a trained style network on images, folders and videos.

Inputs are image files, video files or folders (searched recursively). One input file and an
``--out`` with a file extension writes that file; otherwise ``--out`` is a folder and each
output keeps its input's name (files given directly) or its path below the input folder.
Outputs have the size of their inputs: the network's output is cropped to the input size
(``TransformerNet`` rounds sizes up to a multiple of 4), and with ``--scale s`` the network
runs on the image resized by s and its output is resized back.

Videos (mp4, mov, mkv, webm, ...) need the optional video extra (imageio with its ffmpeg
binary: ``pip install 'fastperc[video]'``); the output video keeps the frame rate (audio is
not copied).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastperc.checkpoints import load_state_dict_file
from fastperc.commands.common import AMP_DTYPES, add_device_option, resolve_device
from fastperc.commands.errors import InputError, describe_error
from fastperc.commands.images import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, check_image_header, check_image_output,
                                      check_writable_dir, is_image_file, is_video_file, load_image, save_image,
                                      to_tensor, to_uint8)
from fastperc.models import TransformerNet

MIN_SIZE = 8  # smaller images do not survive the network's reflection padding


def load_model(path: str | os.PathLike) -> TransformerNet:
    """A TransformerNet with the weights of ``path`` (a state dict, a pytorch/examples model or a
    fastperc checkpoint); the variant (examples or paper) is read from the keys."""
    try:
        state = load_state_dict_file(path, what="model checkpoint")
        variant = "paper" if any(".conv_transpose." in k for k in state) else "examples"
        norm = ("batch" if "in1.running_var" in state else "instance") if variant == "paper" else None
        return TransformerNet.load(path, fused=True, variant=variant, norm=norm)
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(describe_error(exc, limit=None)) from None


def _listing(directory: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        found += [Path(dirpath) / n for n in sorted(filenames) if is_image_file(n) or is_video_file(n)]
    return found


def plan(inputs: list[str], out: str) -> list[tuple[Path, Path, bool]]:
    """(source, destination, given directly) for every input file. Checks every path."""
    sources: list[tuple[Path, Path, bool]] = []  # (source, name below --out, given directly)
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = _listing(p)
            if not found:
                raise InputError(f"{item}: no images or videos in this directory "
                                 f"(looked for {' '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)})")
            sources += [(f, f.relative_to(p), False) for f in found]
        elif p.is_file():
            if not is_video_file(p):
                check_image_header(p)
            sources.append((p, Path(p.name), True))
        else:
            raise InputError(f"{item}: no such file or directory")
    out_p = Path(out)
    single_file = len(inputs) == 1 and sources[0][2]
    if single_file and not out_p.is_dir() and out_p.suffix:
        src = sources[0][0]
        if is_video_file(src) != is_video_file(out_p):
            want = "a video" if is_video_file(src) else "an image"
            raise InputError(f"{out}: the input {src} is {want}, so --out must be {want} file name too")
        if is_video_file(out_p):
            check_writable_dir(out_p.parent, out)
        else:
            check_image_output(out_p)
        jobs = [(src, out_p, True)]
    else:
        if out_p.exists() and not out_p.is_dir():
            raise InputError(f"{out}: is a file; with a folder or several inputs --out must be a folder")
        check_writable_dir(out_p, out)
        jobs = [(src, out_p / rel, direct) for src, rel, direct in sources]
    seen: dict[Path, Path] = {}
    for src, dst, _ in jobs:
        key = dst.resolve()
        if key == src.resolve():
            raise InputError(f"{dst}: would overwrite its input; choose another --out")
        if key in seen:
            raise InputError(f"{dst}: both {seen[key]} and {src} would be written there")
        seen[key] = src
    return jobs


class Stylizer:
    """The network on a device, images in [0, 255] in and out, at the input size."""

    def __init__(self, net: TransformerNet, device: torch.device, amp: str = "off", scale: float = 1.0):
        self.net = net.to(device).eval()
        self.device, self.dtype, self.scale = device, AMP_DTYPES[amp], scale

    def size_ok(self, h: int, w: int) -> bool:
        return min(round(h * self.scale), round(w * self.scale)) >= MIN_SIZE

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 255] -> stylised (N, 3, H, W) in [0, 255], float32, on the CPU."""
        x = batch.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        if self.scale != 1.0:
            size = (round(h * self.scale), round(w * self.scale))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            y = self.net(x)
        y = y[..., : x.shape[-2], : x.shape[-1]].float()
        if self.scale != 1.0:
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return y.clamp_(0, 255).cpu()


def _video_module(path: Path):
    if importlib.util.find_spec("imageio") is None or importlib.util.find_spec("imageio_ffmpeg") is None:
        raise InputError(f"{path}: videos need the optional video extra (imageio with its ffmpeg), "
                         f"which is not installed: pip install 'fastperc[video]'")
    import imageio.v2 as iio

    return iio


def stylize_video(stylizer: Stylizer, src: Path, dst: Path, batch_size: int, progress: bool) -> int:
    """Stylise every frame of ``src`` into ``dst`` at the same frame rate; returns the frame count."""
    iio = _video_module(src)
    try:
        reader = iio.get_reader(src, format="FFMPEG")
        fps = reader.get_meta_data().get("fps") or 25
    except Exception as exc:  # imageio raises OSError, RuntimeError, IndexError, ... for bad files
        raise InputError(f"{src}: cannot read video ({describe_error(exc)})") from None
    codec = "libvpx-vp9" if dst.suffix.lower() == ".webm" else None
    dst.parent.mkdir(parents=True, exist_ok=True)
    frames = 0
    try:
        writer = iio.get_writer(dst, format="FFMPEG", fps=fps, codec=codec, macro_block_size=1)
    except Exception as exc:
        raise InputError(f"{dst}: cannot write video ({describe_error(exc)})") from None
    bar = tqdm(desc=src.name, unit="frame", disable=not progress, dynamic_ncols=True)
    try:
        batch: list[torch.Tensor] = []
        for frame in reader:
            batch.append(torch.from_numpy(frame[..., :3].copy()).permute(2, 0, 1).float())
            if len(batch) == batch_size:
                for y in stylizer(torch.stack(batch)):
                    writer.append_data(to_uint8(y))
                frames, batch = frames + len(batch), []
                bar.update(batch_size)
        if batch:
            for y in stylizer(torch.stack(batch)):
                writer.append_data(to_uint8(y))
            frames += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        reader.close()
        writer.close()
    return frames


class ReadImages:
    """Iterates (src, dst, image tensor) over planned image jobs, with a progress bar. A file
    named directly that cannot be read raises; one found in a folder is skipped with a warning
    and counted in ``skipped`` (``report_skipped()`` says the count at the end)."""

    def __init__(self, jobs: list[tuple[Path, Path, bool]], progress: bool):
        self.jobs, self.progress, self.skipped = jobs, progress, 0

    def __iter__(self):
        for src, dst, direct in tqdm(self.jobs, unit="image", disable=not self.progress or len(self.jobs) < 2,
                                     dynamic_ncols=True):
            try:
                x = to_tensor(load_image(src))
            except InputError as exc:
                if direct:
                    raise
                tqdm.write(f"warning: skipping {exc}", file=sys.stderr)
                self.skipped += 1
                continue
            yield src, dst, x

    def report_skipped(self) -> None:
        if self.skipped:
            tqdm.write(f"skipped {self.skipped} unreadable image file{'s' * (self.skipped != 1)} (named above)",
                       file=sys.stderr)


def stylize(model: str, inputs: list[str], out: str, *, device: str | None = None, amp: str = "off",
            batch_size: int = 4, scale: float = 1.0, progress: bool = True) -> int:
    """Run ``fastperc stylize``; returns the exit status (bad input raises InputError)."""
    if batch_size < 1:
        raise InputError(f"--batch-size: expected a number >= 1, got {batch_size}")
    if not (math.isfinite(scale) and scale > 0):
        raise InputError(f"--scale: expected a number > 0, got {scale}")
    if amp not in AMP_DTYPES:
        raise InputError(f"--amp: expected one of {list(AMP_DTYPES)}, got {amp!r}")
    if not inputs:
        raise InputError("no INPUT given (image files, video files or folders)")
    dev = resolve_device(device)
    jobs = plan(inputs, out)
    stylizer = Stylizer(load_model(model), dev, amp, scale)

    images = [(src, dst, direct) for src, dst, direct in jobs if not is_video_file(src)]
    videos = [(src, dst) for src, dst, _ in jobs if is_video_file(src)]
    if videos:
        _video_module(videos[0][0])  # say so before doing any work
    pending: list[tuple[torch.Tensor, Path]] = []

    def flush():
        if pending:
            for y, (_, dst) in zip(stylizer(torch.stack([x for x, _ in pending])), pending):
                save_image(y, dst)
            pending.clear()

    read = ReadImages(images, progress)
    for src, dst, x in read:
        if not stylizer.size_ok(*x.shape[-2:]):
            raise InputError(f"{src}: too small ({x.shape[-1]}x{x.shape[-2]}); the network needs at least "
                             f"{MIN_SIZE}x{MIN_SIZE} pixels after --scale")
        if pending and (len(pending) == batch_size or pending[0][0].shape != x.shape):
            flush()
        pending.append((x, dst))
    flush()
    n_frames = sum(stylize_video(stylizer, src, dst, batch_size, progress) for src, dst in videos)

    written = len(images) - read.skipped
    where = jobs[0][1] if len(jobs) == 1 else out
    parts = [f"{written} image{'s' * (written != 1)}"] + (
        [f"{len(videos)} video{'s' * (len(videos) != 1)} ({n_frames} frames)"] if videos else [])
    print(f"stylized {' and '.join(parts)}: {where}")
    read.report_skipped()
    return 0


def register(sub) -> None:
    """``fastperc stylize``: its options, on the command's subparsers."""
    s = sub.add_parser("stylize", help="apply a trained network to images, folders or videos",
                       description="Stylise images, folders (recursively) and videos with a trained model. "
                                   "Outputs have the size of their inputs.")
    s.add_argument("--model", required=True, help="model.pth, checkpoint.pt or a pytorch/examples model")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, video files or folders")
    s.add_argument("--out", required=True, metavar="OUT",
                   help="output image (or video) for one input file, else an output folder")
    add_device_option(s)
    s.add_argument("--amp", choices=list(AMP_DTYPES), default="off", help="mixed precision (default off)")
    s.add_argument("--batch-size", type=int, default=4, help="images or frames per forward pass (default 4)")
    s.add_argument("--scale", type=float, default=1.0,
                   help="run the network on the input resized by this factor, then resize back (default 1)")
    s.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return stylize(args.model, args.inputs, args.out, device=args.device, amp=args.amp,
                   batch_size=args.batch_size, scale=args.scale)
