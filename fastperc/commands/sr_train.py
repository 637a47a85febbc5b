"""`fastperc sr-train`: train a SuperResolutionNet (x4 or x8) as in Johnson et al. 2016, section 4.2.

Each step takes a batch of high-resolution images (every image under ``--dataset``, resized and
centre-cropped to ``--image-size``, 288 by default as in the paper, in a seeded order), makes
their low-resolution inputs with :func:`fastperc.degrade` (Gaussian blur sigma 1,
bicubic downsampling, 8-bit values) and minimises

* ``--loss perceptual`` (the paper's): the feature reconstruction loss at VGG-16 relu2_2,
  ``content_weight * ||phi(y) - phi(y_hr)||^2 / (CHW)``, plus ``tv_weight`` times the TV loss;
* ``--loss pixel`` (the paper's baseline): ``||y - y_hr||^2 / (CHW)`` (plus TV if asked),

with Adam (lr 1e-3, batch 4). The run directory and its files are those of ``fastperc train``
(the helpers of :mod:`fastperc.commands.train` are reused): ``checkpoint.pt`` (atomic, SIGINT/SIGTERM
save it, ``--resume`` continues with the same data order), ``log.jsonl``, ``loss.png`` and,
at the end, ``model.pth`` (a SuperResolutionNet state dict for ``fastperc upscale`` and
``fastperc sr-eval``). Single process, fp32 (no torchrun, AMP or compile here).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fastperc.commands.data import ImageFolder, ResumableSampler, collate, scan_images, worker_init
from fastperc.commands.images import IMAGE_EXTENSIONS, InputError, check_writable_dir, describe_error
from fastperc.losses import PerceptualLoss
from fastperc.models.superres import SuperResolutionNet
from fastperc.ops import feature_loss, tv_loss
from fastperc.commands.optimize import vgg_weights_arg, resolve_device
from fastperc.degradation import degrade
from fastperc.commands.upscale import MIN_LR_SIZE, SCALES, quantize
from fastperc.commands.train import (CHECKPOINT, LOG, MODEL, PLOT, StopSignals, _say, atomic_save, holds_run,
                            options_over_checkpoint, plot_loss,
                            remove_stale_temporaries, truncate_log)

FORMAT = "fastperc-sr-train-1"
LOSSES = ("perceptual", "pixel")


@dataclass
class SRTrainConfig:
    """The settings of a run (the ``fastperc sr-train`` options); saved in the checkpoint."""

    scale: int | None = None
    dataset: str | None = None
    out: str | None = None
    loss: str = "perceptual"
    iterations: int = 200_000         # the paper's
    batch_size: int = 4
    image_size: int = 288             # the paper's 288x288 patches
    lr: float = 1e-3
    content_weight: float = 1.0
    tv_weight: float = 0.0
    vgg_weights: str = "imagenet"
    checkpoint_every: int = 1000
    log_every: int = 10
    seed: int = 0
    workers: int | None = None
    device: str | None = None


FIELDS = {f.name for f in dataclasses.fields(SRTrainConfig)}


def resolve_config(options: dict, resume: bool) -> tuple[SRTrainConfig, dict | None]:
    """The run's settings: ``options`` (None = not given) over the checkpoint's when resuming."""
    options, ckpt = options_over_checkpoint(options, resume, FIELDS, lambda c: c.get("format") == FORMAT,
                                            "sr-train")
    cfg = SRTrainConfig(**options)
    if cfg.scale is None:
        raise InputError("--scale 4|8 is required")
    if isinstance(cfg.scale, bool) or cfg.scale not in SCALES:
        raise InputError(f"--scale: expected 4 or 8, got {cfg.scale}")
    if not cfg.dataset:
        raise InputError("--dataset DIR is required")
    if cfg.loss not in LOSSES:
        raise InputError(f"--loss: expected one of {list(LOSSES)}, got {cfg.loss!r}")
    for name in ("iterations", "batch_size", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: expected a number >= 1, got {getattr(cfg, name)}")
    if cfg.image_size % cfg.scale or cfg.image_size < MIN_LR_SIZE * cfg.scale:
        raise InputError(f"--image-size: expected a multiple of the scale {cfg.scale} that is at least "
                         f"{MIN_LR_SIZE * cfg.scale}, got {cfg.image_size}")
    for name in ("lr", "content_weight", "tv_weight"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and (value > 0 if name == "lr" else value >= 0)):
            raise InputError(f"--{name.replace('_', '-')}: expected a finite number {'>' if name == 'lr' else '>='}"
                             f" 0, got {value}")
    if cfg.workers is not None and cfg.workers < 0:
        raise InputError(f"--workers: expected a number >= 0, got {cfg.workers}")
    return cfg, ckpt


class SRLoss(torch.nn.Module):
    """The training objective: (weighted) perceptual or pixel loss, plus TV; returns (total, parts)."""

    def __init__(self, kind: str, content_weight: float, tv_weight: float, vgg_weights: str):
        super().__init__()
        self.kind, self.content_weight, self.tv_weight = kind, content_weight, tv_weight
        self.perceptual = None
        if kind == "perceptual":
            try:
                self.perceptual = PerceptualLoss(content_layers=("relu2_2",), style_layers=(),
                                                 content_weight=content_weight, style_weight=0.0, tv_weight=0.0,
                                                 weights=vgg_weights_arg(vgg_weights), input_range=255.0)
            except (FileNotFoundError, ValueError, RuntimeError) as exc:
                raise InputError(describe_error(exc, limit=None)) from None

    def forward(self, y: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.perceptual is not None:
            main = self.perceptual(y, hr)
        else:
            main = self.content_weight * feature_loss(y, hr)
        tv = self.tv_weight * tv_loss(y) if self.tv_weight else torch.zeros((), device=y.device)
        return main + tv, {"main": main, "tv": tv}


def sr_train(options: dict, resume: bool = False, progress: bool = True) -> int:
    """Run ``fastperc sr-train``. Returns 0 when done, 1 after a non-finite loss, 128 + the
    signal number after SIGINT/SIGTERM; bad input raises InputError before anything is written."""
    cfg, ckpt = resolve_config(options, resume)
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.out)
    if not resume and (found := holds_run(run_dir)):
        raise InputError(f"{run_dir}: already holds a run ({found}); continue it with --resume, "
                         f"or choose another --out")
    files, bad = scan_images(cfg.dataset)
    for message in bad:
        _say(f"warning: skipping {message}")
    if not files:
        raise InputError(f"{cfg.dataset}: no readable images in the dataset (looked for {' '.join(IMAGE_EXTENSIONS)})")
    torch.manual_seed(cfg.seed)
    loss_fn = SRLoss(cfg.loss, cfg.content_weight, cfg.tv_weight, cfg.vgg_weights).to(device)
    net = SuperResolutionNet(scale=cfg.scale, fused=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    step = 0
    if ckpt is not None:
        try:
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise InputError(f"{run_dir / CHECKPOINT}: does not fit SuperResolutionNet x{cfg.scale} "
                             f"({describe_error(exc)})") from None
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr
        step = int(ckpt["step"])
        if isinstance(ckpt.get("rng"), torch.Tensor):
            torch.set_rng_state(ckpt["rng"])
    check_writable_dir(run_dir, "--out")
    net.to(device)

    workers = min(4, os.cpu_count() or 1) if cfg.workers is None else cfg.workers
    sampler = ResumableSampler(len(files), cfg.batch_size, cfg.seed)
    loader = DataLoader(ImageFolder(files, cfg.image_size), batch_size=cfg.batch_size, sampler=sampler,
                        num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
                        worker_init_fn=worker_init if workers else None, persistent_workers=workers > 0)
    paths = ("dataset", "out") + (() if cfg.vgg_weights in ("imagenet", "random") else ("vgg_weights",))
    saved_args = {k: os.path.abspath(v) if k in paths else v for k, v in dataclasses.asdict(cfg).items()}

    def checkpoint() -> dict:
        return {"format": FORMAT, "model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "args": saved_args, "rng": torch.get_rng_state()}

    remove_stale_temporaries(run_dir)
    if ckpt is None:
        atomic_save(checkpoint(), run_dir / CHECKPOINT)
    else:
        truncate_log(run_dir / LOG, step)
    _say(f"{'resuming at step %d: ' % step if ckpt else ''}training a x{cfg.scale} SuperResolutionNet "
         f"({cfg.loss} loss) on {len(files)} images to step {cfg.iterations}, on {device}")
    status, values, saved_step = "done", [0.0, 0.0, 0.0], step
    epoch, offset = divmod(step, sampler.steps_per_epoch)
    t_log, images_since_log = time.perf_counter(), 0
    bar = tqdm(total=cfg.iterations, initial=step, unit="step", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    net.train()
    with StopSignals() as stop, open(run_dir / LOG, "a") as log_file:
        while step < cfg.iterations and status == "done":
            sampler.set_position(epoch, offset)
            for hr, failed in loader:
                for message in failed:
                    _say(f"warning: skipping {message}")
                hr = hr.to(device, non_blocking=True)
                lr_images = quantize(degrade(hr, cfg.scale))
                optimizer.zero_grad(set_to_none=True)
                loss, parts = loss_fn(net(lr_images), hr)
                values = [loss.item(), parts["main"].item(), parts["tv"].item()]
                if not all(math.isfinite(v) for v in values):
                    status = "nonfinite"
                    break
                loss.backward()
                optimizer.step()
                step += 1
                images_since_log += hr.shape[0]
                if stop.signum is not None:
                    status = "signal"
                rate = images_since_log / max(time.perf_counter() - t_log, 1e-9)
                bar.update(1)
                bar.set_postfix_str(f"loss {values[0]:.4g} {rate:.1f} img/s", refresh=False)
                if step % cfg.log_every == 0 or step == cfg.iterations or status == "signal":
                    # "content" holds the perceptual (or pixel) term, so loss.png plots it.
                    log_file.write(json.dumps({"step": step, "epoch": epoch, "loss": values[0], "content": values[1],
                                               "tv": values[2], "images_per_s": rate, "world_size": 1}) + "\n")
                    log_file.flush()
                    t_log, images_since_log = time.perf_counter(), 0
                if step % cfg.checkpoint_every == 0 or step == cfg.iterations or status == "signal":
                    atomic_save(checkpoint(), run_dir / CHECKPOINT)
                    saved_step = step
                if step >= cfg.iterations or status != "done":
                    break
            epoch, offset = epoch + 1, 0
        bar.close()
    plot_loss(run_dir / LOG, run_dir / PLOT)
    if status == "nonfinite":
        print(f"fastperc sr-train: error: non-finite loss at step {step + 1} ({values[0]}); stopped; "
              f"{run_dir / CHECKPOINT} keeps step {saved_step}, the last good checkpoint", file=sys.stderr)
        return 1
    if status == "signal":
        name = signal.Signals(stop.signum or signal.SIGTERM).name
        print(f"fastperc sr-train: stopped by {name} at step {step}; checkpoint saved to {run_dir / CHECKPOINT}; "
              f"continue with: fastperc sr-train --out {run_dir} --resume", file=sys.stderr)
        return 128 + int(stop.signum or signal.SIGTERM)
    atomic_save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, run_dir / MODEL)
    print(f"trained to step {step}: {run_dir / MODEL} (log {run_dir / LOG}, curve {run_dir / PLOT})")
    return 0
