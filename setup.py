"""Build configuration.

`kernels/` (the Triton kernels) sits at the top of the repository beside `csrc/` and is
installed as the subpackage `fastperc.kernels`.
"""
from setuptools import setup

setup(
    packages=["fastperc", "fastperc.bench", "fastperc.models", "fastperc.ops", "fastperc.torch_backend", "fastperc.kernels"],
    package_dir={"fastperc": "fastperc", "fastperc.kernels": "kernels"},
)
