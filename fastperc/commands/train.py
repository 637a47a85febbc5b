"""`fastperc train`: train a style transfer network (Johnson et al. 2016, section 4.1).

The loop is the plain one of pytorch/examples' fast_neural_style: Adam on the
``TransformerNet``, each batch of content images x stylised to y = net(x), the loss
``PerceptualLoss(y, x)`` against the cached Gram matrices of the style image.

The run directory holds:

- ``checkpoint.pt``: model, optimizer, AMP scaler, step, the settings and the RNG states
  (plain data, loadable with ``weights_only=True``), replaced atomically every
  ``checkpoint_every`` steps, at the end, and on SIGINT/SIGTERM;
- ``log.jsonl``: one JSON object per logged step (``step`` counts completed optimizer steps
  from 1; the last step is always logged);
- ``model.pth``: the final weights as a plain state dict (pytorch/examples' layout);
- ``loss.png``: the loss curve.

Under ``torchrun`` each process trains on its share of every global batch
(DistributedDataParallel, NCCL on GPUs, gloo on the CPU); only rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from fastperc.checkpoints import load_checkpoint
from fastperc.commands.data import ImageFolder, ResumableSampler, collate, scan_images, worker_init
from fastperc.commands.images import IMAGE_EXTENSIONS, InputError, check_writable_dir, describe_error
from fastperc.models.transformer import TransformerNet
from fastperc.commands.optimize import build_objective, load_style, resolve_device

CHECKPOINT, LOG, MODEL, PLOT = "checkpoint.pt", "log.jsonl", "model.pth", "loss.png"
RUN_FILES = (CHECKPOINT, LOG, MODEL)
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """The settings of a run (the ``fastperc train`` options); saved in the checkpoint."""

    style: str | None = None
    dataset: str | None = None
    out: str | None = None
    iterations: int = 40_000          # the paper's
    epochs: int | None = None         # if set, overrides iterations
    batch_size: int = 4
    image_size: int = 256
    lr: float = 1e-3
    content_weight: float | None = None  # None: the preset's
    style_weight: float | None = None
    tv_weight: float | None = None
    preset: str = "johnson2016"
    style_size: int | None = None     # longer side of the style image; None: image_size
    vgg_weights: str = "imagenet"     # "imagenet", "random" or a path
    checkpoint_every: int = 1000
    log_every: int = 10
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    workers: int | None = None        # None: min(4, CPUs)
    device: str | None = None         # None: cuda when present, else cpu


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def holds_run(run_dir: str | os.PathLike) -> str | None:
    """The first run file found in ``run_dir``, or None."""
    for name in RUN_FILES:
        if (Path(run_dir) / name).exists():
            return name
    return None


def options_over_checkpoint(options: dict, resume: bool, fields: set, is_run_checkpoint, what: str
                            ) -> tuple[dict, dict | None]:
    """The given ``options`` (None = not given) over the saved ones of RUN_DIR's checkpoint when
    resuming. Returns (options, checkpoint or None); ``is_run_checkpoint(ckpt)`` says whether a
    loaded file is a checkpoint of this kind of run (``what`` names that kind in the error)."""
    options = {k: v for k, v in options.items() if v is not None}
    unknown = set(options) - fields
    if unknown:
        raise TypeError(f"unknown {what} options: {sorted(unknown)}")
    if not options.get("out"):
        raise InputError("--out RUN_DIR is required")
    if not resume:
        return options, None
    path = Path(options["out"]) / CHECKPOINT
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint to resume (train without --resume to start a run)")
    try:
        ckpt = load_checkpoint(path, what="training checkpoint")
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(str(exc)) from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) and is_run_checkpoint(ckpt)):
        raise InputError(f"{path}: not a fastperc {what} checkpoint")
    return {**{k: v for k, v in ckpt["args"].items() if k in fields}, **options}, ckpt


def resolve_config(options: dict, resume: bool) -> tuple[TrainConfig, dict | None]:
    """The run's settings: ``options`` (the ones given), over the checkpoint's when resuming.

    Returns (config, checkpoint or None)."""
    given = {k for k, v in options.items() if v is not None}
    options, ckpt = options_over_checkpoint(
        options, resume, FIELDS, lambda c: all(k in c for k in ("model", "optimizer", "step")), "training")
    if ckpt is not None and "iterations" in given and "epochs" not in given:
        options["epochs"] = None  # an explicit --iterations replaces the run's --epochs
    cfg = TrainConfig(**options)
    if not cfg.style:
        raise InputError("--style IMAGE is required")
    if not cfg.dataset:
        raise InputError("--dataset DIR is required")
    for name in ("iterations", "batch_size", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: expected a number >= 1, got {getattr(cfg, name)}")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise InputError(f"--epochs: expected a number >= 1, got {cfg.epochs}")
    if cfg.image_size < 16:
        raise InputError(f"--image-size: expected a number >= 16, got {cfg.image_size}")
    if cfg.style_size is not None and cfg.style_size < 16:
        raise InputError(f"--style-size: expected a number >= 16, got {cfg.style_size}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise InputError(f"--lr: expected a finite number > 0, got {cfg.lr}")
    if cfg.workers is not None and cfg.workers < 0:
        raise InputError(f"--workers: expected a number >= 0, got {cfg.workers}")
    if cfg.amp not in AMP_DTYPES:
        raise InputError(f"--amp: expected one of {list(AMP_DTYPES)}, got {cfg.amp!r}")
    return cfg, ckpt


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: a reader (or a
    SIGKILL at any moment) sees the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files left by a process killed while saving."""
    for name in (CHECKPOINT, MODEL, LOG, PLOT):
        for tmp in run_dir.glob(f".{name}.tmp-*"):
            tmp.unlink(missing_ok=True)


def read_log(path: Path) -> list[dict]:
    """The entries of log.jsonl (a torn last line, from a kill mid-write, is dropped)."""
    entries = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("step"), int):
                entries.append(entry)
    return entries


def truncate_log(path: Path, step: int) -> None:
    """Keep the entries up to ``step`` (those after the checkpoint are trained again)."""
    if path.exists():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in read_log(path) if e["step"] <= step))
        os.replace(tmp, path)


def plot_loss(log_path: Path, png_path: Path) -> None:
    """The loss curve (total and parts against the step) from log.jsonl, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    entries = read_log(log_path)
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    steps = [e["step"] for e in entries]
    positive = True
    for key, label in (("loss", "total"), ("content", "content"), ("style", "style"), ("tv", "TV")):
        values = [e.get(key) for e in entries]
        if values and all(isinstance(v, (int, float)) for v in values) and any(v != 0 for v in values):
            ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
            positive = positive and all(v > 0 for v in values)
    if positive and entries:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted loss")
    ax.set_title(f"training loss ({log_path.parent.name})")
    ax.grid(alpha=0.3)
    if entries:
        ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, png_path)


class StopSignals:
    """SIGINT and SIGTERM set ``signum``; the loop finishes its step, saves and stops.
    A second Ctrl-C stops at once (the last checkpoint is still whole)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def train(options: dict, resume: bool = False, progress: bool = True) -> int:
    """Run ``fastperc train`` with ``options`` (TrainConfig field -> value; None = default).

    Returns the exit status: 0 when done, 1 after a non-finite loss, 128 + the signal number
    after SIGINT/SIGTERM. Bad input raises InputError before anything is written."""
    rank, world, local_rank = _distributed_env()
    main = rank == 0
    cfg, ckpt = resolve_config(options, resume)
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run_dir = Path(cfg.out)

    # Checks first; nothing is written until they pass.
    if not resume and (found := holds_run(run_dir)):
        raise InputError(f"{run_dir}: already holds a run ({found}); continue it with --resume, "
                         f"or choose another --out")
    style = load_style(cfg.style, cfg.style_size or cfg.image_size)
    files, bad = scan_images(cfg.dataset)
    if main:
        for message in bad:
            _say(f"warning: skipping {message}")
    if not files:
        exts = " ".join(IMAGE_EXTENSIONS)
        raise InputError(f"{cfg.dataset}: no readable images in the dataset (looked for {exts})")
    torch.manual_seed(cfg.seed)  # a random VGG and the initial network follow the seed
    loss_fn = build_objective(cfg.preset, cfg.content_weight, cfg.style_weight, cfg.tv_weight, cfg.vgg_weights)
    net = TransformerNet(fused=True)
    if ckpt is not None:
        try:
            net.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise InputError(f"{run_dir / CHECKPOINT}: does not fit TransformerNet "
                             f"({describe_error(exc)})") from None
    if main:
        check_writable_dir(run_dir, "--out")

    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, ckpt, net, loss_fn, style, files, len(bad), device, rank, world, progress)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ckpt: dict | None, net: TransformerNet, loss_fn, style: torch.Tensor,
           files: list[str], scan_skipped: int, device: torch.device, rank: int, world: int,
           progress: bool) -> int:
    main = rank == 0
    run_dir = Path(cfg.out)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net.to(device, memory_format=memory_format)
    loss_fn.to(device)
    loss_fn.set_style(style.to(device))
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    step = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        rng = ckpt.get("rng") or {}
        if isinstance(rng.get("torch"), torch.Tensor):
            torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])

    model = net
    if world > 1:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    workers = min(4, os.cpu_count() or 1) if cfg.workers is None else cfg.workers
    sampler = ResumableSampler(len(files), cfg.batch_size, cfg.seed, rank, world)
    loader = DataLoader(ImageFolder(files, cfg.image_size), batch_size=cfg.batch_size, sampler=sampler,
                        num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
                        worker_init_fn=worker_init if workers else None, persistent_workers=workers > 0)
    total = cfg.epochs * sampler.steps_per_epoch if cfg.epochs else cfg.iterations
    amp_dtype = AMP_DTYPES[cfg.amp]

    # Absolute paths, so that --resume works from any directory.
    paths = ["style", "dataset", "out"] + ([] if cfg.vgg_weights in ("imagenet", "random") else ["vgg_weights"])
    saved_args = {k: os.path.abspath(v) if k in paths else v for k, v in dataclasses.asdict(cfg).items()}

    def checkpoint() -> dict:
        return {
            "format": "fastperc-train-1",
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "world_size": world,
            "args": saved_args,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
        }

    log_file = None
    if main:
        remove_stale_temporaries(run_dir)
        if ckpt is None:
            atomic_save(checkpoint(), run_dir / CHECKPOINT)  # step 0: a run to resume from the start
        else:
            truncate_log(run_dir / LOG, step)
        log_file = open(run_dir / LOG, "a")
        weights = {"imagenet": "ImageNet", "random": "random (not for real results)"}.get(cfg.vgg_weights,
                                                                                        cfg.vgg_weights)
        _say(f"{'resuming at step %d: ' % step if ckpt else ''}training on {len(files)} images "
             f"({sampler.steps_per_epoch} steps per epoch at batch {cfg.batch_size} x {world} processes) "
             f"to step {total}, on {device}, VGG weights {weights}")

    if main and ckpt is not None:
        saved_batch = (ckpt["args"].get("batch_size"), ckpt.get("world_size", 1))
        if saved_batch != (cfg.batch_size, world):
            _say(f"warning: the run was saved at batch {saved_batch[0]} x {saved_batch[1]} processes and "
                 f"resumes at {cfg.batch_size} x {world}: from step {step} on, it reads the data in "
                 "another order than an uninterrupted run would")

    saved_step, skipped = step, set()
    status, values = "done", [0.0] * 5
    epoch, offset = divmod(step, sampler.steps_per_epoch)
    t_log, images_since_log = time.perf_counter(), 0
    bar = tqdm(total=total, initial=step, unit="step", disable=not (main and progress), dynamic_ncols=True,
               file=sys.stderr)
    net.train()
    with StopSignals() as stop:
        while step < total and status == "done":
            sampler.set_position(epoch, offset)
            for images, failed in loader:
                for message in failed:
                    if message not in skipped:
                        skipped.add(message)
                        _say(f"warning: skipping {message}")
                x = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    y = model(x)
                    loss, parts = loss_fn(y, x, return_parts=True)
                stats = torch.stack([loss.detach().float(), parts["content"].detach().float(),
                                     parts["style"].detach().float(), parts["tv"].detach().float(),
                                     torch.tensor(float(stop.signum is not None), device=loss.device)])
                if world > 1:
                    dist.all_reduce(stats)  # every process sees the same loss and stop flag
                    stats[:4] /= world
                values = stats.tolist()
                if not all(math.isfinite(v) for v in values[:4]):
                    status = "nonfinite"
                    break
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                images_since_log += x.shape[0] * world
                if values[4] > 0:
                    status = "signal"
                rate = images_since_log / max(time.perf_counter() - t_log, 1e-9)
                bar.update(1)
                bar.set_postfix_str(f"loss {values[0]:.4g} content {values[1]:.3g} style {values[2]:.3g} "
                                    f"tv {values[3]:.3g} {rate:.1f} img/s", refresh=False)
                if main and (step % cfg.log_every == 0 or step == total or status == "signal"):
                    log_file.write(json.dumps({
                        "step": step, "epoch": epoch, "loss": values[0], "content": values[1],
                        "style": values[2], "tv": values[3], "images_per_s": rate, "world_size": world,
                    }) + "\n")
                    log_file.flush()
                    t_log, images_since_log = time.perf_counter(), 0
                if main and (step % cfg.checkpoint_every == 0 or step == total or status == "signal"):
                    atomic_save(checkpoint(), run_dir / CHECKPOINT)
                    saved_step = step
                if step >= total or status != "done":
                    break
            epoch, offset = epoch + 1, 0
        bar.close()

        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, sorted(skipped))
            skipped = set().union(*gathered)
        if not main:
            return _exit_status(status, stop.signum)
        log_file.close()
        if status == "nonfinite":
            plot_loss(run_dir / LOG, run_dir / PLOT)
            print(f"fastperc train: error: non-finite loss at step {step + 1} (loss {values[0]}, content "
                  f"{values[1]}, style {values[2]}, tv {values[3]}); stopped; {run_dir / CHECKPOINT} keeps "
                  f"step {saved_step}, the last good checkpoint", file=sys.stderr)
            return 1
        plot_loss(run_dir / LOG, run_dir / PLOT)
        n_skipped = scan_skipped + len(skipped)
        if n_skipped:
            _say(f"skipped {n_skipped} unreadable image file{'s' * (n_skipped != 1)} "
                 f"(named in the warnings above)")
        if status == "signal":
            name = signal.Signals(stop.signum or signal.SIGTERM).name
            print(f"fastperc train: stopped by {name} at step {step}; checkpoint saved to "
                  f"{run_dir / CHECKPOINT}; continue with: fastperc train --out {run_dir} --resume", file=sys.stderr)
            return _exit_status(status, stop.signum)
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        atomic_save(state, run_dir / MODEL)
        print(f"trained to step {step}: {run_dir / MODEL} (log {run_dir / LOG}, curve {run_dir / PLOT})")
        return 0


def _exit_status(status: str, signum: int | None) -> int:
    if status == "signal":
        return 128 + int(signum or signal.SIGTERM)
    return 1 if status == "nonfinite" else 0
