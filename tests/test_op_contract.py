"""The op contract (DESIGN.md), checked for every entry of tests/op_table.py.

Over the table x the backends this machine runs (reference, torch, triton: in the interpreter
on a CPU-only machine; cuda where it is available and implements the op) x their dtypes x each
entry's cases (shapes, layouts, options): forward and backward against the float64 oracle.
Per entry: the oracle's explicit backward against autograd of the oracle in float64, gradcheck
in float64 and torch.library.opcheck on every backend, torch.compile(fullgraph=True) forward
and backward, CPU autocast, and the bad-input errors.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, dtypes_for, reference_grads
from op_table import (
    TABLE,
    assert_laid_out_like,
    assert_state,
    backend_devices,
    check_forward_backward,
    float64_state,
    oracle_call,
    upstream_gradient,
    variant_id,
)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _forward_backward_params() -> list:
    params = []
    for entry in TABLE:
        for backend, device in backend_devices(entry):
            for dtype in dtypes_for(backend, device):
                params += [pytest.param(entry, backend, device, dtype, case,
                                        id=f"{entry.name}-{backend}-{device}-{_name(dtype)}-{case.id}")
                           for case in entry.cases_of(backend, device) if case.dtype in (None, dtype)]
    return params


def _backend_params() -> list:
    return [pytest.param(entry, backend, device, id=f"{entry.name}-{backend}-{device}")
            for entry in TABLE for backend, device in backend_devices(entry)]


def _variant_params(attribute: str) -> list:
    return [pytest.param(entry, variant, id=f"{entry.name}-{variant_id(variant)}")
            for entry in TABLE for variant in getattr(entry, attribute)]


each_entry = pytest.mark.parametrize("entry", TABLE, ids=lambda e: e.name)


@pytest.mark.parametrize("entry,backend,device,dtype,case", _forward_backward_params())
def test_forward_backward(entry, backend, device, dtype, case):
    check_forward_backward(entry, backend, device, dtype, case)


@pytest.mark.parametrize("entry,shape,variant", [
    pytest.param(entry, shape, variant, id=f"{entry.name}-{'x'.join(map(str, shape))}-{variant_id(variant)}")
    for entry in TABLE for shape in entry.reference_shapes for variant in entry.variants])
def test_oracle_backward_matches_autograd(entry, shape, variant):
    """The explicit backward formulas (the reference backend's) equal autograd of the oracle,
    on channels_last inputs (where a formula that assumed NCHW strides would show)."""
    inputs = entry.make(shape, torch.float64, "cpu", "channels_last", variant)
    spec = oracle_call(entry, inputs, float64_state(inputs))
    leaves = [inputs.kwargs[n] for n in inputs.leaves]
    y = spec(*leaves)
    grad_out = upstream_gradient(y)
    _, want = reference_grads(spec, leaves, grad_out)
    got = entry.oracle_backward(inputs.kwargs, grad_out)
    assert inputs.image in got and set(got) <= set(inputs.leaves)
    for name, g in got.items():
        assert_close(g, want[inputs.leaves.index(name)], torch.float64, what=f"grad {name}")
    x = inputs.kwargs[inputs.image]
    if entry.oracle_backward_keeps_layout:
        assert got[inputs.image].stride() == x.stride()


@pytest.mark.parametrize("entry,backend,device", _backend_params())
def test_gradcheck_float64(entry, backend, device):
    """The whole Jacobian, or a random projection of it where the entry says so (the
    interpreted Triton kernels, slow, unless the entry says otherwise)."""
    for variant in entry.gradcheck_variants:
        inputs = entry.make(entry.gradcheck_shape, torch.float64, device, "contiguous", variant)
        names = inputs.leaves
        leaves = tuple(inputs.kwargs[n].requires_grad_(True) for n in names)

        def fn(*ts):
            return entry.fn(**{**inputs.kwargs, **dict(zip(names, ts))}, backend=backend)

        assert torch.autograd.gradcheck(fn, leaves, fast_mode=entry.gradcheck_fast(backend, device)), variant


@pytest.mark.parametrize("entry,backend,device", _backend_params())
def test_opcheck(entry, backend, device):
    for op, args, test_utils in entry.opchecks(backend, device):
        if test_utils is None:
            torch.library.opcheck(op, args)
        else:
            torch.library.opcheck(op, args, test_utils=test_utils)


def _with_leaves(inputs, tensors):
    return {**inputs.kwargs, **dict(zip(_tensor_names(inputs), tensors))}


def _tensor_names(inputs) -> list[str]:
    return [n for n, t in inputs.kwargs.items() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("entry,variant", _variant_params("compile_variants"))
def test_compile_fullgraph_forward_backward(entry, variant):
    """Through torch.compile(fullgraph=True) on the default backend, channels_last in: the
    output, its layout, the gradients and the updated state as the float64 oracle's."""
    inputs = entry.make(entry.small_shape, torch.float32, "cpu", "channels_last", variant)
    leaves = [inputs.kwargs[n].requires_grad_(True) for n in inputs.leaves]
    state64 = float64_state(inputs)
    spec = oracle_call(entry, inputs, state64)
    probe = oracle_call(entry, inputs, float64_state(inputs))(*[t.detach().double() for t in leaves])
    weight = upstream_gradient(probe.float())

    def step(*tensors):
        y = entry.fn(**_with_leaves(inputs, tensors))
        return y, (y * weight).sum()

    tensors = [inputs.kwargs[n] for n in _tensor_names(inputs)]
    torch._dynamo.reset()  # one code object, step, for every entry: not a recompilation each
    y, loss = torch.compile(step, fullgraph=True)(*tensors)
    grads = torch.autograd.grad(loss, leaves)
    ref, ref_grads = reference_grads(lambda *ts: (spec(*ts) * weight.double()).sum(), leaves)
    assert_close(y, probe, torch.float32, what=entry.name)
    assert_close(loss, ref, torch.float32, what="loss")
    if y.dim() == 4:
        assert_laid_out_like(y, inputs.kwargs[inputs.image], entry.name)
    for name, g, r in zip(inputs.leaves, grads, ref_grads):
        assert_close(g, r, torch.float32, what=f"grad {name}")
    assert_state(inputs, state64)


@each_entry
def test_autocast_bf16(entry):
    """Under CPU autocast the image input arrives in bf16 (from a conv), the others in float32:
    the op gives a float32 loss or a bf16 image, matching the oracle on the inputs as the op
    casts them, and the gradient flows back to the float32 leaf."""
    inputs = entry.make(entry.small_shape, torch.float32, "cpu", "contiguous", entry.compile_variants[0])
    image = inputs.image
    x = inputs.kwargs[image].requires_grad_(True)
    c = x.shape[1]
    state64 = float64_state(inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = F.conv2d(x, torch.eye(c).view(c, c, 1, 1))  # x rounded to bf16
        y = entry.fn(**{**inputs.kwargs, image: h})
    assert h.dtype == torch.bfloat16
    assert y.dtype == (torch.float32 if entry.returns_loss else torch.bfloat16)
    as_cast = {n: t.to(torch.bfloat16) if n in entry.autocast_rounds and t is not None else t
               for n, t in inputs.kwargs.items()}
    fixed = {n: t.detach().double() if isinstance(t, torch.Tensor) else t for n, t in as_cast.items()}
    ref = entry.oracle(**{**fixed, **state64, image: h.detach().double()})
    assert_close(y, ref, entry.autocast_computes_in, what=entry.name)
    assert_state(inputs, state64)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("entry,args,kwargs,error,match", [
    pytest.param(entry, *p.values, id=f"{entry.name}-{p.id}") for entry in TABLE for p in entry.bad_inputs])
def test_bad_inputs(entry, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        entry.fn(*args, **kwargs)

