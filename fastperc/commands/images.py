"""Image files in and out for the command line: RGB loading, resizing, tensors, saving.

Images are tensors of shape (3, H, W) (or (N, 3, H, W)), float32, values in [0, 255]: the
range of ``TransformerNet``. Every failure caused by the user's files is an
:class:`~fastperc.commands.errors.InputError` whose message names the file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from fastperc.commands.errors import InputError, describe_error

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm", ".pnm")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv")


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_video_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: grayscale, palette, RGBA (alpha dropped), CMYK, 16-bit."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float grayscale: scale to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float32)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """The image at ``path``, fully decoded, EXIF-rotated and converted to RGB."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: {what} not found")
    if os.path.isdir(path):
        raise InputError(f"{path}: {what} is a directory, expected an image file")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: cannot read {what} ({describe_error(exc)})") from None


def check_image_header(path: str | os.PathLike) -> None:
    """Cheap check that ``path`` is an image (header and, where the format has them, checksums)
    without decoding it. Raises InputError naming the file."""
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            img.verify()
    except Exception as exc:  # PIL raises many kinds (SyntaxError, struct.error, ...)
        raise InputError(f"{path}: not a readable image ({describe_error(exc)})") from None
    if width <= 0 or height <= 0:
        raise InputError(f"{path}: not a readable image (size {width}x{height})")


def resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size``, then centre-crop to size x size."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def resize_longer(img: Image.Image, size: int) -> Image.Image:
    """Resize so the longer side is ``size`` (aspect ratio kept)."""
    w, h = img.size
    scale = size / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [0, 255]."""
    arr = np.array(to_rgb(img), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).float()


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) tensor in [0, 255] -> (H, W, 3) uint8 array (rounded, clipped)."""
    return t.detach().float().clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def check_writable_dir(directory: str | os.PathLike, what: str) -> None:
    """Create ``directory`` if needed and check a file can be written there."""
    directory = os.fspath(directory) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise InputError(f"{what}: cannot write to {directory} ({describe_error(exc)})") from None


def check_image_output(path: str | os.PathLike) -> None:
    """``path`` can be written as an image: a known extension and a writable folder."""
    path = os.fspath(path)
    ext = Path(path).suffix.lower()
    if ext not in Image.registered_extensions():
        raise InputError(f"{path}: unknown image file extension {ext or '(none)'!r} (use .png or .jpg)")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, expected an image file name")
    check_writable_dir(os.path.dirname(path), path)


def save_image(t: torch.Tensor | Image.Image, path: str | os.PathLike) -> None:
    """Save a (3, H, W) tensor in [0, 255] (or a PIL image) to ``path``; format from the extension."""
    path = os.fspath(path)
    img = t if isinstance(t, Image.Image) else Image.fromarray(to_uint8(t))
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        img.save(path)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: cannot write image ({describe_error(exc)})") from None
