"""Safe loading of checkpoints and weight files.

Everything is read with ``torch.load(..., weights_only=True)``: a file that carries pickled
code fails to load and runs nothing.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Mapping

import torch


def load_checkpoint(path: str | os.PathLike, *, what: str = "checkpoint") -> Any:
    """The object stored in ``path`` (tensors, dicts, lists, numbers and strings only).

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for one that
    is not a checkpoint or holds anything but plain data.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError,
            ModuleNotFoundError, TypeError, IndexError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a loadable {what} ({reason[:200]})") from None


def load_state_dict_file(path: str | os.PathLike, *, what: str = "checkpoint") -> Mapping[str, torch.Tensor]:
    """A state dict (name -> tensor) from ``path``; a dict with a "model" or "state_dict"
    entry (a training checkpoint) gives that entry."""
    obj = load_checkpoint(path, what=what)
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{os.fspath(path)}: not a {what} (expected a state dict of tensors)")
    return obj
