"""Find the CUDA C++ extension ``fastperc._C``, or build it just in time.

Two routes give the ``cuda`` backend its kernels (the sources are ``csrc/`` in a checkout,
``fastperc/csrc/`` in an installed wheel):

1. **Built at install.** ``setup.py`` builds ``fastperc._C`` with
   ``torch.utils.cpp_extension`` (ninja) when a CUDA build of torch and nvcc are present, for
   the GPU found or ``TORCH_CUDA_ARCH_LIST`` (Hopper: ``9.0``).
2. **Just in time.** Without a built extension, the first use of the ``cuda`` backend compiles
   the sources with ``torch.utils.cpp_extension.load`` (about a minute; a message on stderr
   says so while it runs) into a cache directory, reused by later processes:
   ``$FASTPERC_CACHE_DIR`` or ``~/.cache/fastperc`` (``$XDG_CACHE_HOME/fastperc``), one
   subdirectory per torch version, CUDA version and GPU architecture. ``FASTPERC_CUDA_JIT=0``
   turns this route off.

:func:`unavailable_reason` (read once by :mod:`fastperc.backends` at import) says why neither
route can work on this machine, or None, without importing or compiling anything; :func:`load`
returns the module, building it on first call.

This module imports nothing from fastperc and torch only inside functions, so that
``setup.py`` and the Makefile's ``cuda-check`` can load it by path (``python
fastperc/_cuda_ext.py --check-flags``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

EXTENSION = "fastperc._C"  # the module setup.py builds
JIT_NAME = "fastperc_C"  # the module name of the just-in-time build
SOURCE_SUFFIXES = (".cu", ".cpp")
HEADER_SUFFIXES = (".h", ".cuh")

# Compiler flags of both routes (torch.utils.cpp_extension adds its own: the include paths,
# -std, -D__CUDA_NO_HALF_OPERATORS__ and friends, --expt-relaxed-constexpr, the -gencode list).
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
# The architectures of the compile-only check (make cuda-check): Ampere and Hopper.
CHECK_ARCHS = ("80", "90")

_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_module: ModuleType | None = None


def source_dir() -> Path | None:
    """The directory holding the CUDA sources: ``fastperc/csrc`` (installed) or ``csrc`` (checkout)."""
    for candidate in (_HERE / "csrc", _HERE.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    return None


def sources(directory: Path | None = None) -> list[Path]:
    """Every translation unit of the extension (``*.cu``, ``*.cpp``), sorted."""
    directory = directory or source_dir()
    if directory is None:
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in SOURCE_SUFFIXES)


def _nvcc() -> str | None:
    """nvcc as torch.utils.cpp_extension finds it: $CUDA_HOME / $CUDA_PATH, PATH, /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.access(default, os.X_OK) else None


def built() -> bool:
    """Whether an installed ``fastperc._C`` exists (found, not imported)."""
    try:
        return importlib.util.find_spec(EXTENSION) is not None
    except (ImportError, ValueError):
        return False


def jit_unavailable_reason() -> str | None:
    """Why the just-in-time build cannot run here, or None if it can (nothing is imported)."""
    if os.environ.get("FASTPERC_CUDA_JIT", "1").lower() in ("0", "false", "no", "off"):
        return "the just-in-time build is turned off (FASTPERC_CUDA_JIT=0)"
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if not sources():
        return "the CUDA sources (csrc/) are not installed"
    if _nvcc() is None:
        return "nvcc was not found (set CUDA_HOME)"
    if shutil.which("ninja") is None:
        return "ninja was not found on PATH (pip install ninja)"
    return None


def unavailable_reason() -> str | None:
    """Why the cuda backend cannot run in this process, or None if it can. Cheap: it looks for
    files and programs, and imports or compiles nothing."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if built():
        return None
    reason = jit_unavailable_reason()
    return None if reason is None else f"{EXTENSION} is not built and it cannot be built just in time: {reason}"


def cache_dir() -> Path:
    """Where the just-in-time build lives: one directory per torch, CUDA and GPU architecture."""
    import torch

    root = os.environ.get("FASTPERC_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastperc"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs:  # "8.0;9.0", "9.0a", "8.6+PTX", "Hopper"...
        arch = "sm" + "_".join(re.sub(r"[^0-9A-Za-z]", "", a) for a in re.split(r"[;,\s]+", archs) if a)
    elif torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch = "sm" + "_".join(f"{major}{minor}" for major, minor in caps)
    else:
        arch = "smdefault"
    tag = f"torch{torch.__version__}-cu{torch.version.cuda}-py{sys.version_info[0]}{sys.version_info[1]}-{arch}"
    return base / tag.replace("+", "_") / JIT_NAME


def _up_to_date(build_dir: Path, files: list[Path]) -> bool:
    """Whether a previous build is newer than every source and header (then loading is quick)."""
    libs = list(build_dir.glob(f"{JIT_NAME}*.so")) + list(build_dir.glob(f"{JIT_NAME}*.pyd"))
    if not libs:
        return False
    newest_source = max(p.stat().st_mtime for p in files)
    return max(p.stat().st_mtime for p in libs) >= newest_source


def jit_build(build_dir: Path | None = None, *, verbose: bool = False) -> ModuleType:
    """Compile (or reload from the cache) the extension with ``torch.utils.cpp_extension.load``."""
    from torch.utils import cpp_extension

    directory = source_dir()
    if directory is None:
        raise RuntimeError("fastperc: the CUDA sources (csrc/) are not installed; reinstall fastperc")
    srcs = sources(directory)
    build_dir = Path(build_dir) if build_dir is not None else cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    headers = [p for p in directory.iterdir() if p.suffix in HEADER_SUFFIXES]
    announce = not _up_to_date(build_dir, srcs + headers)
    if announce:
        print(
            f"fastperc: compiling the CUDA kernels of the 'cuda' backend (first use; about a minute), "
            f"cached in {build_dir} ...",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    module = cpp_extension.load(
        name=JIT_NAME,
        sources=[str(p) for p in srcs],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        extra_include_paths=[str(directory)],
        build_directory=str(build_dir),
        verbose=verbose,
    )
    if announce:
        print(f"fastperc: CUDA kernels ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return module


def load() -> ModuleType:
    """The extension module: the installed ``fastperc._C``, else the just-in-time build (once
    per process; later calls return the same module)."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            _module = _load_uncached()
    return _module


def _load_uncached() -> ModuleType:
    if built():
        try:
            return importlib.import_module(EXTENSION)
        except ImportError as exc:  # e.g. built against another torch
            reason = jit_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"fastperc: {EXTENSION} is installed but does not load ({exc}); "
                                   f"rebuild fastperc against this torch") from exc
            print(f"fastperc: {EXTENSION} is installed but does not load ({exc}); building it just in time",
                  file=sys.stderr, flush=True)
            return jit_build()
    reason = jit_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"fastperc: {EXTENSION} is not built and it cannot be built just in time: {reason}")
    return jit_build()


def check_flags() -> list[str]:
    """The nvcc flags of the compile-only check (make cuda-check): those of a
    ``torch.utils.cpp_extension`` build of this extension, for sm_80 and sm_90.

    The CPU wheel of torch carries the ATen and c10 CUDA headers but not
    ``c10/cuda/impl/cuda_cmake_macros.h``, which its CMake build generates; that header only
    defines ``C10_CUDA_BUILD_SHARED_LIBS``, which matters on Windows alone. c10 provides
    ``C10_CUDA_NO_CMAKE_CONFIGURE_FILE`` for exactly this case, so the check defines it when
    (and only when) the generated header is missing.
    """
    import sysconfig

    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths()
    flags = [f"-I{source_dir()}"]
    for p in includes + [sysconfig.get_paths()["include"]]:
        flags += ["-isystem", p]
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in includes):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    flags += [f"-DTORCH_EXTENSION_NAME={JIT_NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    flags += list(cpp_extension.COMMON_NVCC_FLAGS)
    flags += [f"-std=c++{_cxx_standard()}", "-Xcompiler", "-fPIC"]
    # Not the optimisation level: it changes host code generation only (device code is
    # optimised by ptxas either way) and -O3 costs a quarter of the check's time.
    flags += [f for f in NVCC_FLAGS if not f.startswith("-O")]
    flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CHECK_ARCHS]
    return flags


def _cxx_standard() -> int:
    """The C++ standard torch.utils.cpp_extension compiles extensions with (17 or 20)."""
    import inspect

    from torch.utils import cpp_extension

    return 20 if "-std=c++20" in inspect.getsource(cpp_extension) else 17


if __name__ == "__main__":
    # Run by path (the Makefile): prints what it is asked, imports nothing from fastperc.
    if sys.argv[1:] != ["--check-flags"]:
        sys.exit("usage: python fastperc/_cuda_ext.py --check-flags")
    print(" ".join(check_flags()))
