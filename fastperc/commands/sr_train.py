"""`fastperc sr-train`: train a SuperResolutionNet (x4 or x8) as in Johnson et al. 2016, section 4.2.

Each step takes a batch of high-resolution images (every image under ``--dataset``, resized and
centre-cropped to ``--image-size``, 288 by default as in the paper, in a seeded order), makes
their low-resolution inputs on the training device with :func:`fastperc.degrade` (Gaussian blur
sigma 1, bicubic downsampling, 8-bit values) and minimises

* ``--loss perceptual`` (the paper's): the feature reconstruction loss at VGG-16 relu2_2,
  ``content_weight * ||phi(y) - phi(y_hr)||^2 / (CHW)``, plus ``tv_weight`` times the TV loss;
* ``--loss pixel`` (the paper's baseline): ``||y - y_hr||^2 / (CHW)`` (plus TV if asked),

with Adam (lr 1e-3, batch 4), logged as the terms ``perceptual`` (or ``pixel``) and ``tv``.
The run directory, resuming, signals, torchrun, AMP and the rest are the shared loop's
(:mod:`fastperc.commands.training`); ``model.pth`` is a SuperResolutionNet state dict for
``fastperc upscale`` and ``fastperc sr-eval``.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from fastperc.commands.common import add_vgg_weights_option, perceptual_loss
from fastperc.commands.errors import InputError
from fastperc.commands.training import RunConfig, Task, add_run_options, run
from fastperc.commands.upscale import MIN_LR_SIZE, SCALES, quantize
from fastperc.degradation import degrade
from fastperc.models import SuperResolutionNet
from fastperc import feature_loss, tv_loss

LOSSES = ("perceptual", "pixel")


@dataclass
class SRTrainConfig(RunConfig):
    """The settings of a run (the ``fastperc sr-train`` options); saved in the checkpoint."""

    command = "sr-train"
    checkpoint_format = "fastperc-sr-train-1"

    scale: int | None = None
    loss: str = "perceptual"
    iterations: int = 200_000         # the paper's
    image_size: int = 288             # the paper's 288x288 patches
    content_weight: float = 1.0       # of the perceptual or pixel term
    tv_weight: float = 0.0

    def check(self) -> None:
        if self.scale is None:
            raise InputError("--scale 4|8 is required")
        if isinstance(self.scale, bool) or self.scale not in SCALES:
            raise InputError(f"--scale: expected 4 or 8, got {self.scale}")
        super().check()
        if self.loss not in LOSSES:
            raise InputError(f"--loss: expected one of {list(LOSSES)}, got {self.loss!r}")
        if self.image_size % self.scale or self.image_size < MIN_LR_SIZE * self.scale:
            raise InputError(f"--image-size: expected a multiple of the scale {self.scale} that is at least "
                             f"{MIN_LR_SIZE * self.scale}, got {self.image_size}")
        for name in ("content_weight", "tv_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"--{name.replace('_', '-')}: expected a finite number >= 0, got {value}")


class SRLoss(torch.nn.Module):
    """The training objective as named weighted terms: {"perceptual" or "pixel": ..., "tv": ...}."""

    def __init__(self, kind: str, content_weight: float, tv_weight: float, vgg_weights: str):
        super().__init__()
        self.kind, self.content_weight, self.tv_weight = kind, content_weight, tv_weight
        self.perceptual = None
        if kind == "perceptual":
            self.perceptual = perceptual_loss(vgg_weights, content_layers=("relu2_2",), style_layers=(),
                                              content_weight=content_weight, style_weight=0.0, tv_weight=0.0)

    def forward(self, y: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.perceptual is not None:
            main = self.perceptual(y, hr)
        else:
            main = self.content_weight * feature_loss(y, hr)
        tv = self.tv_weight * tv_loss(y) if self.tv_weight else torch.zeros((), device=y.device)
        return {self.kind: main, "tv": tv}


class SuperResolutionTask(Task):
    """A SuperResolutionNet from degraded high-resolution images back to them."""

    def __init__(self, cfg: SRTrainConfig):
        super().__init__(cfg)
        self.model_name = f"SuperResolutionNet x{cfg.scale}"

    def description(self) -> str:
        return f"a x{self.cfg.scale} SuperResolutionNet ({self.cfg.loss} loss)"

    def build(self, device):
        cfg = self.cfg
        loss_fn = SRLoss(cfg.loss, cfg.content_weight, cfg.tv_weight, cfg.vgg_weights).to(device)
        return SuperResolutionNet(scale=cfg.scale, fused=True), loss_fn

    def prepare(self, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """High-resolution images -> (their low-resolution inputs, themselves)."""
        return quantize(degrade(hr, self.cfg.scale)), hr


def sr_train(options: dict, resume: bool = False, progress: bool = True) -> int:
    """Run ``fastperc sr-train``. Returns 0 when done, 1 after a non-finite loss, 128 + the
    signal number after SIGINT/SIGTERM; bad input raises InputError before anything is written."""
    cfg, ckpt = SRTrainConfig.resolve(options, resume)
    return run(SuperResolutionTask(cfg), ckpt, progress)


def register(sub) -> None:
    """``fastperc sr-train``: its options, on the command's subparsers."""
    st = sub.add_parser("sr-train", help="train a super-resolution network (x4 or x8)",
                        description="Train a SuperResolutionNet on the images under --dataset, degraded as the "
                                    "paper does (Gaussian blur sigma 1, bicubic downsampling). Writes "
                                    "RUN_DIR/checkpoint.pt, log.jsonl, loss.png and model.pth.")
    st.add_argument("--scale", type=int, help="4 or 8")
    st.add_argument("--dataset", metavar="DIR", help="folder of high-resolution images (searched recursively)")
    add_run_options(st, SRTrainConfig)
    st.add_argument("--loss", help="perceptual (relu2_2 feature loss, the paper's; default) or pixel")
    st.add_argument("--content-weight", type=float, help="weight of the perceptual or pixel term (default 1)")
    st.add_argument("--tv-weight", type=float, help="weight of the TV term (default 0)")
    add_vgg_weights_option(st, default=None)
    st.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return sr_train({k: v for k, v in vars(args).items() if k in SRTrainConfig.fields()}, resume=args.resume)
