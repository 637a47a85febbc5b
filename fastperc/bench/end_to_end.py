"""End-to-end cases: TransformerNet inference and one training step (TransformerNet +
perceptual loss, batch 4, the paper's layers), fastperc against the plain pytorch/examples
composition with the same weights.

Providers: "examples-eager-fp32" (as users run that script), "examples-eager-bf16"
(autocast, channels_last), "examples-compile-bf16" (torch.compile + autocast),
"fastperc-fp32" and "fastperc-bf16" (the fused network and PerceptualLoss, on the backend
fastperc picks for the device: triton on CUDA, torch on a CPU).

Selected like the op cases: by task ("inference", "train_step"), by op-level provider
(examples-eager-* is "eager", examples-compile-* "compile", fastperc-* the backend it runs on)
and by dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

import fastperc
from fastperc.backends import resolve_backend
from fastperc.bench import precision
from fastperc.bench.baselines import ExamplesLoss

TASKS = ("inference", "train_step")

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


def iter_cases(device: str, *, quick: bool = False, tasks: Sequence[str] | None = None) -> Iterator[EndToEndCase]:
    """Inference at 512^2, 1024^2 and 3840x2160 and the training step at batch 4, 256^2 on
    CUDA; smaller on a CPU or with ``quick``. ``tasks`` chooses and orders them."""
    if device == "cuda" and not quick:
        cases = [EndToEndCase("inference", size, 1, device) for size in ((512, 512), (1024, 1024), (2160, 3840))]
        cases.append(EndToEndCase("train_step", (256, 256), 4, device))
    else:
        cases = [EndToEndCase("inference", (256, 256) if quick else (512, 512), 1, device),
                 EndToEndCase("train_step", (64, 64) if quick else (128, 128), 4, device)]
    if tasks is not None:  # in the order of ``tasks``
        cases = sorted((c for c in cases if c.task in tasks), key=lambda c: tasks.index(c.task))
    return iter(cases)


def providers(device: str, wanted: Sequence[str] | None = None,
              dtypes: Sequence[torch.dtype] | None = None) -> list[str]:
    """The end-to-end providers to measure on ``device``: by default the device's (fp32 only on
    a CPU unless ``dtypes`` asks for more); ``wanted`` (op-level provider names, see
    :func:`op_provider`) and ``dtypes`` narrow them."""
    names = PROVIDERS_GPU if device == "cuda" or dtypes is not None else PROVIDERS_CPU
    if wanted is not None:
        names = [p for p in names if op_provider(p, device) in wanted]
    return [p for p in names if dtypes is None or dtype_of(p) in dtypes]


def op_provider(provider: str, device: str) -> str:
    """The op-level provider an end-to-end provider stands for: "eager", "compile", or the
    backend the fused network runs on here."""
    family, mode, _ = _parse_name(provider)
    if family == "fastperc":
        return resolve_backend(None, torch.device(device))
    return mode


def dtype_of(provider: str) -> torch.dtype:
    return torch.bfloat16 if _parse_name(provider)[2] == "bf16" else torch.float32


def precision_of(provider: str, device: str) -> str | None:
    """"tf32" or "ieee" for a float32 provider (its convolutions or matrix products may run in
    TF32), None for bf16."""
    if dtype_of(provider) != torch.float32:
        return None
    return precision.fp32_precision(precision.UNITS, device)


def _parse_name(provider: str) -> tuple[str, str, str]:
    """"examples-eager-fp32" -> ("examples", "eager", "fp32"); "fastperc-bf16" -> ("fastperc", "", "bf16")."""
    family, *mode, dtype = provider.split("-")
    return family, "-".join(mode), dtype


def _parse(provider: str) -> tuple[bool, bool, torch.dtype]:
    """provider -> (fused, compiled, dtype)."""
    family, mode, _ = _parse_name(provider)
    return family == "fastperc", mode == "compile", dtype_of(provider)


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
