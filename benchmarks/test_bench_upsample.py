"""upsample_conv2d and conv_transpose2d: fastperc against the plain eager compositions
(cuDNN / oneDNN) and their torch.compile (on the GPU), forward and forward+backward, at the
TransformerNet's upsampling layers (fastperc.bench.shapes.UPSAMPLE: batch-4 training at 256^2,
(4, 128, 64, 64) -> 64 channels and (4, 64, 128, 128) -> 32; inference at 1024^2), NCHW and
channels_last; 1/16 of the pixels on a CPU.

Competitors: for upsample_conv2d, "eager" is F.interpolate(nearest, x2) + F.pad(reflect) +
F.conv2d; for conv_transpose2d, "eager" is F.conv_transpose2d and "phases" its phase
decomposition in plain torch (fastperc.bench.baselines.conv_transpose2d_phases).

FLOPs (fastperc.bench.cases): ``flops`` (TFLOPs) counts the phase-decomposed work, the
multiply-adds a kernel must do; ``flops_naive`` (TFLOPs_naive) the work as written, a 3x3 conv
on the 2H x 2W grid. Bytes: the floor, each tensor read or written once.
"""
import pytest

from conftest import DEVICE
from fastperc.bench.cases import case_providers, iter_cases

CASES = list(iter_cases(DEVICE, ops=["upsample_conv2d", "conv_transpose2d"]))
# Two shared CPU cores time noisily: more rounds than the default five for a usable median.
ROUNDS = 9 if DEVICE != "cuda" else None


@pytest.mark.parametrize("case,provider", case_providers(DEVICE, CASES), ids=lambda v: getattr(v, "id", v))
def test_upsample_op(measure_case, case, provider):
    measure_case(case, provider, rounds=ROUNDS)
