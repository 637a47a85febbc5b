"""`fastperc train`: train a style transfer network (Johnson et al. 2016, section 4.1).

The task is the plain one of pytorch/examples' fast_neural_style: Adam on the
``TransformerNet``, each batch of content images x stylised to y = net(x), the loss
``PerceptualLoss(y, x)`` against the cached Gram matrices of the style image, logged as its
terms ``content``, ``style`` and ``tv``. The run directory, resuming, signals, torchrun and the
rest are the shared loop's (:mod:`fastperc.commands.training`); ``model.pth`` is a plain state
dict in pytorch/examples' layout.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from fastperc.commands.common import add_loss_options, build_objective, load_style
from fastperc.commands.errors import InputError
from fastperc.commands.training import PATH, RunConfig, Task, add_run_options, run
from fastperc.models import TransformerNet


@dataclass
class TrainConfig(RunConfig):
    """The settings of a run (the ``fastperc train`` options); saved in the checkpoint."""

    command = "train"
    checkpoint_format = "fastperc-train-1"

    style: str | None = field(default=None, metadata=PATH)
    iterations: int = 40_000          # the paper's
    image_size: int = 256
    content_weight: float | None = None  # None: the preset's
    style_weight: float | None = None
    tv_weight: float | None = None
    preset: str = "johnson2016"
    style_size: int | None = None     # longer side of the style image; None: image_size

    def check(self) -> None:
        if not self.style:
            raise InputError("--style IMAGE is required")
        super().check()
        if self.image_size < 16:
            raise InputError(f"--image-size: expected a number >= 16, got {self.image_size}")
        if self.style_size is not None and self.style_size < 16:
            raise InputError(f"--style-size: expected a number >= 16, got {self.style_size}")


class StyleTask(Task):
    """A TransformerNet against the equation-5 loss of one style image."""

    model_name = "TransformerNet"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.style = load_style(cfg.style, cfg.style_size or cfg.image_size)  # a bad image stops here

    def description(self) -> str:
        weights = {"imagenet": "ImageNet", "random": "random (not for real results)"}.get(self.cfg.vgg_weights,
                                                                                         self.cfg.vgg_weights)
        return f"a {self.model_name} (VGG weights {weights})"

    def build(self, device):
        cfg = self.cfg
        loss_fn = build_objective(cfg.preset, cfg.content_weight, cfg.style_weight, cfg.tv_weight, cfg.vgg_weights)
        loss_fn.to(device).set_style(self.style.to(device))

        def terms(y, x):
            return loss_fn(y, x, return_parts=True)[1]

        return TransformerNet(fused=True), terms


def train(options: dict, resume: bool = False, progress: bool = True) -> int:
    """Run ``fastperc train`` with ``options`` (TrainConfig field -> value; None = default).

    Returns the exit status: 0 when done, 1 after a non-finite loss, 128 + the signal number
    after SIGINT/SIGTERM. Bad input raises InputError before anything is written."""
    cfg, ckpt = TrainConfig.resolve(options, resume)
    return run(StyleTask(cfg), ckpt, progress)


def register(sub) -> None:
    """``fastperc train``: its options, on the command's subparsers."""
    t = sub.add_parser("train", help="train a style transfer network",
                       description="Train a TransformerNet on every image under --dataset to the style of "
                                   "--style. Writes RUN_DIR/checkpoint.pt, log.jsonl, loss.png and model.pth.")
    t.add_argument("--style", metavar="IMAGE", help="the style image")
    t.add_argument("--dataset", metavar="DIR", help="folder of content images (searched recursively)")
    add_run_options(t, TrainConfig)
    add_loss_options(t, defaults=False)
    t.add_argument("--style-size", type=int, help="longer side of the style image (default: --image-size)")
    t.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return train({k: v for k, v in vars(args).items() if k in TrainConfig.fields()}, resume=args.resume)

