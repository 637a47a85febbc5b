"""Backend selection: available_backends, set_backend, use_backend, FASTPERC_BACKEND."""
import os
import subprocess
import sys

import pytest
import torch

import fastperc
from fastperc.backends import resolve_backend


def test_available_backends_on_this_machine():
    names = fastperc.available_backends()
    assert names[:2] == ["reference", "torch"]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert ("triton" in names) == (torch.cuda.is_available() or interpreted)


def test_default_backend_is_torch_on_cpu():
    assert resolve_backend(None, torch.device("cpu")) == "torch"


def test_set_backend_and_use_backend_nest_and_restore():
    fastperc.set_backend("reference")
    assert fastperc.get_backend() == "reference"
    with fastperc.use_backend("torch"):
        assert resolve_backend(None, torch.device("cpu")) == "torch"
        with fastperc.use_backend("reference"):
            assert resolve_backend(None, torch.device("cpu")) == "reference"
        assert fastperc.get_backend() == "torch"
    assert fastperc.get_backend() == "reference"
    fastperc.set_backend(None)
    assert fastperc.get_backend() is None


def test_selected_backend_is_the_one_that_runs(monkeypatch):
    calls = []
    import fastperc.ops._feature_loss as mod

    monkeypatch.setitem(mod._forward.impls, "reference", lambda a, b: calls.append("reference") or a.sum())
    a = torch.randn(1, 2, 3, 3)
    with fastperc.use_backend("reference"):
        fastperc.feature_loss(a, a)
    assert calls == ["reference"]
    fastperc.feature_loss(a, a, backend="torch")
    assert calls == ["reference"]


@pytest.mark.parametrize("name", ["tpu", "", "TORCH"])
def test_unknown_backend_names_the_available_ones(name):
    with pytest.raises(ValueError, match=r"expected one of the available backends \['reference', 'torch'"):
        fastperc.set_backend(name)
    with pytest.raises(ValueError, match="backend: expected one of the available backends"):
        fastperc.feature_loss(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2), backend=name)


def test_cuda_backend_is_refused_without_the_extension_or_gpu():
    if "cuda" in fastperc.available_backends():
        pytest.skip("the cuda backend is available on this machine")
    with pytest.raises(ValueError, match="available backends"):
        fastperc.set_backend("cuda")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPERC_BACKEND")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True)


def test_environment_variable_selects_the_backend():
    proc = _run(
        "import torch, fastperc.backends as b; print(b.resolve_backend(None, torch.device('cpu')))",
        FASTPERC_BACKEND="reference",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reference"


def test_unknown_environment_backend_raises_on_use():
    proc = _run(
        "import torch, fastperc\nfastperc.feature_loss(torch.ones(1,1,2,2), torch.zeros(1,1,2,2))",
        FASTPERC_BACKEND="nope",
    )
    assert proc.returncode != 0
    assert "FASTPERC_BACKEND: expected one of the available backends" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only rule; a GPU makes triton available")
def test_triton_is_unavailable_on_cpu_without_the_interpreter():
    proc = _run("import fastperc; print(fastperc.available_backends())")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['reference', 'torch']"
