"""The op contract's table: one entry per fused op (DESIGN.md, "The op contract").

tests/test_op_contract.py runs every entry over every backend that implements it on this
machine, every dtype it is tested in there, and the entry's cases (shapes, layouts, options):
forward and backward against the float64 oracle, the oracle's explicit backward against
autograd, gradcheck in float64, torch.library.opcheck, torch.compile(fullgraph=True),
autocast and the bad-input errors. An entry gives

* how to build random inputs for a shape, dtype, device, layout and variant (the op's options:
  p and reduction, the norm flags, a bias or not),
* the public call ``fastperc.<name>`` (the inputs are its keyword arguments) and the float64
  oracle taking the same arguments (``fastperc.reference.<name>``; for the upsampling
  convolutions their plain torch.nn.functional definition),
* the oracle's explicit backward, the tolerance rule and the single-shot checks' calls.

Op-specific tests stay in the per-op modules and reuse the entries and
:func:`check_forward_backward`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pytest
import torch
import torch.nn.functional as F

import fastperc
from fastperc import reference
from helpers import (
    DEVICES,
    LAYOUTS,
    assert_close,
    backends_for,
    make_input,
    reference_grads,
    tolerance,
)

F32 = torch.float32
TWO_LAYOUTS = ("contiguous", "channels_last")


# -- the entries' vocabulary -------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One forward/backward case: a shape, the op's options, a layout of the image input, and
    the one dtype it runs in (None: every dtype the backend is tested in)."""
    shape: tuple[int, ...]
    variant: dict = field(default_factory=dict)
    layout: str = "contiguous"
    dtype: torch.dtype | None = None

    @property
    def id(self) -> str:
        return "-".join(["x".join(map(str, self.shape)), self.layout, variant_id(self.variant)])


@dataclass(frozen=True)
class Inputs:
    """The public call's keyword arguments, the names of those that are differentiated, and
    of those the op updates in place (batch norm's running statistics)."""
    kwargs: dict
    leaves: tuple[str, ...]
    state: tuple[str, ...] = ()

    @property
    def image(self) -> str:
        """The name of the (N, C, H, W) input whose layout the cases vary: the first argument."""
        return next(iter(self.kwargs))


def variant_id(variant: dict) -> str:
    return "-".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in variant.items()) or "plain"


def cases(shapes: Iterable, variants: Iterable[dict], layouts: Iterable[str] = LAYOUTS,
          dtype: torch.dtype | None = None) -> tuple[Case, ...]:
    """Every shape x variant x layout."""
    return tuple(Case(s, v, lay, dtype) for s, v, lay in itertools.product(shapes, variants, layouts))


@dataclass(frozen=True)
class OpEntry:
    name: str
    make: Callable[..., Inputs]  # (shape, dtype, device, layout, variant) -> Inputs
    oracle: Callable  # the same keyword arguments, float64 in, differentiable by autograd
    oracle_backward: Callable[[dict, torch.Tensor], dict]  # (float64 kwargs, dL/dy) -> {leaf: grad}
    cases: tuple[Case, ...]
    returns_loss: bool  # float32 out (float64 for float64 in), else the image input's dtype
    gradcheck_shape: tuple[int, ...]
    gradcheck_variants: tuple[dict, ...]
    small_shape: tuple[int, ...]  # torch.compile and autocast
    compile_variants: tuple[dict, ...]
    opchecks: Callable[[str, str], list]  # (backend, device) -> [(op, args, test_utils or None)]
    bad_inputs: tuple  # pytest.param(args, kwargs, error, match, id=...)
    reference_shapes: tuple[tuple[int, ...], ...]  # the oracle's explicit backward vs autograd
    # Under CPU autocast (bf16 image input): which other inputs the op rounds to bf16 too, and
    # the dtype it then computes in (the tolerance); the other inputs stay float32.
    autocast_rounds: tuple[str, ...] = ()
    autocast_computes_in: torch.dtype = torch.bfloat16
    backends: tuple[str, ...] = ("reference", "torch", "triton")
    # Where the full set of cases would be slow: "reference" or "triton-interpreter" -> cases.
    cases_for: dict = field(default_factory=dict)
    oracle_backward_keeps_layout: bool = False  # the explicit dx is laid out like x
    # Where gradcheck checks a random projection of the Jacobian, not the whole of it:
    # "triton-interpreter" (slow launches) or a backend name.
    gradcheck_fast_on: tuple[str, ...] = ("triton-interpreter",)

    @property
    def fn(self) -> Callable:
        return getattr(fastperc, self.name)

    @property
    def variants(self) -> list[dict]:
        """The distinct variants of the cases."""
        seen = []
        for case in self.cases:
            if case.variant not in seen:
                seen.append(case.variant)
        return seen

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if not self.returns_loss:
            return dtype
        return torch.float64 if dtype == torch.float64 else torch.float32

    def tolerance(self, backend: str, device: str, dtype: torch.dtype) -> float:
        """TOLERANCE[dtype], TF32's where this op's float32 products run in TF32 (helpers.tolerance)."""
        return tolerance(dtype, device, op=self.name, backend=backend)

    def gradcheck_fast(self, backend: str, device: str) -> bool:
        return ("triton-interpreter" if interpreted(backend, device) else backend) in self.gradcheck_fast_on

    def cases_of(self, backend: str, device: str) -> tuple[Case, ...]:
        key = "triton-interpreter" if interpreted(backend, device) else backend
        return self.cases_for.get(key, self.cases)


def interpreted(backend: str, device: str) -> bool:
    """The Triton kernels run in the interpreter (slow launches: fewer, smaller calls)."""
    return backend == "triton" and device == "cpu"


def backend_devices(entry: OpEntry) -> list[tuple[str, str]]:
    """(backend, device) pairs this machine runs the entry on: the cuda backend where it is
    available and implements the op."""
    pairs = []
    for device in DEVICES:
        names = backends_for(device)
        if device == "cuda" and "cuda" in fastperc.available_backends():
            names = names + ["cuda"]
        pairs += [(b, device) for b in names if b in entry.backends]
    return pairs


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Parameters, targets and running statistics: float32 for any input dtype but float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def natural_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for channels_last-dense t, else contiguous: how the ops lay out what they
    return for t (outputs like x, gradients like their input)."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def upstream_gradient(y: torch.Tensor) -> torch.Tensor:
    """dL/dy: 1.7 for a 0-d loss, else random values of y's shape and dtype."""
    if y.dim() == 0:
        return torch.tensor(1.7, dtype=y.dtype, device=y.device)
    return make_input(tuple(y.shape), y.dtype, str(y.device))


def oracle_call(entry: OpEntry, inputs: Inputs, state64: dict) -> Callable:
    """leaves (float64) -> the oracle on float64 copies of every input, the state ``state64``."""
    fixed = {n: t.detach().double() if isinstance(t, torch.Tensor) else t
             for n, t in inputs.kwargs.items() if n not in inputs.leaves}
    fixed.update(state64)
    return lambda *leaves: entry.oracle(**fixed, **dict(zip(inputs.leaves, leaves)))


def float64_state(inputs: Inputs) -> dict:
    return {n: inputs.kwargs[n].detach().double().clone() for n in inputs.state}


def assert_state(inputs: Inputs, state64: dict) -> None:
    for name, want in state64.items():
        got = inputs.kwargs[name]
        assert_close(got, want, got.dtype, what=name)


def assert_laid_out_like(out: torch.Tensor, x: torch.Tensor, what: str) -> None:
    fmt = natural_format(x)
    assert out.is_contiguous(memory_format=fmt), f"{what}: strides {out.stride()}, expected {fmt} like {x.stride()}"


def check_forward_backward(entry: OpEntry, backend: str, device: str, dtype: torch.dtype, case: Case) -> Inputs:
    """The op against its float64 oracle on the same (rounded) inputs: the output (dtype,
    layout, values), every gradient (dtype, shape, values; the image input's also its layout),
    the updated state. Returns the inputs."""
    inputs = entry.make(case.shape, dtype, device, case.layout, case.variant)
    kwargs = inputs.kwargs
    leaves = [kwargs[n].requires_grad_(True) for n in inputs.leaves]
    state64 = float64_state(inputs)
    y = entry.fn(**kwargs, backend=backend)
    assert y.dtype == entry.out_dtype(dtype), f"{entry.name} returned {y.dtype} for {dtype} input"
    x = kwargs[inputs.image]
    if y.dim() == 4:
        assert_laid_out_like(y, x, entry.name)
    grad_out = upstream_gradient(y)
    grads = torch.autograd.grad(y, leaves, grad_out)
    ref, ref_grads = reference_grads(oracle_call(entry, inputs, state64), leaves, grad_out)
    tol = entry.tolerance(backend, device, dtype)
    assert_close(y, ref, dtype, tol=tol, what=entry.name)
    for name, leaf, g, r in zip(inputs.leaves, leaves, grads, ref_grads):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, f"grad {name}: {g.dtype} {tuple(g.shape)}"
        if name == inputs.image:
            assert_laid_out_like(g, leaf, f"grad {name}")
        assert_close(g, r, dtype, tol=tol, what=f"grad {name}")
    assert_state(inputs, state64)
    return inputs


# -- gram and style_loss -------------------------------------------------------------------

GRAM_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 17, 3, 3), (2, 40, 9, 11)]


def make_target(kind: str, n: int, c: int, device: str = "cpu", dtype=torch.float32, scale: float = 1.0):
    """An asymmetric target: "shared" (C, C), a transposed (non-contiguous) view, or "batched" (N, C, C).

    Centred at -2 * scale, away from the Gram matrices of the test inputs, so that G - T does not
    cancel (a loss near 0 would be ill-conditioned in any precision)."""
    if kind == "shared":
        t = make_input((1, 1, c, c), torch.float64, scale=scale, offset=-2 * scale)[0, 0].t()
    else:
        t = make_input((n, c, c, 1), torch.float64, scale=scale, offset=-2 * scale)[..., 0]
    return t.to(device=device, dtype=dtype)


def _gram_inputs(shape, dtype, device, layout, variant):
    return Inputs({"x": make_input(shape, dtype, device, layout, scale=2.0, offset=0.5)}, ("x",))


def _style_inputs(shape, dtype, device, layout, variant):
    x = make_input(shape, dtype, device, layout, scale=2.0, offset=0.5)
    target = make_target(variant["target"], shape[0], shape[1], device, param_dtype(dtype))
    return Inputs({"x": x, "target": target}, ("x", "target"))


def _gram_opchecks(backend, device):
    x = make_input((2, 3, 4, 5), F32, device).requires_grad_(True)
    dg = make_input((2, 3, 3, 1), F32, device)[..., 0]
    x_cl = x.detach().contiguous(memory_format=torch.channels_last)
    return [(torch.ops.fastperc.gram.default, (x, backend), None),
            (torch.ops.fastperc.gram_backward.default, (dg, x_cl, backend), None)]


def _style_opchecks(backend, device):
    x = make_input((2, 3, 4, 5), F32, device, "channels_last").requires_grad_(True)
    t = make_target("batched", 2, 3, device)
    _, gram = torch.ops.fastperc.style_loss(x.detach(), t, backend)
    g = torch.tensor(0.5, device=device)
    return [(torch.ops.fastperc.style_loss.default, (x, t, backend), None),
            (torch.ops.fastperc.style_loss_backward.default, (g, x.detach(), t, gram, backend), None)]


GRAM = OpEntry(
    name="gram",
    make=_gram_inputs,
    oracle=reference.gram,
    oracle_backward=lambda kw, g: {"x": reference.gram_backward(g, kw["x"])},
    cases=cases(GRAM_SHAPES, [{}]),
    returns_loss=False,
    gradcheck_shape=(2, 3, 2, 3),
    gradcheck_variants=({},),
    small_shape=(2, 3, 6, 5),
    compile_variants=({},),
    opchecks=_gram_opchecks,
    reference_shapes=((2, 5, 3, 4),),
    bad_inputs=(
        pytest.param((torch.randn(3, 4, 5),), {}, ValueError,
                     r"x: expected a 4-D tensor \(N, C, H, W\), got shape \(3, 4, 5\)", id="3d"),
        pytest.param((torch.randn(0, 3, 4, 5),), {}, ValueError, "x: expected a non-empty", id="empty"),
        pytest.param((torch.ones(1, 3, 4, 5, dtype=torch.int32),), {}, TypeError, "x: expected a floating-point",
                     id="int"),
        pytest.param((torch.ones(1, 3, 4, 5, dtype=torch.bool),), {}, TypeError, "x: expected a floating-point",
                     id="bool"),
        pytest.param(("x",), {}, TypeError, "x: expected a torch.Tensor, got str", id="str"),
    ),
)

STYLE_LOSS = OpEntry(
    name="style_loss",
    make=_style_inputs,
    oracle=reference.style_loss,
    oracle_backward=lambda kw, g: {"x": reference.style_loss_backward(g, kw["x"], kw["target"])},
    cases=cases(GRAM_SHAPES, [{"target": "shared"}, {"target": "batched"}]),
    returns_loss=True,
    gradcheck_shape=(2, 3, 2, 3),
    gradcheck_variants=({"target": "shared"},),
    small_shape=(2, 3, 6, 5),
    compile_variants=({"target": "shared"},),
    opchecks=_style_opchecks,
    reference_shapes=((2, 5, 3, 4),),
    bad_inputs=(
        pytest.param((torch.randn(3, 4, 5), torch.randn(3, 3)), {}, ValueError, "x: expected a 4-D tensor",
                     id="3d"),
        pytest.param((torch.randn(2, 3, 4, 5), torch.randn(4, 4)), {}, ValueError,
                     r"target: expected shape \(3, 3\) or \(2, 3, 3\) for x of shape \(2, 3, 4, 5\), got \(4, 4\)",
                     id="target-size"),
        pytest.param((torch.randn(2, 3, 4, 5), torch.randn(1, 3, 3)), {}, ValueError,
                     r"target: expected shape .*got \(1, 3, 3\)", id="target-batch"),
        pytest.param((torch.randn(2, 3, 4, 5), torch.randn(3)), {}, ValueError,
                     "target: expected a 2-D or 3-D tensor", id="target-1d"),
        pytest.param((torch.randn(2, 3, 4, 5), torch.randn(2, 1, 3, 3)), {}, ValueError,
                     "target: expected a 2-D or 3-D tensor", id="target-4d"),
        pytest.param((torch.randn(2, 3, 4, 5), torch.ones(3, 3, dtype=torch.int64)), {}, TypeError,
                     "target: expected a floating-point", id="target-int"),
        pytest.param((torch.ones(2, 3, 4, 5, dtype=torch.bool), torch.randn(3, 3)), {}, TypeError,
                     "x: expected a floating-point", id="bool"),
        pytest.param((torch.randn(2, 3, 4, 5), torch.randn(3, 3, device="meta")), {}, ValueError,
                     "target: expected a tensor on x's device cpu, got meta", id="target-device"),
        pytest.param((torch.randn(2, 3, 4, 5), [[1.0]]), {}, TypeError,
                     "target: expected a torch.Tensor, got list", id="target-list"),
    ),
)


# -- feature_loss ----------------------------------------------------------------------------


def _feature_inputs(shape, dtype, device, layout, variant):
    a = make_input(shape, dtype, device, layout, scale=3.0)
    b = make_input(shape, dtype, device, "contiguous", offset=0.5)
    return Inputs({"a": a, "b": b}, ("a", "b"))


def _feature_backward(kw, g):
    da = reference.feature_loss_backward(g, kw["a"], kw["b"])
    return {"a": da, "b": -da}


def _feature_opchecks(backend, device):
    a = make_input((2, 3, 4, 5), F32, device).requires_grad_(True)
    b = make_input((2, 3, 4, 5), F32, device)
    g = torch.tensor(0.5, device=device)
    return [(torch.ops.fastperc.feature_loss.default, (a, b, backend), None),
            (torch.ops.fastperc.feature_loss_backward.default, (g, a.detach(), b, backend), None)]


FEATURE_LOSS = OpEntry(
    name="feature_loss",
    make=_feature_inputs,
    oracle=reference.feature_loss,
    oracle_backward=_feature_backward,
    cases=cases([(2, 3, 5, 7), (1, 1, 1, 1), (1, 64, 9, 11), (3, 5, 67, 13)], [{}]),
    returns_loss=True,
    gradcheck_shape=(2, 3, 4, 5),
    gradcheck_variants=({},),
    gradcheck_fast_on=(),  # one launch each way: the whole Jacobian even in the interpreter
    small_shape=(2, 3, 6, 5),
    compile_variants=({},),
    opchecks=_feature_opchecks,
    reference_shapes=((2, 3, 4, 5),),
    # Under autocast a bf16 a and a float32 b are promoted to float32, as F.mse_loss does.
    autocast_computes_in=torch.float32,
    bad_inputs=(
        pytest.param((torch.randn(3, 4, 5), torch.randn(3, 4, 5)), {}, ValueError, "a: expected a 4-D tensor",
                     id="3d"),
        pytest.param((torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 6)), {}, ValueError,
                     r"b: expected the shape of a \(1, 3, 4, 5\)", id="shapes"),
        pytest.param((torch.ones(1, 3, 4, 5, dtype=torch.int64), torch.randn(1, 3, 4, 5)), {}, TypeError,
                     "a: expected a floating-point", id="int"),
        pytest.param((torch.randn(1, 3, 4, 5), torch.ones(1, 3, 4, 5, dtype=torch.bool)), {}, TypeError,
                     "b: expected a floating-point", id="bool"),
        pytest.param((torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5, dtype=torch.float64)), {}, TypeError,
                     "b: expected the dtype of a", id="dtypes"),
        pytest.param((torch.randn(0, 3, 4, 5), torch.randn(0, 3, 4, 5)), {}, ValueError,
                     "a: expected a non-empty", id="empty"),
        pytest.param(([1.0], torch.randn(1, 3, 4, 5)), {}, TypeError, "a: expected a torch.Tensor, got list",
                     id="list"),
    ),
)


# -- tv_loss ---------------------------------------------------------------------------------

# H = 1, W = 1, H = W = 1 (no neighbours at all), sizes not multiples of any block, C = 1.
TV_SHAPES = [(2, 3, 5, 7), (1, 3, 1, 6), (1, 3, 6, 1), (2, 2, 1, 1), (2, 3, 17, 19), (1, 1, 9, 8)]
# Several row blocks and column blocks of the Triton tiles in both memory formats.
TV_LARGE = (1, 2, 9, 520)
TV_VARIANTS = [{"p": p, "reduction": r} for p in (1, 2) for r in ("none", "sum", "mean")]


def _tv_inputs(shape, dtype, device, layout, variant):
    x = make_input(shape, dtype, device, layout, scale=2.0, offset=0.5)
    return Inputs({"x": x, "p": variant["p"], "reduction": variant["reduction"]}, ("x",))


def _tv_opchecks(backend, device):
    x = make_input((2, 3, 4, 5), F32, device, "channels_last").requires_grad_(True)
    g = make_input((2,), F32, device)
    op = torch.ops.fastperc.tv_loss.default
    return [(op, (x, 2, "none", backend), None), (op, (x, 1, "mean", backend), None),
            (torch.ops.fastperc.tv_loss_backward.default, (g, x.detach(), 1, "none", backend), None)]


TV_LOSS = OpEntry(
    name="tv_loss",
    make=_tv_inputs,
    oracle=reference.tv_loss,
    oracle_backward=lambda kw, g: {"x": reference.tv_loss_backward(g, kw["x"], kw["p"], kw["reduction"])},
    # reduction "none", with a distinct gradient per image, is the general case of the scale.
    cases=(cases(TV_SHAPES, [v for v in TV_VARIANTS if v["reduction"] == "none"])
           + cases([(2, 2, 5, 7)], [v for v in TV_VARIANTS if v["reduction"] != "none"])
           + cases([TV_LARGE], [{"p": 1, "reduction": "mean"}, {"p": 2, "reduction": "none"}], TWO_LAYOUTS)),
    returns_loss=True,
    gradcheck_shape=(2, 2, 3, 4),
    gradcheck_variants=tuple(TV_VARIANTS),
    small_shape=(2, 3, 6, 5),
    compile_variants=({"p": 2, "reduction": "mean"}, {"p": 1, "reduction": "none"}),
    opchecks=_tv_opchecks,
    reference_shapes=((2, 3, 5, 7), (2, 3, 1, 6), (3, 2, 6, 1), (1, 2, 1, 1)),
    backends=("reference", "torch", "triton", "cuda"),
    oracle_backward_keeps_layout=True,
    bad_inputs=tuple(pytest.param((x,), kwargs, error, match, id=name) for name, x, kwargs, error, match in [
        ("3d", torch.randn(3, 4, 5), {}, ValueError, r"x: expected a 4-D tensor \(N, C, H, W\), got shape \(3, 4, 5\)"),
        ("5d", torch.randn(1, 2, 3, 4, 5), {}, ValueError, "x: expected a 4-D tensor"),
        ("empty", torch.randn(0, 3, 4, 5), {}, ValueError, "x: expected a non-empty"),
        ("int", torch.ones(1, 3, 4, 5, dtype=torch.int64), {}, TypeError,
         "x: expected a floating-point tensor .* got dtype torch.int64"),
        ("bool", torch.ones(1, 3, 4, 5, dtype=torch.bool), {}, TypeError,
         "x: expected a floating-point tensor .* got dtype torch.bool"),
        ("list", [[1.0]], {}, TypeError, "x: expected a torch.Tensor, got list"),
        ("p3", torch.randn(1, 3, 4, 5), {"p": 3}, ValueError, r"p: expected the int 1 or 2, got 3 \(int\)"),
        ("p0", torch.randn(1, 3, 4, 5), {"p": 0}, ValueError, "p: expected the int 1 or 2, got 0"),
        ("p-bool", torch.randn(1, 3, 4, 5), {"p": True}, ValueError, r"p: expected the int 1 or 2, got True \(bool\)"),
        ("p-float", torch.randn(1, 3, 4, 5), {"p": 2.0}, ValueError,
         r"p: expected the int 1 or 2, got 2.0 \(float\)"),
        ("p-str", torch.randn(1, 3, 4, 5), {"p": "2"}, ValueError, "p: expected the int 1 or 2, got '2'"),
        ("reduction", torch.randn(1, 3, 4, 5), {"reduction": "avg"}, ValueError,
         r"reduction: expected one of \['none', 'sum', 'mean'\], got 'avg'"),
        ("reduction-none", torch.randn(1, 3, 4, 5), {"reduction": None}, ValueError,
         "reduction: expected one of .* got None"),
        ("backend", torch.randn(1, 3, 4, 5), {"backend": "tpu"}, ValueError,
         "backend: expected one of the available backends"),
    ]),
)


# -- instance_norm and batch_norm ------------------------------------------------------------


def channel_vector(c: int, device, dtype=torch.float32, seed: int = 0, scale: float = 0.5, offset: float = 1.0):
    """offset + scale * N(0, 1) of shape (C,), from its own seeded generator: γ, β, running statistics."""
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(c, generator=g, dtype=torch.float64)).to(device, dtype)


def running_stats(c: int, device, dtype=torch.float32):
    """(running_mean, running_var): means near 0.2, variances near 1.5."""
    return channel_vector(c, device, dtype, seed=2, offset=0.2), channel_vector(c, device, dtype, seed=3, scale=0.2,
                                                                                offset=1.5)


def _norm_tensors(shape, dtype, device, layout, variant, bias_offset: float):
    """x, weight, bias, residual of a norm's variant (relu, residual, affine; scale and offset of x)."""
    c = shape[1]
    x = make_input(shape, dtype, device, layout, scale=variant.get("scale", 2.0), offset=variant.get("offset", 0.5))
    kwargs = {"x": x, "weight": None, "bias": None}
    if variant["affine"]:
        kwargs["weight"] = channel_vector(c, device, param_dtype(dtype))
        kwargs["bias"] = channel_vector(c, device, param_dtype(dtype), seed=1, offset=bias_offset)
    kwargs["relu"] = variant["relu"]
    kwargs["residual"] = make_input(shape, dtype, device) if variant["residual"] else None
    leaves = tuple(n for n in ("x", "weight", "bias", "residual") if kwargs[n] is not None)
    return kwargs, leaves


def _instance_norm_inputs(shape, dtype, device, layout, variant):
    return Inputs(*_norm_tensors(shape, dtype, device, layout, variant, bias_offset=0.1))


def _batch_norm_inputs(shape, dtype, device, layout, variant):
    kwargs, leaves = _norm_tensors(shape, dtype, device, layout, variant, bias_offset=0.1)
    kwargs["running_mean"], kwargs["running_var"] = running_stats(shape[1], device, param_dtype(dtype))
    kwargs["training"] = variant["training"]
    kwargs["momentum"] = variant.get("momentum", 0.1)
    return Inputs(kwargs, leaves, state=("running_mean", "running_var"))


def _norm_grads(kw, dx, dw, db):
    grads = {"x": dx}
    if kw["weight"] is not None:
        grads.update(weight=dw, bias=db)
    return grads


def _instance_norm_backward(kw, g):
    _, mean, rstd = reference.instance_norm_forward(kw["x"], kw["weight"], kw["bias"], kw["residual"], 1e-5,
                                                    kw["relu"])
    return _norm_grads(kw, *reference.instance_norm_backward(g, kw["x"], kw["weight"], kw["bias"], mean, rstd,
                                                             kw["relu"]))


def _batch_norm_backward(kw, g):
    x, w, b, relu, training = kw["x"], kw["weight"], kw["bias"], kw["relu"], kw["training"]
    _, mean, var = reference.batch_norm_forward(x, w, b, kw["residual"], kw["running_mean"], kw["running_var"],
                                                training, 1e-5, relu)
    return _norm_grads(kw, *reference.batch_norm_backward(g, x, w, b, mean, var, training, 1e-5, relu))


def _instance_norm_opchecks(backend, device):
    x = make_input((2, 3, 4, 5), F32, device, "channels_last").requires_grad_(True)
    w = channel_vector(3, device).requires_grad_(True)
    r = make_input((2, 3, 4, 5), F32, device).requires_grad_(True)
    args = (x, w, None, r, 1e-5, True, backend)
    y, mean, rstd = torch.ops.fastperc.instance_norm(*args)
    return [(torch.ops.fastperc.instance_norm.default, args, None),
            (torch.ops.fastperc.instance_norm_backward.default,
             (torch.randn_like(y), x.detach(), w.detach(), None, mean, rstd, True, backend),
             ("test_schema", "test_faketensor"))]


def _batch_norm_opchecks(backend, device):
    x = make_input((2, 3, 4, 5), F32, device, "channels_last").requires_grad_(True)
    w = channel_vector(3, device).requires_grad_(True)
    b = channel_vector(3, device, seed=1).requires_grad_(True)
    rm, rv = running_stats(3, device)
    op = torch.ops.fastperc.batch_norm.default
    y, mean, var = op(x, w, b, None, None, None, True, 1e-5, True, backend)
    return [(op, (x, w, b, None, None, None, True, 1e-5, True, backend), None),
            (op, (x, w, None, None, rm, rv, False, 1e-5, False, backend), ("test_schema", "test_faketensor")),
            (torch.ops.fastperc.batch_norm_backward.default,
             (torch.randn_like(y), x.detach(), w.detach(), b.detach(), mean, var, True, 1e-5, True, backend),
             ("test_schema", "test_faketensor"))]


IN_FLAGS = [{"relu": relu, "residual": res, "affine": affine}
            for affine in (True, False) for relu in (False, True) for res in (False, True)]
IN_ALL = {"relu": True, "residual": True, "affine": True}
# Odd sizes: batch 1, one channel, one row or column (H·W = 2 would make dx ≈ 0, all
# cancellation), sizes off the power-of-two tiles, more channels than a channels_last tile, a
# row longer than a tile.
IN_ODD_SHAPES = [(1, 1, 3, 1), (2, 3, 1, 7), (1, 5, 17, 19), (2, 37, 3, 5), (1, 2, 37, 41)]
_X = torch.randn(2, 3, 4, 5)

INSTANCE_NORM = OpEntry(
    name="instance_norm",
    make=_instance_norm_inputs,
    oracle=reference.instance_norm,
    oracle_backward=_instance_norm_backward,
    # Every flag in every layout in float32; all flags in every dtype; all flags on odd shapes.
    cases=(cases([(2, 3, 5, 7)], IN_FLAGS, LAYOUTS, F32)
           + cases([(2, 4, 9, 6)], [IN_ALL], TWO_LAYOUTS)
           + cases(IN_ODD_SHAPES, [IN_ALL], TWO_LAYOUTS, F32)),
    returns_loss=False,
    gradcheck_shape=(2, 3, 4, 3),
    gradcheck_variants=(IN_ALL,),
    small_shape=(2, 3, 6, 5),
    compile_variants=(IN_ALL,),
    opchecks=_instance_norm_opchecks,
    reference_shapes=((2, 3, 5, 4),),
    autocast_rounds=("residual",),  # a residual of another dtype is cast to x's, as the add would
    backends=("reference", "torch", "triton", "cuda"),
    oracle_backward_keeps_layout=True,
    bad_inputs=tuple(pytest.param(args, kwargs, error, match, id=name) for name, args, kwargs, error, match in [
        ("3d", (torch.randn(3, 4, 5),), {}, ValueError, r"x: expected a 4-D tensor"),
        ("int", (torch.ones(2, 3, 4, 5, dtype=torch.int32),), {}, TypeError, "x: expected a floating-point"),
        ("weight-size", (_X, torch.randn(4)), {}, ValueError, r"weight: expected shape \(3,\).*got \(4,\)"),
        ("bias-size", (_X, None, torch.randn(2)), {}, ValueError, r"bias: expected shape \(3,\).*got \(2,\)"),
        ("weight-2d", (_X, torch.randn(3, 1)), {}, ValueError,
         r"weight: expected shape \(3,\) or \(2, 3\).*got \(3, 1\)"),
        ("residual-shape", (_X,), {"residual": torch.randn(2, 3, 4, 6)}, ValueError,
         r"residual: expected the shape of x"),
        ("residual-dtype", (_X,), {"residual": torch.randn(2, 3, 4, 5, dtype=torch.float64)}, TypeError,
         "residual: expected the dtype of x"),
        ("eps0", (_X, None, None, 0.0), {}, ValueError, "eps: expected a finite number > 0, got 0.0"),
        ("eps-negative", (_X, None, None, -1e-5), {}, ValueError, "eps: expected a finite number > 0"),
        ("eps-nan", (_X, None, None, float("nan")), {}, ValueError, "eps: expected a finite number > 0"),
        ("relu-int", (_X,), {"relu": 1}, TypeError, "relu: expected a bool"),
        ("one-pixel", (torch.randn(2, 3, 1, 1),), {}, ValueError, "x: expected more than 1 spatial element"),
        ("empty", (torch.randn(0, 3, 4, 5),), {}, ValueError, "x: expected a non-empty"),
    ]),
)

BN_FLAGS = [{"relu": relu, "residual": res, "training": training, "affine": True}
            for training in (True, False) for relu in (False, True) for res in (False, True)]
BN_ALL = {"relu": True, "residual": True, "training": True, "affine": True}
BN_NO_AFFINE = {"relu": True, "residual": False, "training": True, "affine": False}
# (shape, training): one value per channel in eval mode, a single row, many channels, a long row.
BN_ODD_SHAPES = [((3, 1, 1, 1), True), ((1, 5, 1, 1), False), ((1, 2, 1, 9), True), ((3, 37, 5, 3), True),
                 ((2, 2, 33, 35), True)]
_RM, _RV = torch.zeros(3), torch.ones(3)

BATCH_NORM = OpEntry(
    name="batch_norm",
    make=_batch_norm_inputs,
    oracle=reference.batch_norm,
    oracle_backward=_batch_norm_backward,
    cases=(cases([(2, 3, 5, 7)], BN_FLAGS, LAYOUTS, F32)
           + cases([(3, 4, 7, 6)], [BN_ALL], TWO_LAYOUTS)
           + sum((cases([shape], [dict(BN_ALL, training=training)], TWO_LAYOUTS, F32)
                  for shape, training in BN_ODD_SHAPES), ())
           + cases([(2, 3, 4, 5)], [BN_NO_AFFINE], ["channels_last"], F32)),
    returns_loss=False,
    gradcheck_shape=(3, 3, 2, 3),
    gradcheck_variants=(BN_ALL, dict(BN_ALL, training=False)),
    small_shape=(2, 3, 6, 5),
    compile_variants=(dict(BN_ALL, momentum=0.25),),
    opchecks=_batch_norm_opchecks,
    reference_shapes=((3, 3, 5, 4),),
    autocast_rounds=("residual",),
    backends=("reference", "torch", "triton", "cuda"),
    oracle_backward_keeps_layout=True,
    bad_inputs=tuple(pytest.param(args, kwargs, error, match, id=name) for name, args, kwargs, error, match in [
        ("3d", (torch.randn(2, 3, 4),), {}, ValueError, r"x: expected a 4-D tensor"),
        ("int", (torch.ones(2, 3, 4, 5, dtype=torch.int64),), {}, TypeError, "x: expected a floating-point"),
        ("weight-size", (_X, torch.randn(4)), {}, ValueError, r"weight: expected shape \(3,\)"),
        ("bias-size", (_X, None, torch.randn(2)), {}, ValueError, r"bias: expected shape \(3,\)"),
        ("running-size", (_X, None, None, torch.zeros(4), torch.ones(4)), {}, ValueError,
         r"running_mean: expected shape \(3,\)"),
        ("running-one", (_X, None, None, _RM), {}, ValueError, "running_mean, running_var: expected both or neither"),
        ("eval-without-running", (_X, None, None, None, None, False), {}, ValueError,
         "required when training=False"),
        ("residual-shape", (_X,), {"residual": torch.randn(2, 3, 5, 4)}, ValueError,
         "residual: expected the shape of x"),
        ("eps0", (_X,), {"eps": 0.0}, ValueError, "eps: expected a finite number > 0"),
        ("eps-negative", (_X,), {"eps": -1.0}, ValueError, "eps: expected a finite number > 0"),
        ("momentum-none", (_X, None, None, _RM, _RV, True, None), {}, ValueError,
         "momentum: None .* use fastperc.nn.BatchNorm2d"),
        ("momentum-range", (_X, None, None, _RM, _RV, True, 1.5), {}, ValueError,
         r"momentum: expected a number in \[0, 1\]"),
        ("training-int", (_X,), {"training": 1}, TypeError, "training: expected a bool"),
        ("one-value", (torch.randn(1, 3, 1, 1),), {}, ValueError,
         "expected more than 1 value per channel when training"),
    ]),
)


# -- upsample_conv2d and conv_transpose2d ------------------------------------------------------


@dataclass(frozen=True)
class ConvOp:
    """One of the two upsampling convolutions: its plain torch.nn.functional definition (the
    oracle) and where its weight keeps the input and output channels."""
    name: str
    definition: Callable  # (x, weight, bias) -> y, the plain F.* composition
    in_dim: int  # the weight dimension of the input channels
    out_dim: int

    @property
    def fn(self) -> Callable:
        return getattr(fastperc, self.name)

    @property
    def forward_op(self):
        return getattr(torch.ops.fastperc, self.name).default

    @property
    def backward_op(self):
        return getattr(torch.ops.fastperc, f"{self.name}_backward").default

    def weight_shape(self, c_in: int, c_out: int) -> tuple[int, int, int, int]:
        shape = [0, 0, 3, 3]
        shape[self.in_dim], shape[self.out_dim] = c_in, c_out
        return tuple(shape)

    def inputs(self, shape, dtype=torch.float32, device="cpu", layout="contiguous", bias=True):
        """shape (N, C_in, C_out, H, W) -> x, weight, bias (or None), of a realistic scale."""
        n, c_in, c_out, h, w = shape
        x = make_input((n, c_in, h, w), dtype, device, layout)
        weight = make_input(self.weight_shape(c_in, c_out), dtype, device, scale=(9 * c_in) ** -0.5)
        b = make_input((c_out,), dtype, device) if bias else None
        return x, weight, b


def _upsample_definition(x, weight, bias=None):
    return F.conv2d(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (1, 1, 1, 1), mode="reflect"),
                    weight, bias)


def _transpose_definition(x, weight, bias=None):
    return F.conv_transpose2d(x, weight, bias, stride=2, padding=1, output_padding=1)


UPSAMPLE = ConvOp("upsample_conv2d", _upsample_definition, in_dim=1, out_dim=0)
TRANSPOSE = ConvOp("conv_transpose2d", _transpose_definition, in_dim=0, out_dim=1)

# (N, C_in, C_out, H, W): H or W = 1, 2, odd; C = 1; C_in != C_out; channel counts past a
# block of 16; a large C_in.
CONV_SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 3, 5, 1, 1),
    (1, 4, 3, 1, 2),
    (2, 3, 5, 2, 1),
    (1, 5, 4, 3, 5),
    (2, 17, 20, 4, 3),
    (1, 3, 2, 9, 7),
    (1, 64, 8, 3, 2),
]
# Every shape in every layout, the bias alternating.
CONV_CASES = tuple(Case(shape, {"bias": (k + m) % 2 == 0}, layout)
                   for k, shape in enumerate(CONV_SHAPES) for m, layout in enumerate(LAYOUTS))
# The interpreted Triton kernels are slow: a chosen set that still covers every shape feature,
# both dtypes, every layout and both bias settings.
CONV_INTERPRETED_CASES = tuple(Case(shape, {"bias": bias}, layout, dtype) for shape, dtype, layout, bias in [
    ((1, 1, 1, 1, 1), torch.float32, "contiguous", True),
    ((1, 4, 3, 1, 2), torch.float32, "noncontiguous", True),
    ((2, 3, 5, 2, 1), torch.float32, "contiguous", False),
    ((1, 5, 4, 3, 5), torch.float32, "channels_last", False),
    ((1, 3, 2, 9, 7), torch.float32, "noncontiguous", True),
    ((1, 64, 8, 3, 2), torch.float32, "channels_last", True),
    ((2, 3, 5, 1, 1), torch.float16, "channels_last", True),
    ((2, 17, 20, 4, 3), torch.float16, "noncontiguous", False),
])


def _conv_opchecks(op: ConvOp):
    """opcheck of the forward op (with and without a bias) and of the backward op (all
    gradients, and one alone); the interpreted kernels, slow, on fewer and smaller calls
    (the layouts the op promises are the op layer's, whichever backend ran)."""

    def opchecks(backend, device):
        slow = interpreted(backend, device)
        shape = (1, 2, 3, 1, 2) if slow else (1, 2, 3, 2, 3)
        x, weight, b = op.inputs(shape, torch.float32, device)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        calls = []
        for x_in, bias in (((x_cl, None),) if slow else ((x, b), (x_cl, None))):
            args = (x_in.detach().requires_grad_(True), weight.detach().requires_grad_(True),
                    None if bias is None else bias.detach().requires_grad_(True), backend)
            calls.append((op.forward_op, args, None))
        n, _, c_out, h, w = shape
        grad = make_input((n, c_out, 2 * h, 2 * w), torch.float32, device, "channels_last")
        for mask in ((False, True, True),) if slow else ((True, True, True), (False, True, False)):
            calls.append((op.backward_op, (grad, x_cl.detach(), weight.detach(), backend, *mask), None))
        return calls

    return opchecks


def _conv_bad_inputs(op: ConvOp) -> tuple:
    x = torch.randn(1, 3, 4, 5)
    w = torch.randn(op.weight_shape(3, 2))
    b = torch.randn(2)
    w5 = torch.randn(op.weight_shape(3, 2)[:2] + (5, 5))
    w_wrong_in = torch.randn(op.weight_shape(4, 2))
    return tuple(pytest.param(args, {}, error, match, id=name) for name, args, error, match in [
        ("3d-input", (torch.randn(3, 4, 5), w, b), ValueError, "x: expected a 4-D tensor"),
        ("5x5-kernel", (x, w5, b), ValueError, "weight: expected a 3x3 kernel"),
        ("3x2-kernel", (x, w[..., :2], b), ValueError, "weight: expected a 3x3 kernel"),
        ("channels", (x, w_wrong_in, b), ValueError, "weight: expected 3 input channels"),
        ("3d-weight", (x, w[0], b), ValueError, "weight: expected a 4-D tensor"),
        ("bias-size", (x, w, torch.randn(3)), ValueError, r"bias: expected shape \(2,\)"),
        ("bias-rank", (x, w, torch.randn(1, 2)), ValueError, "bias: expected a 1-D tensor"),
        ("weight-dtype", (x, w.double(), b), TypeError, "weight: expected the dtype of x"),
        ("bias-dtype", (x, w, b.double()), TypeError, "bias: expected the dtype of x"),
        ("int-input", (x.long(), w, b), TypeError, "x: expected a floating-point"),
        ("list-input", ([1.0], w, b), TypeError, "x: expected a torch.Tensor"),
        ("empty", (torch.randn(0, 3, 4, 5), w, b), ValueError, "x: expected a non-empty"),
    ])


def _conv_entry(op: ConvOp) -> OpEntry:
    def make(shape, dtype, device, layout, variant):
        x, weight, bias = op.inputs(shape, dtype, device, layout, variant["bias"])
        return Inputs({"x": x, "weight": weight, "bias": bias}, ("x", "weight", "bias")[:3 if bias is not None else 2])

    explicit = getattr(reference, f"{op.name}_backward")

    def oracle_backward(kw, g):
        has_bias = kw["bias"] is not None
        dx, dw, db = explicit(g, kw["x"], kw["weight"], True, True, has_bias)
        return {"x": dx, "weight": dw, **({"bias": db} if has_bias else {})}

    return OpEntry(
        name=op.name,
        make=make,
        oracle=op.definition,
        oracle_backward=oracle_backward,
        cases=CONV_CASES,
        # The reference backend (the definition itself) on every other shape.
        cases_for={"reference": tuple(c for c in CONV_CASES if CONV_SHAPES.index(c.shape) % 2 == 0),
                   "triton-interpreter": CONV_INTERPRETED_CASES},
        returns_loss=False,
        gradcheck_shape=(1, 2, 2, 2, 1),
        gradcheck_variants=({"bias": True},),
        # the reference: slow, and its formulas are checked against autograd
        gradcheck_fast_on=("reference", "triton-interpreter"),
        small_shape=(2, 3, 4, 5, 3),
        compile_variants=({"bias": True},),
        opchecks=_conv_opchecks(op),
        reference_shapes=((2, 3, 4, 1, 1), (2, 3, 4, 1, 4), (2, 3, 4, 3, 2), (2, 3, 4, 5, 3)),
        autocast_rounds=("weight", "bias"),  # every float input in the autocast dtype, as F.conv2d
        bad_inputs=_conv_bad_inputs(op),
    )


UPSAMPLE_CONV2D = _conv_entry(UPSAMPLE)
CONV_TRANSPOSE2D = _conv_entry(TRANSPOSE)

TABLE = (GRAM, STYLE_LOSS, FEATURE_LOSS, TV_LOSS, INSTANCE_NORM, BATCH_NORM, UPSAMPLE_CONV2D, CONV_TRANSPOSE2D)
ENTRIES = {entry.name: entry for entry in TABLE}
