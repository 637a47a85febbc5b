"""Helpers for the `fastperc` command tests (test_cli_*.py): tiny datasets, the CLI in-process
and as a subprocess, and pytorch/examples' way of loading a model. No tests here.

Everything runs on the CPU with random VGG weights and 32x32 images.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from examples_net import ExamplesTransformerNet  # the pytorch/examples network, written out
from fastperc.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]


def noise_image(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth random image (w, h) in ``mode``."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (max(2, h // 4), max(2, w // 4), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
    return img.convert(mode) if mode != "RGBA" else img


def make_style(path: Path, size=(40, 36)) -> Path:
    noise_image(size, 99).save(path)
    return path


def make_dataset(root: Path, messy: bool = False, n: int = 4) -> Path:
    """``n`` good RGB images; with ``messy``, also grayscale, RGBA, a nested WebP, a corrupt
    file, a truncated JPEG (passes the scan, fails to decode) and a text file."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        noise_image((40 + 4 * i, 36), i).save(root / f"rgb{i}.jpg")
    if messy:
        noise_image((36, 44), 10, "L").save(root / "gray.png")
        noise_image((48, 40), 11, "RGBA").save(root / "rgba.png")
        (root / "nested" / "deeper").mkdir(parents=True)
        noise_image((40, 40), 12).save(root / "nested" / "deeper" / "pic.webp")
        (root / "corrupt.jpg").write_bytes(b"this is not a JPEG at all" * 10)
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(13).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
        (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        (root / "notes.txt").write_text("not an image\n")
    return root


def train_argv(style: Path, dataset: Path, out: Path, *extra: str, iterations: int | None = 2) -> list[str]:
    """A tiny CPU run: batch 2 of 32x32 images, random VGG weights, no worker processes."""
    steps = [] if iterations is None else ["--iterations", str(iterations)]
    return ["train", "--style", str(style), "--dataset", str(dataset), "--out", str(out), *steps,
            "--batch-size", "2", "--image-size", "32", "--vgg-weights", "random", "--workers", "0",
            "--device", "cpu", "--log-every", "1", *extra]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """The command in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the command runs the CPU default backend ("torch")
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def python_m(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=ROOT)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit 2, no traceback, and the last stderr line names the problem (``needles``)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    line = last_line(err)
    for needle in needles:
        assert needle in line, f"{needle!r} not in the last stderr line {line!r}"


def load_examples_model(path: Path) -> ExamplesTransformerNet:
    """What pytorch/examples' ``neural_style.py eval`` does with --model."""
    import re

    net = ExamplesTransformerNet()
    state_dict = torch.load(path)
    for k in list(state_dict.keys()):
        if re.search(r"in\d+\.running_(mean|var)$", k):
            del state_dict[k]
    net.load_state_dict(state_dict)
    return net.eval()
