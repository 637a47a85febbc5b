"""`make demo` (``python -m fastperc.commands.demo``): the whole job, small, with nothing to download.

It generates a small dataset of synthetic scenes and a synthetic style image, trains a style
network on them for a few dozen steps (``fastperc train``'s code, with worker processes,
checkpoints and the log), stylizes a sample scene that was not in the training set, and scores
the content image and the stylized one with the paper's equation-5 objective. Everything goes
to ``demo_out/`` (rewritten on each run):

    style.png, content.png, stylized.png, comparison.png   the images
    loss.png                                               the training loss curve
    NOTE.txt                                               what ran, the numbers, what next
    run/                                                   the training run (checkpoint, log, model.pth)
    data/                                                  the generated training images

The VGG-16 loss network uses torchvision's ImageNet weights when they are already in the torch
hub cache, and random weights otherwise: the pipeline then runs end to end, but the result is
not a real style transfer.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFilter

from fastperc.commands.common import build_objective, load_style
from fastperc.commands.errors import InputError
from fastperc.commands.images import load_image, save_image, to_tensor
from fastperc.commands.optimize import evaluate
from fastperc.commands.stylize import Stylizer, load_model
from fastperc.commands.train import train
from fastperc.commands.training import LOG, MODEL, PLOT
from fastperc.models.vgg import IMAGENET_URL, imagenet_weights_path

DEFAULTS = {"steps": 30, "images": 16, "image_size": 64, "batch_size": 4, "lr": 5e-3, "seed": 0}


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(256) for _ in range(3))


def make_scene(rng: random.Random, width: int, height: int) -> Image.Image:
    """A synthetic "photo": a vertical gradient sky, a sun, hills, a few houses and blobs."""
    top, bottom = _colour(rng), _colour(rng)
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):
        t = y / max(1, height - 1)
        draw.line([(0, y), (width, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    r = rng.randint(height // 10, height // 5)
    cx, cy = rng.randint(0, width), rng.randint(0, height // 2)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, rng.randint(180, 255), rng.randint(0, 120)))
    for _ in range(rng.randint(1, 3)):  # hills
        base = rng.randint(height // 2, height)
        pts = [(0, height)] + [(x, base - rng.randint(0, height // 3)) for x in range(0, width + 16, 16)]
        draw.polygon(pts + [(width, height)], fill=_colour(rng))
    for _ in range(rng.randint(1, 4)):  # houses
        w = rng.randint(width // 10, width // 4)
        x, y = rng.randint(0, width - w), rng.randint(height // 2, height - w // 2)
        draw.rectangle([x, y, x + w, y + w], fill=_colour(rng))
        draw.polygon([(x - 2, y), (x + w // 2, y - w // 2), (x + w + 2, y)], fill=_colour(rng))
    for _ in range(rng.randint(2, 6)):  # blobs
        x, y, s = rng.randint(0, width), rng.randint(0, height), rng.randint(3, max(4, width // 8))
        draw.ellipse([x - s, y - s, x + s, y + s], fill=_colour(rng))
    return img.filter(ImageFilter.GaussianBlur(0.6))


def make_style(size: int = 128) -> Image.Image:
    """A synthetic "painting": bold diagonal stripes under concentric rings, strong colours."""
    palette = [(230, 57, 70), (241, 196, 15), (29, 53, 87), (69, 123, 157), (244, 162, 97), (38, 70, 83)]
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = palette[((x + 2 * y) // 9) % len(palette)]
    draw = ImageDraw.Draw(img)
    for i, (cx, cy) in enumerate([(size * 0.3, size * 0.35), (size * 0.72, size * 0.68)]):
        for k, r in enumerate(range(int(size * 0.28), 2, -7)):
            colour = palette[(k + 3 * i) % len(palette)]
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=4)
    return img


def _comparison(paths: list[tuple[str, Path]], out: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3 * len(paths), 3.3), dpi=100)
    for i, (title, path) in enumerate(paths):
        ax = fig.add_subplot(1, len(paths), i + 1)
        ax.imshow(Image.open(path).convert("RGB"), interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out)


def run_demo(out: Path, steps: int, images: int, image_size: int, batch_size: int, lr: float,
             seed: int, workers: int = 1, progress: bool = True) -> dict:
    """Build the demo's inputs, train, stylize, score; returns the numbers written to NOTE.txt."""
    start = time.perf_counter()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    for owned in ("run", "data"):  # the demo's own output from an earlier run
        shutil.rmtree(out / owned, ignore_errors=True)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)

    rng = random.Random(seed)
    for i in range(images):
        w, h = rng.choice([(80, 64), (64, 80), (96, 72), (72, 72)])
        make_scene(rng, w, h).save(data / f"scene{i:03d}.{'png' if i % 3 else 'jpg'}")
    make_style().save(out / "style.png")
    make_scene(random.Random(seed + 1000), 120, 90).save(out / "content.png")

    weights_file = imagenet_weights_path()
    real = weights_file.is_file()
    if real:
        print(f"demo: using the ImageNet VGG-16 weights at {weights_file}", file=sys.stderr)
    else:
        print(f"demo: the ImageNet VGG-16 weights are not at {weights_file}, so the loss network has "
              f"RANDOM weights: the run shows the pipeline working, not a real style transfer. Real "
              f"results need the ImageNet weights ({IMAGENET_URL}).", file=sys.stderr)
    vgg = str(weights_file) if real else "random"

    status = train({"style": str(out / "style.png"), "dataset": str(data), "out": str(out / "run"),
                    "iterations": steps, "batch_size": batch_size, "image_size": image_size,
                    "style_size": image_size * 2, "lr": lr, "vgg_weights": vgg, "seed": seed,
                    "checkpoint_every": max(1, steps // 2), "log_every": 1, "workers": workers,
                    "device": "cpu"}, progress=progress)
    if status != 0:
        raise RuntimeError(f"demo: training stopped with status {status}")
    train_seconds = time.perf_counter() - start

    net = load_model(out / "run" / MODEL)
    stylizer = Stylizer(net, torch.device("cpu"))
    content = to_tensor(load_image(out / "content.png")).unsqueeze(0)
    stylized = stylizer(content)
    save_image(stylized[0], out / "stylized.png")
    shutil.copyfile(out / "run" / PLOT, out / "loss.png")
    _comparison([("content", out / "content.png"), ("style", out / "style.png"),
                 ("stylized", out / "stylized.png")], out / "comparison.png")

    torch.manual_seed(seed)  # the same random VGG as the training run
    loss_fn = build_objective(vgg_weights=vgg)
    loss_fn.set_style(load_style(out / "style.png", image_size * 2))
    scores = {"content image": evaluate(loss_fn, content, content)["objective"],
              "stylized": evaluate(loss_fn, stylized, content)["objective"]}
    log = [json.loads(line) for line in (out / "run" / LOG).read_text().splitlines()]
    result = {"real_weights": real, "weights": vgg, "steps": steps, "first_loss": log[0]["loss"],
              "last_loss": log[-1]["loss"], "objective": scores, "seconds": time.perf_counter() - start,
              "train_seconds": train_seconds, "images": images, "image_size": image_size}
    _write_note(out, result)
    return result


def _write_note(out: Path, r: dict) -> None:
    weights = ("the ImageNet VGG-16 weights" if r["real_weights"] else
               "RANDOM VGG-16 weights, because the ImageNet weights are not in the torch hub cache.\n"
               "  The images show the pipeline working, not a real style transfer: real results need\n"
               f"  the ImageNet weights ({IMAGENET_URL},\n  saved as {imagenet_weights_path()}).")
    lines = [
        "fastperc demo",
        "",
        f"Trained a style network (TransformerNet, fused ops) for {r['steps']} steps on {r['images']} generated",
        f"scenes at {r['image_size']}x{r['image_size']} against the generated style.png, then stylized content.png",
        f"(not in the training set) into stylized.png. {r['seconds']:.0f} s in all on this machine.",
        "",
        f"Loss network: {weights}",
        "",
        f"Training loss: {r['first_loss']:.4g} at step 1, {r['last_loss']:.4g} at step {r['steps']} (loss.png).",
        "Equation-5 objective (paper, section 4.1) for content.png:",
        f"  the content image itself   {r['objective']['content image']:.4g}",
        f"  the network's output       {r['objective']['stylized']:.4g}",
        "",
        "Files: comparison.png (content | style | stylized), style.png, content.png, stylized.png,",
        "loss.png, run/ (checkpoint.pt, log.jsonl, model.pth), data/ (the generated training images).",
        "",
        "For real results (ImageNet VGG weights, a folder of photos such as MS-COCO, a GPU):",
        "  fastperc train --style STYLE.jpg --dataset COCO_DIR --out runs/mystyle",
        "  fastperc stylize --model runs/mystyle/model.pth photo.jpg --out photo_styled.jpg",
        "  fastperc optimize --content photo.jpg --style STYLE.jpg --out baseline.png   # Gatys et al.",
        "  fastperc objective --content photo.jpg --style STYLE.jpg photo_styled.jpg",
    ]
    (out / "NOTE.txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastperc.commands.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps")
    p.add_argument("--images", type=int, default=DEFAULTS["images"], help="generated training images")
    p.add_argument("--image-size", type=int, default=DEFAULTS["image_size"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    args = p.parse_args(argv)
    try:
        r = run_demo(Path(args.out), args.steps, args.images, args.image_size, args.batch_size, args.lr,
                     args.seed)
    except InputError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"demo: done in {r['seconds']:.0f} s; see {Path(args.out) / 'NOTE.txt'} and "
          f"{Path(args.out) / 'comparison.png'}")
    if not r["real_weights"]:
        print("demo: these used RANDOM VGG weights; real results need the ImageNet weights (see NOTE.txt)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
