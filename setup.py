"""Build configuration.

`kernels/` (the Triton kernels) sits at the top of the repository beside `csrc/` and is
installed as the subpackage `fastperc.kernels`. `csrc/` (the CUDA C++ kernels) is built as the
extension `fastperc._C` when a CUDA build of torch and nvcc are present (for the GPU found, or
TORCH_CUDA_ARCH_LIST, e.g. "9.0"), and is shipped as `fastperc/csrc/` either way, for the
just-in-time build of fastperc/_cuda_ext.py. FASTPERC_BUILD_CUDA=0 skips the build.
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _cuda_build() -> dict:
    """setup() arguments that build fastperc._C, or {} (saying why in one line) without CUDA."""
    spec = importlib.util.spec_from_file_location("_fastperc_cuda_ext", HERE / "fastperc" / "_cuda_ext.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)  # stdlib imports only: the flags and the source list
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        reason = "torch is not importable at build time; install with --no-build-isolation to build it"
    else:
        if os.environ.get("FASTPERC_BUILD_CUDA", "1") == "0":
            reason = "FASTPERC_BUILD_CUDA=0"
        elif torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None:
            reason = "nvcc was not found (set CUDA_HOME)"
        else:
            extension = CUDAExtension(
                "fastperc._C",
                sources=[os.path.relpath(p, HERE) for p in ext.sources(HERE / "csrc")],
                include_dirs=[str(HERE / "csrc")],
                extra_compile_args={"cxx": ext.CXX_FLAGS, "nvcc": ext.NVCC_FLAGS},
            )
            return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}
    print(f"fastperc: installing without the CUDA extension fastperc._C ({reason}); "
          "the cuda backend builds it just in time where CUDA and nvcc are present", file=sys.stderr)
    return {}


setup(
    packages=["fastperc", "fastperc.bench", "fastperc.commands", "fastperc.models", "fastperc.ops",
              "fastperc.torch_backend", "fastperc.kernels", "fastperc.csrc"],
    package_dir={"fastperc": "fastperc", "fastperc.kernels": "kernels", "fastperc.csrc": "csrc"},
    package_data={"fastperc.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
    **_cuda_build(),
)
