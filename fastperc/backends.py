"""Backend selection: which implementation of the fused ops runs.

Backends (DESIGN.md):

* ``reference`` -- the spec in plain torch (any device, any float dtype, float64 included);
* ``torch``     -- the fastest plain-torch composition; the default on CPU;
* ``triton``    -- the Triton kernels; the default on CUDA. On a CPU-only machine it is
  available exactly when ``TRITON_INTERPRET=1`` was set before triton was imported;
* ``cuda``      -- the hand-written CUDA C++ kernels (``fastperc._C``). Available when a CUDA GPU
  is visible and either the extension was built at install or it can be built just in time
  on first use (a CUDA build of torch, nvcc, ninja and the sources; see
  :mod:`fastperc._cuda_ext`). The probe only looks for files and programs: nothing is imported
  or compiled until an op first runs on this backend.

The choice, in order of precedence: the ``backend=`` argument of an op, then
:func:`use_backend` / :func:`set_backend`, then the ``FASTPERC_BACKEND`` environment
variable, then the device's default. Asking for a backend that cannot run raises
``ValueError`` naming those that can; there is never a silent fallback.

Availability and ``FASTPERC_BACKEND`` are read once, when this module is imported, so that
resolving a backend inside ``torch.compile`` reads only module constants (no graph break).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

from fastperc import _cuda_ext
from fastperc.rules import INTERPRETED

BACKENDS = ("reference", "torch", "triton", "cuda")


def _probe() -> tuple[str, ...]:
    found = ["reference", "torch"]
    has_cuda = torch.cuda.is_available()
    if importlib.util.find_spec("triton") is not None and (has_cuda or INTERPRETED):
        found.append("triton")
    if _CUDA_UNAVAILABLE is None:
        found.append("cuda")
    return tuple(found)


# Why the cuda backend cannot run here (None when it can), named in the refusal's message.
_CUDA_UNAVAILABLE: str | None = _cuda_ext.unavailable_reason()


_AVAILABLE: tuple[str, ...] = _probe()
_ENV_BACKEND: str | None = os.environ.get("FASTPERC_BACKEND") or None
_selected: str | None = None


def available_backends() -> list[str]:
    """The backends this process can run, e.g. ``['reference', 'torch', 'triton']``."""
    return list(_AVAILABLE)


def _check_name(name: object, what: str) -> str:
    if name not in _AVAILABLE:
        raise ValueError(
            f"{what}: expected one of the available backends {list(_AVAILABLE)}, got {name!r}"
            + (f" (known backends: {list(BACKENDS)})" if name not in BACKENDS else "")
            + (f" (cuda: {_CUDA_UNAVAILABLE})" if name == "cuda" and _CUDA_UNAVAILABLE else "")
        )
    return name  # type: ignore[return-value]


def set_backend(name: str | None) -> None:
    """Select the backend for all following op calls; ``None`` restores the default."""
    global _selected
    _selected = None if name is None else _check_name(name, "set_backend(name)")


def get_backend() -> str | None:
    """The explicitly selected backend (set_backend / use_backend / FASTPERC_BACKEND), or None."""
    if _selected is not None:
        return _selected
    return _ENV_BACKEND


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager: run the ops inside the block on backend ``name``."""
    global _selected
    previous = _selected
    set_backend(name)
    try:
        yield
    finally:
        _selected = previous


def default_backend(device: torch.device) -> str:
    """The backend used for tensors on ``device`` when none is selected."""
    if device.type == "cuda" and "triton" in _AVAILABLE:
        return "triton"
    return "torch"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend an op runs for a tensor on ``device``; raises ``ValueError`` if it cannot."""
    if backend is not None:
        name = _check_name(backend, "backend")
    elif _selected is not None:
        name = _selected
    else:
        name = (
            _check_name(_ENV_BACKEND, "FASTPERC_BACKEND")
            if _ENV_BACKEND
            else default_backend(device)
        )
    if name == "triton" and device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"backend 'triton' runs on CUDA tensors, or on CPU tensors only when "
            f"TRITON_INTERPRET=1 is set before triton is imported; got a tensor on {device}"
        )
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' runs on CUDA tensors; got a tensor on {device}")
    return name
