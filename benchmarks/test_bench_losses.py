"""gram, style_loss, feature_loss, tv_loss: fastperc against eager torch (and torch.compile
on the GPU), forward and forward+backward, at the VGG-16 layer shapes of a batch of four
256x256 images (DESIGN.md; 1/16 of the pixels on a CPU)."""
import pytest

from conftest import DEVICE
from fastperc.bench.cases import case_providers, iter_cases

CASES = list(iter_cases(DEVICE, ops=["gram", "style_loss", "feature_loss", "tv_loss"]))


@pytest.mark.parametrize("case,provider", case_providers(DEVICE, CASES), ids=lambda v: getattr(v, "id", v))
def test_loss_op(measure_case, case, provider):
    measure_case(case, provider)
