"""End-to-end: TransformerNet inference and one training step, fastperc's fused network and
loss against the plain pytorch/examples composition with the same weights, side by side
(fastperc.bench.end_to_end). On two CPU cores: inference at 512x512 and a training step at
batch 4, 128x128; on a GPU: inference at 512^2, 1024^2, 3840x2160 and training at 256^2."""
import pytest

from conftest import DEVICE, ON_GPU
from fastperc.bench import end_to_end

CASES = list(end_to_end.iter_cases(DEVICE))


@pytest.mark.parametrize("provider", end_to_end.providers(DEVICE))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_end_to_end(measure, case, provider):
    measure(end_to_end.runner(case, provider), op=case.task, shape=(case.batch, 3, *case.size),
            dtype=provider.rsplit("-", 1)[1], mode="fwd" if case.task == "inference" else "fwd+bwd",
            provider=provider, bytes=0, rounds=None if ON_GPU else 3)
