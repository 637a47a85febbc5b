"""instance_norm_relu (with (C,) and with per-sample (N, C) parameters), instance_norm + residual
and batch_norm_relu: fastperc against eager
F.instance_norm / F.batch_norm followed by ReLU (or the add), and its torch.compile (on the
GPU), forward and forward+backward, at the TransformerNet's activation shapes (4, 32, 256,
256), (4, 64, 128, 128), (4, 128, 64, 64) (1/16 of the pixels on a CPU), NCHW and
channels_last. Cases, byte floors and baselines: fastperc.bench.cases."""
import pytest

from conftest import DEVICE
from fastperc.bench.cases import case_providers, iter_cases

CASES = list(iter_cases(DEVICE, ops=["instance_norm_relu", "instance_norm_relu_per_sample", "instance_norm_residual",
                                     "batch_norm_relu"]))


@pytest.mark.parametrize("case,provider", case_providers(DEVICE, CASES), ids=lambda v: getattr(v, "id", v))
def test_norm_op(measure_case, case, provider):
    measure_case(case, provider)
