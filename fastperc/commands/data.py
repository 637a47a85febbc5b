"""The training images: every image under a folder, and a sampler that resumes exactly.

``scan_images(root)`` lists the image files under ``root`` (recursively, sorted) and checks
each one's header; ``ImageFolder`` decodes, converts to RGB, resizes and centre-crops them;
``ResumableSampler`` gives each process its share of a seeded permutation per epoch, starting
at any step, so a resumed run reads the same images in the same order as an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import signal

import torch
from torch.utils.data import Dataset, Sampler

from fastperc.commands.errors import InputError
from fastperc.commands.images import check_image_header, is_image_file, load_image, resize_crop, to_tensor


def scan_images(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(readable image files under ``root``, one message per unreadable one).

    Image files are recognised by extension (``IMAGE_EXTENSIONS`` of
    :mod:`fastperc.commands.images`); other files are ignored. Each image's header is checked
    (cheaply, without decoding the pixels)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        what = "is not a directory" if os.path.exists(root) else "no such directory"
        raise InputError(f"{root}: dataset {what}")
    files, bad = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not is_image_file(path):
                continue
            try:
                check_image_header(path)
            except InputError as exc:
                bad.append(str(exc))
                continue
            files.append(path)
    return files, bad


class ImageFolder(Dataset):
    """Images of ``files`` as float32 (3, size, size) tensors in [0, 255].

    An item is ``(image, failed)``: a file that cannot be decoded is replaced by the next
    file in the list and named in ``failed`` (so batches keep their size and every process
    takes the same number of steps)."""

    def __init__(self, files: list[str], image_size: int):
        if not files:
            raise ValueError("ImageFolder: no files")
        self.files = list(files)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[str]]:
        failed: list[str] = []
        for attempt in range(len(self.files)):
            path = self.files[(index + attempt) % len(self.files)]
            try:
                img = load_image(path)
            except InputError as exc:
                failed.append(str(exc))
                continue
            return to_tensor(resize_crop(img, self.image_size)), failed
        raise RuntimeError(f"none of the {len(self.files)} dataset images could be decoded")


def collate(items: list[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[str]]:
    """Stack the images; gather the decode failures."""
    return torch.stack([image for image, _ in items]), [msg for _, failed in items for msg in failed]


def worker_init(_worker_id: int) -> None:
    """Data workers ignore Ctrl-C: the main process finishes the step, saves and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ResumableSampler(Sampler[int]):
    """The dataset indices one process reads in one epoch, from a given step on.

    Each epoch is a permutation of the dataset seeded by (seed, epoch), cut into
    ``steps_per_epoch`` global batches of ``batch_size * world_size`` images (a dataset smaller
    than one global batch is repeated to fill it; leftovers are dropped). Process ``rank``
    takes the rank-th ``batch_size`` slice of each global batch. ``set_position(epoch, step)``
    chooses the epoch and the first step to read: the data order depends only on the seed, the
    dataset and the step, so a resumed run reads exactly what an uninterrupted one would.
    """

    def __init__(self, num_images: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_images, self.batch_size = num_images, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.steps_per_epoch = max(1, num_images // (batch_size * world_size))
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """(steps_per_epoch, world_size, batch_size) dataset indices of ``epoch``."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        need = self.steps_per_epoch * self.world_size * self.batch_size
        order = torch.randperm(self.num_images, generator=g)
        if order.numel() < need:
            order = order.repeat(math.ceil(need / order.numel()))
        return order[:need].view(self.steps_per_epoch, self.world_size, self.batch_size)

    def __iter__(self):
        mine = self.epoch_order(self.epoch)[self.start_step:, self.rank]
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size

