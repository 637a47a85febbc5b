"""End-to-end cases: TransformerNet inference and one training step (TransformerNet +
perceptual loss, batch 4, the paper's layers), fastperc against the plain pytorch/examples
composition with the same weights.

Providers: "examples-eager-fp32" (as users run that script), "examples-eager-bf16"
(autocast, channels_last), "examples-compile-bf16" (torch.compile + autocast),
"fastperc-fp32" and "fastperc-bf16" (the fused network and PerceptualLoss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

import fastperc
from fastperc.bench.baselines import ExamplesLoss

PROVIDERS_GPU = ("examples-eager-fp32", "examples-eager-bf16", "examples-compile-bf16",
                 "fastperc-fp32", "fastperc-bf16")
PROVIDERS_CPU = ("examples-eager-fp32", "fastperc-fp32")


@dataclass(frozen=True)
class EndToEndCase:
    task: str            # "inference" or "train_step"
    size: tuple[int, int]
    batch: int
    device: str

    @property
    def id(self) -> str:
        return f"{self.task}-{self.size[0]}x{self.size[1]}-b{self.batch}"


def iter_cases(device: str, *, quick: bool = False) -> Iterator[EndToEndCase]:
    if device == "cuda" and not quick:
        for size in ((512, 512), (1024, 1024), (2160, 3840)):
            yield EndToEndCase("inference", size, 1, device)
        yield EndToEndCase("train_step", (256, 256), 4, device)
    else:
        yield EndToEndCase("inference", (256, 256) if quick else (512, 512), 1, device)
        yield EndToEndCase("train_step", (64, 64) if quick else (128, 128), 4, device)


def providers(device: str) -> tuple[str, ...]:
    return PROVIDERS_GPU if device == "cuda" else PROVIDERS_CPU


def _parse(provider: str) -> tuple[bool, bool, torch.dtype]:
    """provider -> (fused, compiled, dtype)."""
    family, *_, precision = provider.split("-")
    return family == "fastperc", "-compile-" in provider, torch.bfloat16 if precision == "bf16" else torch.float32


def network(fused: bool, device: str) -> torch.nn.Module:
    """TransformerNet with the same (seeded) weights whichever path runs."""
    torch.manual_seed(0)
    plain = fastperc.TransformerNet(fused=False)
    if not fused:
        return plain.to(device)
    net = fastperc.TransformerNet(fused=True)
    net.load_state_dict(plain.state_dict())
    return net.to(device)


def runner(case: EndToEndCase, provider: str) -> Callable[[], object]:
    """A no-argument callable running ``case`` on ``provider``."""
    fused, compiled, dtype = _parse(provider)
    device = case.device
    net = network(fused, device)
    channels_last = dtype == torch.bfloat16 and device == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    x = (torch.rand(case.batch, 3, *case.size, device=device) * 255).contiguous(memory_format=memory_format)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    if case.task == "inference":
        net.eval()
        model = torch.compile(net) if compiled else net

        def infer():
            with torch.no_grad(), autocast:
                return model(x)

        return infer

    net.train()
    style = torch.rand(1, 3, *case.size, device=device) * 255
    if fused:
        loss_fn = fastperc.PerceptualLoss(weights=None, preset="pytorch-examples").to(device)
        loss_fn.set_style(style)
    else:
        loss_fn = ExamplesLoss(fastperc.VGG16Features(weights=None).to(device), style)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def loss_of(batch):
        return loss_fn(net(batch), batch)

    compute = torch.compile(loss_of) if compiled else loss_of

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = compute(x)
        loss.backward()
        optimizer.step()

    return step
