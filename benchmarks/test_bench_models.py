"""End-to-end: TransformerNet inference and one training step, fastperc's fused network and
loss against the plain pytorch/examples composition with the same weights, side by side.

CPU: inference at 512x512 (the 1.3x bar of the networks issue) and a training step at
batch 4, 128x128. GPU: inference at 512^2, 1024^2 and 3840x2160 and training at batch 4,
256^2, in fp32 and bf16 (autocast) for both.
"""
from __future__ import annotations

import pytest
import torch

import fastperc
from fastperc.bench.baselines import ExamplesLoss
from conftest import DEVICE, ON_GPU

INFERENCE_SIZES = [(512, 512), (1024, 1024), (2160, 3840)] if ON_GPU else [(512, 512)]
TRAIN_SIZE = (256, 256) if ON_GPU else (128, 128)
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
PROVIDERS = ["examples", "fastperc"]
ROUNDS = None if ON_GPU else 3


def _network(provider: str) -> torch.nn.Module:
    """The same weights for both providers."""
    torch.manual_seed(0)
    plain = fastperc.TransformerNet(fused=False)
    if provider == "examples":
        return plain.to(DEVICE)
    fused = fastperc.TransformerNet(fused=True)
    fused.load_state_dict(plain.state_dict())
    return fused.to(DEVICE)


def _autocast(dtype):
    return torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", INFERENCE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_inference(measure, size, dtype, provider):
    net = _network(provider).eval()
    x = torch.rand(1, 3, *size, device=DEVICE) * 255

    def run():
        with torch.no_grad(), _autocast(dtype):
            return net(x)

    measure(run, op="inference", shape=(1, 3, *size), dtype=dtype, mode="fwd",
            provider=provider, bytes=0, rounds=ROUNDS)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_train_step(measure, dtype, provider):
    net = _network(provider).train()
    style = torch.rand(1, 3, *TRAIN_SIZE, device=DEVICE) * 255
    if provider == "examples":
        loss_fn = ExamplesLoss(fastperc.VGG16Features(weights=None).to(DEVICE), style)
    else:
        loss_fn = fastperc.PerceptualLoss(weights=None, preset="pytorch-examples").to(DEVICE)
        loss_fn.set_style(style)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.rand(4, 3, *TRAIN_SIZE, device=DEVICE) * 255

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(dtype):
            loss = loss_fn(net(x), x)
        loss.backward()
        optimizer.step()

    measure(step, op="train_step", shape=(4, 3, *TRAIN_SIZE), dtype=dtype, mode="fwd+bwd",
            provider=provider, bytes=0, rounds=ROUNDS)
