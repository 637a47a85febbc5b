"""The CUDA C++ backend (csrc/, fastperc._C).

On any machine: the backend is refused with the usual ValueError where it cannot run, the
availability probe imports and compiles nothing, the loader (installed extension, else a
just-in-time build with torch.utils.cpp_extension.load, mocked here) announces, builds once and
caches, and `make cuda-check` covers every source of csrc/ and fails on one that does not
compile.

The kernels themselves are checked on a GPU by tests/test_cuda_kernels.py.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastperc
from fastperc import _cuda_ext

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


# -- on any machine: refusal and probing -----------------------------------------------------


@pytest.mark.skipif("cuda" in fastperc.available_backends(), reason="the cuda backend is available here")
def test_cuda_backend_is_refused_naming_the_available_backends():
    names = fastperc.available_backends()
    with pytest.raises(ValueError, match=r"expected one of the available backends \[.*\], got 'cuda' \(cuda: .+\)"):
        fastperc.set_backend("cuda")
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=rf"available backends {names!r}".replace("[", r"\[").replace("]", r"\]")):
        fastperc.tv_loss(x, backend="cuda")


def test_unavailable_reason_covers_each_route(monkeypatch):
    monkeypatch.delenv("FASTPERC_CUDA_JIT", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in _cuda_ext.unavailable_reason()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_cuda_ext, "built", lambda: True)
    assert _cuda_ext.unavailable_reason() is None  # installed extension: nothing else needed

    monkeypatch.setattr(_cuda_ext, "built", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU build" in _cuda_ext.unavailable_reason()

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_cuda_ext, "_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(_cuda_ext.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert _cuda_ext.unavailable_reason() is None  # the just-in-time route

    monkeypatch.setattr(_cuda_ext.shutil, "which", lambda name: None)
    assert "ninja" in _cuda_ext.unavailable_reason()
    monkeypatch.setattr(_cuda_ext, "_nvcc", lambda: None)
    assert "nvcc" in _cuda_ext.unavailable_reason()
    monkeypatch.setenv("FASTPERC_CUDA_JIT", "0")
    assert "FASTPERC_CUDA_JIT=0" in _cuda_ext.unavailable_reason()


def test_importing_fastperc_neither_loads_nor_builds_the_extension():
    code = ("import sys, fastperc; fastperc.available_backends(); "
            "print('fastperc._C' in sys.modules, 'torch.utils.cpp_extension' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


# -- on any machine: the loader, with torch.utils.cpp_extension.load mocked ------------------


def _fake_cpp_load(calls):
    def load(**kwargs):
        calls.append(kwargs)
        (Path(kwargs["build_directory"]) / f"{kwargs['name']}.so").write_bytes(b"")
        return SimpleNamespace(built_by="fake")

    return load


def test_jit_build_announces_compiles_every_source_and_reuses_its_cache(monkeypatch, tmp_path, capsys):
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setattr(cpp_extension, "load", _fake_cpp_load(calls))
    build_dir = tmp_path / "cache" / "fastperc_C"
    module = _cuda_ext.jit_build(build_dir)
    assert module.built_by == "fake"
    err = capsys.readouterr().err
    assert "fastperc: compiling the CUDA kernels" in err and str(build_dir) in err and "ready" in err
    (kwargs,) = calls
    assert kwargs["name"] == _cuda_ext.JIT_NAME
    assert kwargs["build_directory"] == str(build_dir)
    assert sorted(Path(s) for s in kwargs["sources"]) == sorted([*CSRC.glob("*.cu"), *CSRC.glob("*.cpp")])
    assert kwargs["extra_cuda_cflags"] == _cuda_ext.NVCC_FLAGS
    # A build newer than every source: loading it again is quick and says nothing.
    _cuda_ext.jit_build(build_dir)
    assert capsys.readouterr().err == ""
    assert len(calls) == 2  # torch's load (ninja) decides what, if anything, to recompile


def test_load_builds_once_per_process(monkeypatch):
    monkeypatch.setattr(_cuda_ext, "_module", None)
    monkeypatch.setattr(_cuda_ext, "built", lambda: False)
    monkeypatch.setattr(_cuda_ext, "jit_unavailable_reason", lambda: None)
    builds = []
    monkeypatch.setattr(_cuda_ext, "jit_build", lambda: builds.append(1) or SimpleNamespace())
    first = _cuda_ext.load()
    assert _cuda_ext.load() is first
    assert builds == [1]


def test_load_prefers_the_installed_extension(monkeypatch):
    fake = SimpleNamespace(installed=True)
    monkeypatch.setattr(_cuda_ext, "_module", None)
    monkeypatch.setattr(_cuda_ext, "built", lambda: True)
    monkeypatch.setitem(sys.modules, "fastperc._C", fake)
    monkeypatch.setattr(_cuda_ext, "jit_build", lambda: pytest.fail("built just in time despite fastperc._C"))
    assert _cuda_ext.load() is fake


def test_load_explains_why_it_cannot_build(monkeypatch):
    monkeypatch.setattr(_cuda_ext, "_module", None)
    monkeypatch.setattr(_cuda_ext, "built", lambda: False)
    monkeypatch.setattr(_cuda_ext, "jit_unavailable_reason", lambda: "nvcc was not found (set CUDA_HOME)")
    with pytest.raises(RuntimeError, match=r"fastperc\._C is not built .* nvcc was not found"):
        _cuda_ext.load()


def test_cache_dir_separates_torch_cuda_and_architectures(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTPERC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    path = _cuda_ext.cache_dir()
    assert path.parent.parent == tmp_path and path.name == _cuda_ext.JIT_NAME
    tag = path.parent.name
    assert tag.startswith("torch") and f"-cu{torch.version.cuda}-" in tag and tag.endswith("-sm80_90a")
    assert "+" not in tag


# -- on any machine: make cuda-check ------------------------------------------------------------

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), *args],
                          cwd=cwd, capture_output=True, text=True)


@needs_make
def test_cuda_check_compiles_every_source_for_sm80_and_sm90(tmp_path):
    proc = _make("-n", "cuda-check-objects", f"CUDA_CHECK_DIR={tmp_path}", "CUDA_CHECK_FLAGS=<flags>",
                 "NVCC=nvcc", f"STAMP={_fresh_stamp(tmp_path)}")
    assert proc.returncode == 0, proc.stderr
    compiled = [line for line in proc.stdout.splitlines() if line.startswith("nvcc <flags> -c ")]
    expected = sorted([*CSRC.glob("*.cu"), *CSRC.glob("*.cpp")])
    assert expected and [line.split()[3] for line in compiled] == [f"csrc/{p.name}" for p in expected]
    assert sorted(_cuda_ext.sources(CSRC)) == expected  # the same list as setup.py and the JIT build
    flags = _cuda_ext.check_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags


def _fresh_stamp(tmp_path: Path) -> Path:
    """An install stamp newer than setup.py, so make does not reinstall the venv."""
    stamp = tmp_path / "stamp"
    stamp.touch()
    return stamp


@needs_make
def test_cuda_check_skips_in_one_line_without_nvcc(tmp_path):
    proc = _make("-s", "cuda-check", "NVCC=/nonexistent/nvcc", f"STAMP={_fresh_stamp(tmp_path)}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "cuda-check: skipped, /nonexistent/nvcc not found (the CUDA sources in csrc/ were not compiled)"
    ]


@needs_make
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_check_fails_on_a_source_that_does_not_compile(tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "broken.cu").write_text('#error "this source does not compile"\n')
    (tmp_path / "fastperc").mkdir()
    (tmp_path / "fastperc" / "_cuda_ext.py").symlink_to(ROOT / "fastperc" / "_cuda_ext.py")
    for name in ("pyproject.toml", "setup.py"):  # the install stamp's prerequisites
        (tmp_path / name).touch()
    proc = _make("cuda-check", f"VENV={ROOT / '.venv'}", f"PY={sys.executable}",
                 f"STAMP={_fresh_stamp(tmp_path)}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "this source does not compile" in proc.stdout + proc.stderr


# A host program around csrc/common.cuh's FastDiv: the header's own constructor, div and mod,
# with the one CUDA intrinsic they use (__umulhi, the high 32 bits of a 32 x 32-bit product)
# given its documented meaning. Reads "d n" lines, writes "n / d, n % d" lines.
FAST_DIV_PROGRAM = r"""
#include <cstdint>
#include <cstdio>
static inline uint32_t __umulhi(uint32_t a, uint32_t b) { return uint32_t((uint64_t(a) * b) >> 32); }
// Declared for the header's block-level templates, which this program never instantiates.
struct ThreadIndex { unsigned x, y, z; };
extern const ThreadIndex threadIdx;
void __syncthreads();
#include "common.cuh"
int main() {
  unsigned long long d, n;
  while (std::scanf("%llu %llu", &d, &n) == 2) {
    const fastperc::FastDiv f(static_cast<uint32_t>(d));
    std::printf("%u %u\n", f.div(static_cast<uint32_t>(n)), f.mod(static_cast<uint32_t>(n)));
  }
}
"""


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime.h): $CUDA_HOME, $CUDA_PATH, next to
    nvcc, or /usr/local/cuda."""
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             Path(nvcc).resolve().parents[1] if nvcc else None, "/usr/local/cuda"]
    includes = [Path(h) / "include" for h in homes if h]
    return next((i for i in includes if (i / "cuda_runtime.h").exists()), None)


def test_fast_division_in_the_header_is_exact(tmp_path):
    """csrc/common.cuh's FastDiv (multiply-high and shift, numerators < 2^31), compiled from
    the header for the host and run on divisors up to 2^31."""
    cxx = shutil.which("g++") or shutil.which("c++")
    include = _cuda_include()
    if cxx is None or include is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit's headers (nvcc on PATH)")
    from torch.utils.cpp_extension import include_paths

    (tmp_path / "fast_div.cpp").write_text(FAST_DIV_PROGRAM)
    flags = ["-std=c++17", f"-I{CSRC}", f"-I{include}", *(f"-I{p}" for p in include_paths())]
    build = subprocess.run([cxx, *flags, str(tmp_path / "fast_div.cpp"), "-o", str(tmp_path / "fast_div")],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    rng = random.Random(0)
    divisors = list(range(1, 300)) + [2**k for k in range(32)] + [rng.randrange(1, 2**31) for _ in range(300)]
    cases = [(d, n) for d in divisors
             for n in [0, 1, d - 1, d, d + 1, 2**31 - 1] + [rng.randrange(0, 2**31) for _ in range(20)] if n < 2**31]
    run = subprocess.run([str(tmp_path / "fast_div")], input="".join(f"{d} {n}\n" for d, n in cases),
                         capture_output=True, text=True, check=True)
    got = [tuple(map(int, line.split())) for line in run.stdout.splitlines()]
    assert len(got) == len(cases)
    wrong = [(d, n, q, r) for (d, n), (q, r) in zip(cases, got) if (q, r) != divmod(n, d)]
    assert not wrong, f"FastDiv(d).div/mod(n) wrong for (d, n, div, mod) {wrong[:5]}"


# -- on any machine: the op layer dispatches to these launchers ------------------------------


def _backend_tables() -> list:
    """Every per-backend implementation table of the op layer, found by type."""
    import importlib
    import pkgutil

    import fastperc.ops
    from fastperc.ops._dispatch import BackendTable

    names = [m.name for m in pkgutil.iter_modules(fastperc.ops.__path__)]
    modules = [importlib.import_module(f"fastperc.ops.{name}") for name in names]
    return [t for m in modules for t in vars(m).values() if isinstance(t, BackendTable)]


def test_op_tables_dispatch_cuda_to_launchers_shaped_like_the_triton_ones():
    """Each cuda entry of an op's table is the fastperc.cuda_backend launcher of the same name
    as the table's triton entry, with that launcher's parameters; every cuda launcher is used."""
    import importlib
    import importlib.util
    import inspect

    from fastperc import cuda_backend

    launchers = {name: fn for name, fn in vars(cuda_backend).items()
                 if inspect.isfunction(fn) and fn.__module__ == cuda_backend.__name__}
    used = set()
    for table in _backend_tables():
        fn = table.impls.get("cuda")
        if fn is None:
            continue
        assert launchers.get(fn.__name__) is fn, (table.op, fn)
        module, _, name = table.impls["triton"].__name__.rpartition(".")
        assert name == fn.__name__, (table.op, table.impls["triton"].__name__)
        used.add(name)
        if importlib.util.find_spec("triton") is not None:
            twin = getattr(importlib.import_module(f"fastperc.kernels.{module}"), name)
            assert list(inspect.signature(fn).parameters) == list(inspect.signature(twin).parameters)
    assert used == set(launchers), sorted(set(launchers) - used)
    assert len(used) == 6  # tv_loss and the two norms, forward and backward
