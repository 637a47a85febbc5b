"""The training loop of ``fastperc train`` and ``fastperc sr-train``, and the run directory it keeps.

A command gives the loop a :class:`Task`: its settings (a :class:`RunConfig`), the network, the
loss as named weighted terms, and the preparation of each batch of dataset images. Everything
else is the same for every task and lives here, once:

- the run directory (:class:`RunDir`): ``checkpoint.pt`` (model, optimizer, AMP scaler, step,
  the settings and the RNG states; plain data, loadable with ``weights_only=True``), replaced
  atomically every ``checkpoint_every`` steps, at the end and on SIGINT/SIGTERM; ``log.jsonl``,
  one JSON object per logged step (``step`` counts completed optimizer steps from 1, the last
  step is always logged): ``step``, ``epoch``, ``loss`` (the sum of the terms), each term under
  its name, ``images_per_s``, ``world_size``; ``loss.png``, the curve of the total and of every
  term logged; and, at the end, ``model.pth``, the final weights as a plain state dict;
- resuming: the settings come from the checkpoint (options given again override them) and
  :class:`~fastperc.commands.data.ResumableSampler` reads the same images in the same order as
  an uninterrupted run;
- SIGINT and SIGTERM finish the step, save and stop (exit 128 + the signal); a non-finite loss
  stops before the update and keeps the last good checkpoint (exit 1);
- under ``torchrun`` each process trains on its share of every global batch
  (DistributedDataParallel, NCCL on GPUs, gloo on the CPU); only rank 0 writes;
- ``--amp`` (autocast; fp16 with a gradient scaler), ``--channels-last`` and ``--compile``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fastperc.checkpoints import load_checkpoint
from fastperc.commands.common import AMP_DTYPES, VGG_WEIGHT_NAMES, add_device_option, resolve_device
from fastperc.commands.data import ImageFolder, ResumableSampler, collate, scan_images, worker_init
from fastperc.commands.errors import InputError, describe_error
from fastperc.commands.images import IMAGE_EXTENSIONS, check_writable_dir

CHECKPOINT, LOG, MODEL, PLOT = "checkpoint.pt", "log.jsonl", "model.pth", "loss.png"
LOG_FIELDS = ("step", "epoch", "loss", "images_per_s", "world_size")  # the other numbers are the terms

PATH = {"path": True}  # metadata of a setting that is a path: saved absolute


def say(message: str) -> None:
    """A message on stderr that does not break the progress bar."""
    tqdm.write(message, file=sys.stderr)


@dataclass
class RunConfig:
    """The settings every training run has; a task's settings (a subclass) add its own fields
    and checks, and name its command and checkpoint format. Saved in the checkpoint."""

    command: ClassVar[str] = ""             # "train", "sr-train": in messages
    checkpoint_format: ClassVar[str] = ""   # the checkpoint's "format"

    dataset: str | None = field(default=None, metadata=PATH)
    out: str | None = field(default=None, metadata=PATH)
    iterations: int = 40_000
    epochs: int | None = None         # if set, overrides iterations
    batch_size: int = 4
    image_size: int = 256
    lr: float = 1e-3
    vgg_weights: str = "imagenet"     # "imagenet", "random" or a path
    checkpoint_every: int = 1000
    log_every: int = 10
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    workers: int | None = None        # None: min(4, CPUs)
    device: str | None = None         # None: cuda when present, else cpu

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def resolve(cls, options: dict, resume: bool = False) -> tuple["RunConfig", dict | None]:
        """The run's settings: ``options`` (field -> value; None = not given), over those saved
        in RUN_DIR's checkpoint when resuming. Returns (settings, checkpoint or None)."""
        options = {k: v for k, v in options.items() if v is not None}
        unknown = set(options) - cls.fields()
        if unknown:
            raise TypeError(f"unknown {cls.command} options: {sorted(unknown)}")
        if not options.get("out"):
            raise InputError("--out RUN_DIR is required")
        ckpt = None
        if resume:
            ckpt = RunDir(options["out"]).load_checkpoint(cls)
            saved = {k: v for k, v in ckpt["args"].items() if k in cls.fields()}
            if "iterations" in options and "epochs" not in options:
                saved["epochs"] = None  # an explicit --iterations replaces the run's --epochs
            options = {**saved, **options}
        cfg = cls(**options)
        cfg.check()
        return cfg, ckpt

    def check(self) -> None:
        """Raises InputError for the first bad setting, naming its option."""
        if not self.dataset:
            raise InputError("--dataset DIR is required")
        for name in ("iterations", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}: expected a number >= 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise InputError(f"--epochs: expected a number >= 1, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr: expected a finite number > 0, got {self.lr}")
        if self.workers is not None and self.workers < 0:
            raise InputError(f"--workers: expected a number >= 0, got {self.workers}")
        if self.amp not in AMP_DTYPES:
            raise InputError(f"--amp: expected one of {list(AMP_DTYPES)}, got {self.amp!r}")

    def saved(self) -> dict:
        """The settings as plain data for the checkpoint, paths absolute (so that --resume works
        from any directory)."""
        settings = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("path") and settings[f.name] is not None:
                settings[f.name] = os.path.abspath(settings[f.name])
        if self.vgg_weights not in VGG_WEIGHT_NAMES:
            settings["vgg_weights"] = os.path.abspath(self.vgg_weights)
        return settings

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.epochs * steps_per_epoch if self.epochs else self.iterations


def add_run_options(p: argparse.ArgumentParser, config: type[RunConfig]) -> None:
    """The options every training command has (``config``'s fields, with its defaults in the
    help). They default to None so that --resume can tell the given ones from the run's."""
    d = config()
    p.add_argument("--out", metavar="RUN_DIR", required=True, help="the run directory")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--iterations", type=int, metavar="N",
                       help=f"total optimizer steps (default {d.iterations}, the paper's)")
    steps.add_argument("--epochs", type=int, metavar="N", help="train for N passes over the dataset instead")
    p.add_argument("--batch-size", type=int, help=f"images per step and process (default {d.batch_size})")
    p.add_argument("--image-size", type=int, help=f"training images are resized and centre-cropped to this "
                                                  f"(default {d.image_size})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr:g})")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help=f"save the checkpoint every N steps (default {d.checkpoint_every})")
    p.add_argument("--log-every", type=int, metavar="N", help=f"log every N steps (default {d.log_every})")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR (to --iterations)")
    p.add_argument("--amp", choices=list(AMP_DTYPES), help="mixed precision (default off)")
    p.add_argument("--channels-last", action="store_const", const=True, help="channels_last memory format")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the network")
    p.add_argument("--seed", type=int, help=f"seed of the initial weights and the data order (default {d.seed})")
    p.add_argument("--workers", type=int, help="data loading processes (default min(4, CPUs))")
    add_device_option(p)


Terms = dict[str, torch.Tensor]


class Task:
    """What one kind of training trains, on what and against what: the part of a run that is
    not the loop. A subclass gives

    - ``model_name``: the network as messages name it ("TransformerNet", "SuperResolutionNet x4");
    - ``description()``: what is trained, for the first message ("a TransformerNet (...)");
    - ``build(device)``: the network to train (anywhere; the loop moves it) and the loss on
      ``device``, a function (network output, target) -> {name: weighted term} whose sum the loop
      minimises and whose terms it logs by name. The loop seeds torch with ``cfg.seed`` first.

    and may change ``dataset(files)`` (default: every image resized and centre-cropped to
    ``cfg.image_size``) and ``prepare(images)``: a batch of dataset images (N, 3, S, S) in
    [0, 255], on the device, -> (network input, loss target) (default: both the images).
    """

    model_name: str = "network"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def description(self) -> str:
        return f"a {self.model_name}"

    def build(self, device: torch.device) -> tuple[torch.nn.Module, Callable[[torch.Tensor, object], Terms]]:
        raise NotImplementedError

    def dataset(self, files: list[str]) -> Dataset:
        return ImageFolder(files, self.cfg.image_size)

    def prepare(self, images: torch.Tensor) -> tuple[torch.Tensor, object]:
        return images, images


class RunDir:
    """The run directory and its files: checkpoint, log, curve, final model."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoint, self.log, self.model, self.plot = (self.path / n for n in (CHECKPOINT, LOG, MODEL, PLOT))

    def holds_run(self) -> str | None:
        """The first run file found in the directory, or None."""
        for path in (self.checkpoint, self.log, self.model):
            if path.exists():
                return path.name
        return None

    def load_checkpoint(self, config: type[RunConfig]) -> dict:
        """The checkpoint to resume, checked to be one of ``config``'s command."""
        if not self.checkpoint.is_file():
            raise InputError(f"{self.checkpoint}: no checkpoint to resume "
                             f"({config.command} without --resume to start a run)")
        try:
            ckpt = load_checkpoint(self.checkpoint, what="training checkpoint")
        except (FileNotFoundError, ValueError) as exc:
            raise InputError(str(exc)) from None
        if not (isinstance(ckpt, dict) and ckpt.get("format") == config.checkpoint_format
                and isinstance(ckpt.get("args"), dict) and all(k in ckpt for k in ("model", "optimizer", "step"))):
            raise InputError(f"{self.checkpoint}: not a fastperc {config.command} checkpoint")
        return ckpt

    def remove_stale_temporaries(self) -> None:
        """Temporary files left by a process killed while saving."""
        for path in (self.checkpoint, self.model, self.log, self.plot):
            for tmp in self.path.glob(f".{path.name}.tmp-*"):
                tmp.unlink(missing_ok=True)

    def truncate_log(self, step: int) -> None:
        """Keep the entries up to ``step`` (those after the checkpoint are trained again)."""
        if self.log.exists():
            entries = [e for e in read_log(self.log) if e["step"] <= step]
            with atomic_path(self.log) as tmp:
                tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))

    def draw_plot(self) -> None:
        plot_loss(self.log, self.plot)


@contextlib.contextmanager
def atomic_path(path: Path):
    """``with atomic_path(path) as tmp``: write ``tmp``, a temporary file in the same folder; when
    the block succeeds it replaces ``path`` (os.replace), so that a reader, or a SIGKILL at any
    moment, sees the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_save(obj, path: Path) -> None:
    """torch.save ``obj`` to ``path`` atomically, flushed to the disk."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


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


def plot_loss(log_path: Path, png_path: Path) -> None:
    """The loss curve from log.jsonl as a PNG: the total and every term logged (a term that is
    zero throughout is left out) against the step."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    entries = read_log(log_path)
    terms = dict.fromkeys(k for e in entries for k in e if k not in LOG_FIELDS)
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    steps = [e["step"] for e in entries]
    positive = True
    for key in ("loss", *terms):
        values = [e.get(key) for e in entries]
        if values and all(isinstance(v, (int, float)) for v in values) and any(v != 0 for v in values):
            label = {"loss": "total", "tv": "TV"}.get(key, key)
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
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")


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


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def run(task: Task, ckpt: dict | None = None, progress: bool = True) -> int:
    """Train ``task`` in its run directory, resuming from ``ckpt`` (the run's checkpoint) if given.

    Returns the exit status: 0 when done, 1 after a non-finite loss, 128 + the signal number
    after SIGINT/SIGTERM. Bad input raises InputError before anything is written."""
    cfg = task.cfg
    rank, world, local_rank = distributed_env()
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run_dir = RunDir(cfg.out)

    # Checks first; nothing is written until they pass.
    if ckpt is None and (found := run_dir.holds_run()):
        raise InputError(f"{run_dir.path}: already holds a run ({found}); continue it with --resume, "
                         f"or choose another --out")
    files, bad = scan_images(cfg.dataset)
    if rank == 0:
        for message in bad:
            say(f"warning: skipping {message}")
    if not files:
        raise InputError(f"{cfg.dataset}: no readable images in the dataset (looked for {' '.join(IMAGE_EXTENSIONS)})")
    torch.manual_seed(cfg.seed)  # a random VGG and the initial network follow the seed
    trainer = Trainer(task, device, rank, world)
    if ckpt is not None:
        trainer.restore(ckpt, run_dir)
    if rank == 0:
        check_writable_dir(run_dir.path, "--out")

    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        return trainer.train(run_dir, files, len(bad), resumed=ckpt, progress=progress)
    finally:
        if world > 1:
            dist.destroy_process_group()


class Trainer:
    """The training state of one process (network, optimizer, AMP scaler, step) and the loop."""

    def __init__(self, task: Task, device: torch.device, rank: int, world: int):
        self.task, self.cfg, self.device, self.rank, self.world = task, task.cfg, device, rank, world
        self.memory_format = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        self.net, self.loss_fn = task.build(device)
        self.net.to(device, memory_format=self.memory_format)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.cfg.amp == "fp16")
        self.amp_dtype = AMP_DTYPES[self.cfg.amp]
        self.step = 0
        self.model = self.net  # what the loop calls: under DDP and --compile, wrapped

    def restore(self, ckpt: dict, run_dir: RunDir) -> None:
        """The state of ``ckpt``: weights, optimizer, scaler, step, RNG."""
        try:
            self.net.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise InputError(f"{run_dir.checkpoint}: does not fit {self.task.model_name} "
                             f"({describe_error(exc)})") from None
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        rng = ckpt.get("rng") or {}
        if isinstance(rng, torch.Tensor):  # sr-train checkpoints saved before the shared loop
            rng = {"torch": rng}
        if isinstance(rng.get("torch"), torch.Tensor):
            torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])

    def checkpoint(self) -> dict:
        return {
            "format": self.cfg.checkpoint_format,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "world_size": self.world,
            "args": self.cfg.saved(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
        }

    def loss_terms(self, images: torch.Tensor, stopping: bool) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """The forward pass on a batch of dataset images: (loss, term names, statistics), the
        statistics being [loss, *terms, stop flag] averaged over the processes (so that every
        process sees the same values and stops at the same step)."""
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        inputs, target = self.task.prepare(x)
        inputs = inputs.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            terms = self.loss_fn(self.model(inputs), target)
            loss = sum(terms.values())
        stats = torch.stack([loss.detach().float(), *(t.detach().float() for t in terms.values()),
                             torch.tensor(float(stopping), device=loss.device)])
        if self.world > 1:
            dist.all_reduce(stats)
            stats[:-1] /= self.world
        return loss, list(terms), stats

    def update(self, loss: torch.Tensor) -> None:
        """The backward pass and the optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1

    def train(self, run_dir: RunDir, files: list[str], scan_skipped: int, resumed: dict | None,
              progress: bool) -> int:
        cfg, main, world = self.cfg, self.rank == 0, self.world
        if world > 1:
            self.model = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.model = torch.compile(self.model)
        workers = min(4, os.cpu_count() or 1) if cfg.workers is None else cfg.workers
        sampler = ResumableSampler(len(files), cfg.batch_size, cfg.seed, self.rank, world)
        loader = DataLoader(self.task.dataset(files), batch_size=cfg.batch_size, sampler=sampler,
                            num_workers=workers, collate_fn=collate, pin_memory=self.device.type == "cuda",
                            worker_init_fn=worker_init if workers else None, persistent_workers=workers > 0)
        total = cfg.total_steps(sampler.steps_per_epoch)

        log_file = self._open_run(run_dir, len(files), sampler.steps_per_epoch, total, resumed) if main else None
        saved_step, skipped = self.step, set()
        status, values = "done", {}
        epoch, offset = divmod(self.step, sampler.steps_per_epoch)
        t_log, images_since_log = time.perf_counter(), 0
        bar = tqdm(total=total, initial=self.step, unit="step", disable=not (main and progress),
                   dynamic_ncols=True, file=sys.stderr)
        self.net.train()
        with StopSignals() as stop:
            while self.step < total and status == "done":
                sampler.set_position(epoch, offset)
                for images, failed in loader:
                    for message in failed:
                        if message not in skipped:
                            skipped.add(message)
                            say(f"warning: skipping {message}")
                    loss, names, stats = self.loss_terms(images, stop.signum is not None)
                    *numbers, stopping = stats.tolist()
                    values = dict(zip(["loss", *names], numbers))
                    if not all(math.isfinite(v) for v in numbers):
                        status = "nonfinite"
                        break
                    self.update(loss)
                    images_since_log += images.shape[0] * world
                    if stopping > 0:
                        status = "signal"
                    rate = images_since_log / max(time.perf_counter() - t_log, 1e-9)
                    bar.update(1)
                    bar.set_postfix_str(" ".join(f"{k} {v:.4g}" for k, v in values.items()) + f" {rate:.1f} img/s",
                                        refresh=False)
                    last = self.step == total or status == "signal"
                    if main and (self.step % cfg.log_every == 0 or last):
                        log_file.write(json.dumps({"step": self.step, "epoch": epoch, **values,
                                                   "images_per_s": rate, "world_size": world}) + "\n")
                        log_file.flush()
                        t_log, images_since_log = time.perf_counter(), 0
                    if main and (self.step % cfg.checkpoint_every == 0 or last):
                        atomic_save(self.checkpoint(), run_dir.checkpoint)
                        saved_step = self.step
                    if self.step >= total or status != "done":
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
        return self._finish(run_dir, status, stop.signum, values, saved_step, scan_skipped + len(skipped))

    def _open_run(self, run_dir: RunDir, images: int, steps_per_epoch: int, total: int,
                  resumed: dict | None):
        """Rank 0 at the start: the step-0 checkpoint of a new run (a run to resume from the
        start) or the log cut back to the checkpoint's step, the first message; returns the
        log, open for appending."""
        cfg, world = self.cfg, self.world
        run_dir.remove_stale_temporaries()
        if resumed is None:
            atomic_save(self.checkpoint(), run_dir.checkpoint)
        else:
            run_dir.truncate_log(self.step)
        say(f"{'' if resumed is None else 'resuming at step %d: ' % self.step}training {self.task.description()} "
            f"on {images} images ({steps_per_epoch} steps per epoch at batch {cfg.batch_size} x {world} "
            f"processes) to step {total}, on {self.device}")
        if resumed is not None:
            saved_batch = (resumed["args"].get("batch_size"), resumed.get("world_size", 1))
            if saved_batch != (cfg.batch_size, world):
                say(f"warning: the run was saved at batch {saved_batch[0]} x {saved_batch[1]} processes and "
                    f"resumes at {cfg.batch_size} x {world}: from step {self.step} on, it reads the data in "
                    "another order than an uninterrupted run would")
        return open(run_dir.log, "a")

    def _finish(self, run_dir: RunDir, status: str, signum: int | None, values: dict, saved_step: int,
                skipped: int) -> int:
        """Rank 0 at the end: the curve, the final model when done, the last message; returns the
        exit status."""
        command = f"fastperc {self.cfg.command}"
        run_dir.draw_plot()
        if status == "nonfinite":
            numbers = ", ".join(f"{k} {v}" for k, v in values.items())
            print(f"{command}: error: non-finite loss at step {self.step + 1} ({numbers}); stopped; "
                  f"{run_dir.checkpoint} keeps step {saved_step}, the last good checkpoint", file=sys.stderr)
            return _exit_status(status, signum)
        if skipped:
            say(f"skipped {skipped} unreadable image file{'s' * (skipped != 1)} (named in the warnings above)")
        if status == "signal":
            name = signal.Signals(signum or signal.SIGTERM).name
            print(f"{command}: stopped by {name} at step {self.step}; checkpoint saved to {run_dir.checkpoint}; "
                  f"continue with: {command} --out {run_dir.path} --resume", file=sys.stderr)
            return _exit_status(status, signum)
        atomic_save({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}, run_dir.model)
        print(f"trained to step {self.step}: {run_dir.model} (log {run_dir.log}, curve {run_dir.plot})")
        return 0


def _exit_status(status: str, signum: int | None) -> int:
    if status == "signal":
        return 128 + int(signum or signal.SIGTERM)
    return 1 if status == "nonfinite" else 0
