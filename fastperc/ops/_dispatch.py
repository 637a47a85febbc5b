"""Shared plumbing of the op layer: per-backend implementation tables.

Every fused op is a ``torch.library`` custom op whose last argument is the backend name
(resolved by :func:`fastperc.backends.resolve_backend` in the public wrapper, before the op
is called). The op's body looks the implementation up in a :class:`BackendTable`.
"""
from __future__ import annotations

import importlib
from typing import Callable


def triton_kernel(module: str, name: str) -> Callable:
    """A launcher from ``fastperc.kernels.<module>``, imported on first call.

    Importing triton is deferred so that fastperc imports on machines without it.
    """

    def call(*args, **kwargs):
        launcher = getattr(importlib.import_module(f"fastperc.kernels.{module}"), name)
        return launcher(*args, **kwargs)

    call.__name__ = f"{module}.{name}"
    return call


class BackendTable:
    """Maps a backend name to the function implementing one op (or its backward)."""

    def __init__(self, op: str, **impls: Callable):
        self.op = op
        self.impls = impls

    def __call__(self, backend: str, *args):
        try:
            impl = self.impls[backend]
        except KeyError:
            raise ValueError(
                f"{self.op}: backend {backend!r} has no implementation; "
                f"implemented: {sorted(self.impls)}"
            ) from None
        return impl(*args)
