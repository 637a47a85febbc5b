"""Test set-up: on a machine without CUDA the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton is imported, so this happens before any
fastperc import.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastperc  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Reproducible random inputs: a failure can be rerun."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_backend_selection():
    """No test leaks a set_backend() into the next one."""
    yield
    fastperc.set_backend(None)
