"""Benchmark cases: for every op, the shapes, the inputs, the competitors and the floors.

A case is one (op, shape, dtype, mode). Its ``bytes`` and ``flops`` are what the op must
move and compute at least (each input read once, each output written once); achieved GB/s
and TFLOP/s are measured against them. Providers: "eager" (the torch composition a user
would write, fastperc.bench.baselines), "compile" (torch.compile of it), fastperc's backends
by name ("torch", "triton", "cuda"), and an op's own plain-torch competitors (``phases``, the
phase-decomposed transposed conv).

Both the pytest-benchmark suites in benchmarks/ and ``fastperc bench`` take their cases
from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

import fastperc
from fastperc import rules
from fastperc.bench import baselines, precision
from fastperc.bench.shapes import IMAGE, TRANSFORMER, UPSAMPLE, VGG, scaled

MODES = ("fwd", "fwd+bwd")
# Every provider that is not an op's own competitor, in the order tables list them.
PROVIDERS = ("eager", "compile", "torch", "triton", "cuda")
BACKENDS = ("torch", "triton", "cuda")  # the providers that are fastperc
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class OpSpec:
    """How to benchmark one op."""

    name: str
    shapes: dict[str, tuple]                     # label -> shape (full size)
    make_inputs: Callable[[tuple, torch.dtype, str], list[torch.Tensor]]
    eager: Callable[..., torch.Tensor]
    bytes: Callable[[tuple, int, str], int]      # (shape, itemsize, mode) -> bytes
    flops: Callable[[tuple, str], int] = lambda shape, mode: 0
    fastperc_op: str | None = None               # the fastperc function, if not ``name``
    # fastperc's call on a backend; default: fastperc.<name>(*inputs, backend=backend)
    fused_call: Callable[[str], Callable[..., torch.Tensor]] | None = None
    layouts: tuple[str, ...] = ("nchw",)         # memory formats of the image inputs
    # The units (fastperc.bench.precision.UNITS) whose float32 mode the eager composition
    # runs in; fastperc's Triton kernels do their products with tl.dot ("matmul").
    fp32_units: tuple[str, ...] = ()
    competitors: tuple[tuple[str, Callable[..., torch.Tensor]], ...] = ()  # (provider, fn)
    flops_naive: Callable[[tuple, str], int] | None = None  # the work as the eager code writes it

    def fused(self, backend: str) -> Callable[..., torch.Tensor]:
        if self.fused_call is not None:
            return self.fused_call(backend)
        op = getattr(fastperc, self.fastperc_op or self.name)
        return lambda *args: op(*args, backend=backend)


@dataclass(frozen=True)
class Case:
    spec: OpSpec
    label: str
    shape: tuple
    dtype: torch.dtype
    mode: str
    device: str
    layout: str = "nchw"

    @property
    def op(self) -> str:
        return self.spec.name

    @property
    def bytes(self) -> int:
        return self.spec.bytes(self.shape, torch.empty((), dtype=self.dtype).element_size(), self.mode)

    @property
    def flops(self) -> int:
        return self.spec.flops(self.shape, self.mode)

    @property
    def flops_naive(self) -> int | None:
        return None if self.spec.flops_naive is None else self.spec.flops_naive(self.shape, self.mode)

    @property
    def id(self) -> str:
        layout = "" if self.layout == "nchw" else f"-{self.layout}"
        return f"{self.op}-{self.label}{layout}-{str(self.dtype).removeprefix('torch.')}-{self.mode}"

    def precision(self, provider: str) -> str | None:
        """"tf32" or "ieee" for a float32 case: the precision ``provider`` runs it in; None
        for other dtypes."""
        if self.dtype != torch.float32:
            return None
        if provider == "cuda":
            units: tuple[str, ...] = ()  # elementwise and reduction kernels only
        elif provider == "triton":
            units = ("matmul",) if self.spec.fp32_units else ()
        else:
            units = self.spec.fp32_units
        return precision.fp32_precision(units, self.device)

    def runner(self, provider: str, compiled: dict | None = None) -> Callable[[], object]:
        """A no-argument callable running this case on ``provider`` with fresh random inputs."""
        competitors = dict(self.spec.competitors)
        if provider == "eager":
            fn = self.spec.eager
        elif provider == "compile":
            # One specialised graph per case, as a user compiling for one shape gets (a graph
            # shared across shapes would be recompiled with dynamic shapes, or fall back to eager
            # past the recompile limit).
            compiled = {} if compiled is None else compiled
            if self.id not in compiled:
                _raise_recompile_limit()
                compiled[self.id] = torch.compile(self.spec.eager, dynamic=False)
            fn = compiled[self.id]
        elif provider in competitors:
            fn = competitors[provider]
        else:
            fn = self.spec.fused(provider)
        inputs = self.spec.make_inputs(self.shape, self.dtype, self.device)
        if self.layout == "channels_last":
            inputs = [t.detach().contiguous(memory_format=torch.channels_last).requires_grad_(t.requires_grad)
                      if t.dim() == 4 else t for t in inputs]
        if self.mode == "fwd":
            return lambda: fn(*inputs)
        leaves = [t for t in inputs if t.requires_grad]

        def forward_backward():
            out = fn(*inputs)
            torch.autograd.grad(out, leaves, torch.ones_like(out))

        return forward_backward


def _raise_recompile_limit(limit: int = 256) -> None:
    """Each case compiles the same eager function again for its shape; allow that many."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def _activation(shape, dtype, device, requires_grad=True):
    """Non-negative like a ReLU output, of a real activation's magnitude; never all zero."""
    x = (torch.rand(shape, device=device) * 3).to(dtype)
    return x.requires_grad_(requires_grad)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _gram_bytes(shape, s, mode):
    n, c, h, w = shape
    fwd = n * c * h * w * s + n * c * c * s
    return fwd if mode == "fwd" else fwd + n * c * c * s + 2 * n * c * h * w * s


def _gram_flops(shape, mode):
    """The useful FLOPs of the full product, 2 N C^2 HW per pass; the Triton kernel computes
    only the upper triangle (about half), so its TFLOP/s is a useful-work rate."""
    n, c, h, w = shape
    return 2 * n * c * c * h * w * (1 if mode == "fwd" else 2)


def _style_inputs(shape, dtype, device):
    x = _activation(shape, dtype, device)
    target = baselines.gram(_activation((1,) + tuple(shape[1:]), torch.float32, device, False))[0]
    return [x, target]


def _style_bytes(shape, s, mode):
    n, c, h, w = shape
    fwd = n * c * h * w * s + c * c * 4
    return fwd if mode == "fwd" else fwd + 2 * n * c * h * w * s + (n + 1) * c * c * 4


SPECS: dict[str, OpSpec] = {
    "gram": OpSpec("gram", VGG, lambda sh, dt, dev: [_activation(sh, dt, dev)], baselines.gram,
                   _gram_bytes, _gram_flops, fp32_units=("matmul",)),
    "style_loss": OpSpec("style_loss", VGG, _style_inputs, baselines.style_loss, _style_bytes, _gram_flops,
                         fp32_units=("matmul",)),
    "feature_loss": OpSpec(
        "feature_loss", {"relu2_2": VGG["relu2_2"]},
        lambda sh, dt, dev: [_activation(sh, dt, dev), _activation(sh, dt, dev, False)],
        baselines.feature_loss,
        lambda sh, s, mode: _numel(sh) * s * (2 if mode == "fwd" else 5)),
    "tv_loss": OpSpec(
        "tv_loss", {"image": IMAGE["image"], "relu1_2": VGG["relu1_2"]},
        lambda sh, dt, dev: [(torch.rand(sh, device=dev) * 255).to(dt).requires_grad_(True)],
        baselines.tv_loss,
        lambda sh, s, mode: _numel(sh) * s * (1 if mode == "fwd" else 3)),
}


def _norm_inputs(shape, dtype, device, *, residual=False, running=False, per_sample=False):
    """A convolution's output (signed, not centred), affine parameters ((N, C) where
    ``per_sample``: conditional instance norm), and optionally a residual or running statistics."""
    c = shape[1]
    pshape = (shape[0], c) if per_sample else (c,)
    x = (torch.randn(shape, device=device) * 3 + 0.5).to(dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(pshape, device=device)).requires_grad_(True)
    b = (0.1 * torch.randn(pshape, device=device)).requires_grad_(True)
    inputs = [x, w, b]
    if residual:
        inputs.append(torch.randn(shape, device=device).to(dtype).requires_grad_(True))
    if running:
        inputs += [torch.zeros(c, device=device), torch.ones(c, device=device)]
    return inputs


def _norm_bytes(tensors_fwd: int):
    """Forward reads x (and the residual) and writes y; backward reads dy and x, writes dx."""
    return lambda sh, s, mode: _numel(sh) * s * (tensors_fwd if mode == "fwd" else tensors_fwd + 3)


def _conditional_instance_norm_relu(x, weight, bias):
    """The eager composition for per-sample (N, C) γ, β: the unscaled norm, then the affine."""
    y = torch.nn.functional.instance_norm(x)
    return torch.relu(y * weight[:, :, None, None] + bias[:, :, None, None])


SPECS.update({
    "instance_norm_relu": OpSpec(
        "instance_norm_relu", TRANSFORMER, _norm_inputs, baselines.instance_norm_relu, _norm_bytes(2),
        layouts=("nchw", "channels_last")),
    # Conditional instance norm (one γ, β per sample and channel), beside the (C,) case above.
    "instance_norm_relu_per_sample": OpSpec(
        "instance_norm_relu_per_sample", TRANSFORMER,
        lambda sh, dt, dev: _norm_inputs(sh, dt, dev, per_sample=True),
        _conditional_instance_norm_relu, _norm_bytes(2), fastperc_op="instance_norm_relu",
        layouts=("nchw", "channels_last")),
    "instance_norm_residual": OpSpec(
        "instance_norm_residual", TRANSFORMER,
        lambda sh, dt, dev: _norm_inputs(sh, dt, dev, residual=True),
        baselines.instance_norm_residual, _norm_bytes(3), fastperc_op="instance_norm",
        fused_call=lambda be: lambda x, w, b, r: fastperc.instance_norm(x, w, b, residual=r, backend=be),
        layouts=("nchw", "channels_last")),
    "batch_norm_relu": OpSpec(
        "batch_norm_relu", TRANSFORMER,
        lambda sh, dt, dev: _norm_inputs(sh, dt, dev, running=True),
        baselines.batch_norm_relu, _norm_bytes(2), layouts=("nchw", "channels_last")),
})


def _conv_inputs(transposed: bool):
    """x, a 3x3 weight to half as many channels ((C_out, C_in) or, transposed, (C_in, C_out)),
    and a bias: the upsampling layers of TransformerNet."""
    def make(shape, dtype, device):
        c_in = shape[1]
        c_out = c_in // 2
        w_shape = (c_in, c_out, 3, 3) if transposed else (c_out, c_in, 3, 3)
        x = torch.randn(shape, device=device).to(dtype).requires_grad_(True)
        w = (torch.randn(w_shape, device=device) / (9 * c_in) ** 0.5).to(dtype).requires_grad_(True)
        b = (0.1 * torch.randn(c_out, device=device)).to(dtype).requires_grad_(True)
        return [x, w, b]
    return make


def _conv_bytes(shape, s, mode):
    """Forward reads x and the weight and writes y (2H x 2W); backward adds dy, x, dx, dweight."""
    n, c_in, h, w = shape
    c_out = c_in // 2
    x, y, weight = n * c_in * h * w, n * c_out * 4 * h * w, c_in * c_out * 9
    fwd = (x + y + weight) * s
    return fwd if mode == "fwd" else fwd + (y + 2 * x + weight) * s


def _conv_flops(taps_per_pixel: int):
    """2 * taps * C_in * C_out FLOPs per input pixel; forward+backward is three times the
    forward (dx and dweight are convolutions of the same size). Phase-decomposed, the work a
    kernel must do: 16 taps for the upsample conv, 9 for the transposed conv; as written (a 3x3
    conv on the 2H x 2W grid, for the transposed conv over the zero-inserted input): 36."""
    def flops(shape, mode):
        n, c_in, h, w = shape
        fwd = 2 * taps_per_pixel * n * h * w * c_in * (c_in // 2)
        return fwd if mode == "fwd" else 3 * fwd
    return flops


_UPSAMPLE_SHAPES = {label: shape for label, (shape, _) in UPSAMPLE.items()}
SPECS.update({
    "upsample_conv2d": OpSpec("upsample_conv2d", _UPSAMPLE_SHAPES, _conv_inputs(False), baselines.upsample_conv2d,
                              _conv_bytes, _conv_flops(16), layouts=("nchw", "channels_last"),
                              fp32_units=("conv",), flops_naive=_conv_flops(36)),
    "conv_transpose2d": OpSpec("conv_transpose2d", _UPSAMPLE_SHAPES, _conv_inputs(True),
                               baselines.conv_transpose2d, _conv_bytes, _conv_flops(9),
                               layouts=("nchw", "channels_last"), fp32_units=("conv",),
                               competitors=(("phases", baselines.conv_transpose2d_phases),),
                               flops_naive=_conv_flops(36)),
})


def dtypes_for(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]


def iter_cases(device: str, *, quick: bool = False, ops: Sequence[str] | None = None,
               dtypes: Sequence[torch.dtype] | None = None) -> Iterator[Case]:
    """Every case to run on ``device``; small shapes on a CPU or with ``quick``.

    Ordered for a run that a deadline may cut: the first shape of every op (in the order of
    ``ops``; default SPECS) in every dtype (in the order of ``dtypes``; default
    :func:`dtypes_for`) before the second shape of any."""
    small = quick or device != "cuda"
    shapes = {name: list(scaled(SPECS[name].shapes, small).items())[:1 if quick else None]
              for name in (ops if ops is not None else SPECS)}
    depth = max((len(v) for v in shapes.values()), default=0)
    for rank in range(depth):
        for dtype in dtypes or dtypes_for(device):
            for name, labelled in shapes.items():
                if rank >= len(labelled):
                    continue
                label, shape = labelled[rank]
                for layout in SPECS[name].layouts:
                    for mode in MODES:
                        yield Case(SPECS[name], label, shape, dtype, mode, device, layout)


def known_providers() -> list[str]:
    """Every provider name: PROVIDERS, then the ops' own competitors."""
    names = list(PROVIDERS)
    for spec in SPECS.values():
        names += [p for p, _ in spec.competitors if p not in names]
    return names


def providers(device: str, spec: OpSpec | None = None, wanted: Sequence[str] | None = None) -> list[str]:
    """The providers to measure on ``device`` (for ``spec``'s op), in the order of ``wanted``.

    By default: eager, compile (on the GPU, where compiling each shape pays), fastperc's
    backends that run natively here (not the reference, not Triton's CPU interpreter) and the
    op's own competitors. ``wanted`` chooses among every provider that can run here: compile on
    a CPU too, triton on a CPU under the interpreter. ``cuda`` only for the ops it implements
    (``fastperc.cuda_backend.OPS``) and where its extension can be loaded."""
    from fastperc.cuda_backend import OPS as CUDA_OPS

    available = fastperc.available_backends()
    competitors = [p for p, _ in spec.competitors] if spec is not None else []

    def runs(p: str) -> bool:
        if p == "eager":
            return True
        if p == "compile":
            return device == "cuda" or wanted is not None
        if p == "torch":
            return "torch" in available
        if p == "triton":
            return "triton" in available and (device == "cuda" or (wanted is not None and rules.INTERPRETED))
        if p == "cuda":
            return ("cuda" in available and device == "cuda"
                    and (spec is None or (spec.fastperc_op or spec.name) in CUDA_OPS))
        return p in competitors

    return [p for p in (list(wanted) if wanted is not None else list(PROVIDERS) + competitors) if runs(p)]


def case_providers(device: str, cases: list[Case], wanted: Sequence[str] | None = None) -> list[tuple[Case, str]]:
    """Every (case, provider) pair to measure."""
    return [(case, provider) for case in cases for provider in providers(device, case.spec, wanted)]
