"""Conditional instance norm: ``instance_norm`` with per-sample (N, C) weight and bias, on every
backend, against the float64 reference; and the Triton launchers' parallel finalize stages on
plans forced to odd numbers of partials.

The cuda backend's kernels are checked on a GPU by tests/test_cuda_kernels.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastperc
from fastperc import reference
from fastperc.nn import InstanceNorm2d, InstanceNormReLU
from helpers import assert_close, backend_device_params, make_input, needs_triton, reference_grads

# How weight and bias are given: per sample (N, C), per channel (C,), or absent; mixed too.
PARAMS = [("nc", "nc"), ("c", "nc"), ("nc", "c"), ("nc", None), (None, "nc")]
PARAM_IDS = [f"w-{w}-b-{b}" for w, b in PARAMS]


def _param(kind, n, c, device, *, seed, base=1.0, dtype=torch.float32):
    """A random (never constant) parameter of ``kind`` ("nc": (N, C), "c": (C,), None)."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    shape = (n, c) if kind == "nc" else (c,)
    return (base + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)


def _run(backend, shape, dtype, device, layout, w_kind, b_kind, relu, with_residual, *, weight=None, bias=None,
         scale=2.0, offset=0.5):
    """Forward and backward through the op -> (y, grads, ref, ref_grads, leaves)."""
    n, c = shape[:2]
    x = make_input(shape, dtype, device, layout, scale=scale, offset=offset).requires_grad_(True)
    w = _param(w_kind, n, c, device, seed=1) if weight is None else weight
    b = _param(b_kind, n, c, device, seed=2, base=0.0) if bias is None else bias
    r = make_input(shape, dtype, device, "contiguous") if with_residual else None
    leaves = [t.requires_grad_(True) for t in (x, w, b, r) if t is not None]
    dy = make_input(shape, dtype, device, "contiguous")
    y = fastperc.instance_norm(x, w, b, relu=relu, residual=r, backend=backend)
    grads = torch.autograd.grad(y, leaves, dy)

    def spec(*args):
        it = iter(args)
        x_ = next(it)
        w_ = next(it) if w is not None else None
        b_ = next(it) if b is not None else None
        r_ = next(it) if r is not None else None
        return reference.instance_norm(x_, w_, b_, relu=relu, residual=r_)

    ref, ref_grads = reference_grads(spec, leaves, dy)
    return y, grads, ref, ref_grads, leaves


def _check(y, grads, ref, ref_grads, leaves, dtype):
    assert y.dtype == leaves[0].dtype
    assert_close(y, ref, dtype, what="y")
    for i, (g, rg, leaf) in enumerate(zip(grads, ref_grads, leaves)):
        assert g.shape == leaf.shape, f"grad {i}: shape {tuple(g.shape)}, the input's {tuple(leaf.shape)}"
        assert_close(g, rg, dtype, what=f"grad {i}")


# -- the spec ------------------------------------------------------------------------------


def test_reference_matches_an_independent_formula():
    """γ[n, c] (x − μ[n, c]) / √(σ²[n, c] + ε) + β[n, c], from F.instance_norm and broadcasting."""
    x = make_input((3, 4, 5, 6), torch.float64, offset=2.0)
    w, b = _param("nc", 3, 4, "cpu", seed=1, dtype=torch.float64), _param("nc", 3, 4, "cpu", seed=2,
                                                                            dtype=torch.float64)
    r = make_input((3, 4, 5, 6), torch.float64)
    expected = torch.relu(F.instance_norm(x, eps=1e-5) * w[:, :, None, None] + b[:, :, None, None]) + r
    assert torch.allclose(reference.instance_norm(x, w, b, 1e-5, relu=True, residual=r), expected, rtol=1e-12)
    # Mixed: a (C,) weight and an (N, C) bias.
    expected = F.instance_norm(x, eps=1e-5) * w[0][None, :, None, None] + b[:, :, None, None]
    assert torch.allclose(reference.instance_norm(x, w[0], b, 1e-5), expected, rtol=1e-12)


@pytest.mark.parametrize("w_kind,b_kind", PARAMS, ids=PARAM_IDS)
@pytest.mark.parametrize("relu", [False, True])
def test_reference_backward_formula_matches_autograd(w_kind, b_kind, relu):
    shape = (2, 3, 5, 4)
    x = make_input(shape, torch.float64, scale=2.0)
    w = _param(w_kind, 2, 3, "cpu", seed=1, dtype=torch.float64)
    b = _param(b_kind, 2, 3, "cpu", seed=2, base=0.0, dtype=torch.float64)
    dy = make_input(shape, torch.float64)
    given = [t for t in (w, b) if t is not None]

    def fn(x, *params):
        it = iter(params)
        return reference.instance_norm(x, next(it) if w is not None else None, next(it) if b is not None else None,
                                       relu=relu)

    _, grads = reference_grads(fn, [x, *given], dy)
    _, mean, rstd = reference.instance_norm_forward(x, w, b, None, 1e-5, relu)
    dx, dw, db = reference.instance_norm_backward(dy, x, w, b, mean, rstd, relu)
    mine = [dx] + [g for g, p in ((dw, w), (db, b)) if p is not None]
    for got, want in zip(mine, grads):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


# -- every backend -------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("w_kind,b_kind", PARAMS, ids=PARAM_IDS)
@pytest.mark.parametrize("relu,with_residual", [(False, False), (True, True)], ids=["plain", "relu-res"])
def test_per_sample_params_match_the_reference(backend, device, layout, w_kind, b_kind, relu, with_residual):
    out = _run(backend, (3, 5, 6, 7), torch.float32, device, layout, w_kind, b_kind, relu, with_residual)
    _check(*out, torch.float32)


@pytest.mark.parametrize("backend,device,dtype", backend_device_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_per_sample_params_in_every_dtype(backend, device, dtype, layout):
    """Half-precision activations with float32 (N, C) parameters, as under autocast."""
    y, grads, ref, ref_grads, leaves = _run(backend, (2, 4, 9, 6), dtype, device, layout, "nc", "nc", True, True)
    _check(y, grads, ref, ref_grads, leaves, dtype)
    assert grads[1].dtype == torch.float32 and grads[1].shape == (2, 4)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_odd_shapes_with_per_sample_params(backend, device):
    """Batch 1, one channel, a row longer than a tile, channels beyond a channels_last tile."""
    for shape, layout in [((1, 1, 3, 5), "contiguous"), ((1, 2, 37, 41), "contiguous"),
                          ((2, 37, 3, 5), "channels_last"), ((5, 3, 1, 7), "channels_last")]:
        _check(*_run(backend, shape, torch.float32, device, layout, "nc", "nc", True, True), torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_non_contiguous_and_expanded_params(backend, device):
    """A transposed (C, N) view as the (N, C) weight, a (C,) bias expanded to (N, C) (stride 0):
    their gradients come back in the (N, C) shape given."""
    n, c = 3, 4
    w = _param("nc", c, n, device, seed=1).t()
    b = _param("c", n, c, device, seed=2, base=0.0).expand(n, c)
    assert not w.is_contiguous() and b.stride() == (0, 1)
    out = _run(backend, (n, c, 5, 6), torch.float32, device, "channels_last", "nc", "nc", True, False,
               weight=w.detach(), bias=b.detach())
    _check(*out, torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_equal_rows_are_the_per_channel_norm(backend, device):
    """(N, C) parameters whose rows are all γ, β give the (C,) result, and their gradients sum
    over the batch to the (C,) gradients."""
    shape = (3, 4, 6, 5)
    x = make_input(shape, torch.float32, device, "channels_last").requires_grad_(True)
    w, b = _param("c", 3, 4, device, seed=1), _param("c", 3, 4, device, seed=2, base=0.0)
    dy = make_input(shape, torch.float32, device)
    w_rows = w.expand(3, 4).clone().requires_grad_(True)
    b_rows = b.expand(3, 4).clone().requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    y_rows = fastperc.instance_norm(x, w_rows, b_rows, relu=True, backend=backend)
    g_rows = torch.autograd.grad(y_rows, [x, w_rows, b_rows], dy)
    y = fastperc.instance_norm(x, w, b, relu=True, backend=backend)
    g = torch.autograd.grad(y, [x, w, b], dy)
    assert_close(y_rows, y.double(), torch.float32)
    assert_close(g_rows[0], g[0].double(), torch.float32)
    assert_close(g_rows[1].sum(dim=0), g[1].double(), torch.float32)
    assert_close(g_rows[2].sum(dim=0), g[2].double(), torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_large_mean_with_per_sample_params(backend, device):
    """A mean of 1000 with a spread of 0.01 keeps float32 precision."""
    out = _run(backend, (2, 3, 33, 40), torch.float32, device, "contiguous", "nc", "nc", True, True,
               scale=0.01, offset=1000.0)
    _check(*out, torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_gradcheck_float64_with_per_sample_params(backend, device):
    x = make_input((2, 3, 4, 3), torch.float64, device, scale=2.0).requires_grad_(True)
    w = _param("nc", 2, 3, device, seed=1, dtype=torch.float64).requires_grad_(True)
    b = _param("c", 2, 3, device, seed=2, dtype=torch.float64).requires_grad_(True)
    r = make_input((2, 3, 4, 3), torch.float64, device).requires_grad_(True)

    def fn(x, w, b, r):
        return fastperc.instance_norm(x, w, b, relu=True, residual=r, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, b, r), fast_mode=backend == "triton")
    assert torch.autograd.gradcheck(lambda x, w, b: fastperc.instance_norm(x, b.expand(2, 3), w, backend=backend),
                                    (x, w, b), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_opcheck_with_per_sample_params(backend, device):
    x = make_input((2, 3, 4, 5), torch.float32, device, "channels_last").requires_grad_(True)
    w = _param("nc", 2, 3, device, seed=1).requires_grad_(True)
    b = _param("c", 2, 3, device, seed=2).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastperc.instance_norm.default, (x, w, b, None, 1e-5, True, backend))
    y, mean, rstd = torch.ops.fastperc.instance_norm(x, w, b, None, 1e-5, True, backend)
    torch.library.opcheck(torch.ops.fastperc.instance_norm_backward.default,
                          (torch.randn_like(y), x.detach(), w.detach(), b.detach(), mean, rstd, True, backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_with_per_sample_params():
    x = make_input((2, 3, 6, 5), layout="channels_last").requires_grad_(True)
    w = _param("nc", 2, 3, "cpu", seed=1).requires_grad_(True)
    b = _param("nc", 2, 3, "cpu", seed=2).requires_grad_(True)
    r = make_input((2, 3, 6, 5)).requires_grad_(True)

    def block(x, w, b, r):
        return fastperc.instance_norm(fastperc.instance_norm_relu(x, w, b), w, b, residual=r)

    y = torch.compile(block, fullgraph=True)(x, w, b, r)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w, b, r], dy)
    ref, ref_grads = reference_grads(
        lambda x, w, b, r: reference.instance_norm(reference.instance_norm(x, w, b, relu=True), w, b, residual=r),
        [x, w, b, r], dy)
    assert_close(y, ref, torch.float32)
    for g, rg in zip(grads, ref_grads):
        assert g.shape == rg.shape
        assert_close(g, rg, torch.float32)


def test_autocast_with_per_sample_params():
    x = make_input((2, 3, 4, 5), torch.float32, "cpu").requires_grad_(True)
    w = _param("nc", 2, 3, "cpu", seed=1).requires_grad_(True)
    b = _param("nc", 2, 3, "cpu", seed=2).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = F.conv2d(x, torch.eye(3).view(3, 3, 1, 1))  # bf16
        y = fastperc.instance_norm_relu(h, w, b)
    assert y.dtype == torch.bfloat16
    assert_close(y, reference.instance_norm(h.detach().double(), w.double(), b.double(), relu=True), torch.bfloat16)
    y.float().sum().backward()
    assert w.grad.shape == (2, 3) and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


_X = torch.randn(2, 3, 4, 5)


@pytest.mark.parametrize("weight,bias,match", [
    (torch.randn(3, 3), None, r"weight: expected shape \(3,\) or \(2, 3\) \(x has 2 samples of 3 channels\), "
                              r"got \(3, 3\)"),
    (torch.randn(1, 3), None, r"weight: expected shape \(3,\) or \(2, 3\).*got \(1, 3\)"),
    (None, torch.randn(3, 2), r"bias: expected shape \(3,\) or \(2, 3\).*got \(3, 2\)"),
    (None, torch.randn(2, 4), r"bias: expected shape \(3,\) or \(2, 3\).*got \(2, 4\)"),
    (torch.randn(2, 3, 1), None, r"weight: expected a 1-D or 2-D tensor, got shape \(2, 3, 1\)"),
    (torch.randn(3), torch.randn(2, 3, 1, 1), r"bias: expected a 1-D or 2-D tensor"),
])
def test_bad_param_shapes_name_the_parameter(weight, bias, match):
    with pytest.raises(ValueError, match=match):
        fastperc.instance_norm(_X, weight, bias)
    with pytest.raises(ValueError, match=match):
        fastperc.instance_norm_relu(_X, weight, bias)


def test_batch_norm_keeps_per_channel_params():
    with pytest.raises(ValueError, match=r"weight: expected a 1-D tensor, got shape \(2, 3\)"):
        fastperc.batch_norm(_X, torch.randn(2, 3), None)


# -- the module ----------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("cls", [InstanceNorm2d, InstanceNormReLU])
def test_module_takes_per_sample_params_in_forward(cls, fused):
    n, c = 3, 4
    module = cls(c, fused=fused)
    x = make_input((n, c, 6, 5), layout="channels_last").requires_grad_(True)
    skip = make_input((n, c, 6, 5))
    w, b = _param("nc", n, c, "cpu", seed=1).requires_grad_(True), _param("nc", n, c, "cpu", seed=2)
    y = module(x, skip, weight=w, bias=b)
    relu = cls is InstanceNormReLU
    ref = reference.instance_norm(x.detach().double(), w.detach().double(), b.double(), relu=relu,
                                  residual=skip.double())
    assert_close(y, ref, torch.float32)
    y.sum().backward()
    assert w.grad.shape == (n, c) and module.weight.grad is None  # the module's own γ was not used
    # One given, the other the module's own.
    with torch.no_grad():
        module.bias.copy_(torch.linspace(-1, 1, c))
    y = module(x, weight=w)
    ref = reference.instance_norm(x.detach().double(), w.detach().double(), module.bias.detach().double(), relu=relu)
    assert_close(y, ref, torch.float32)


# -- the Triton finalize stages on forced plans ----------------------------------------------


def _forced_plan(shape, channels_inner, per_sample, splits, finalize_tile=None):
    from fastperc.kernels import norm as kernels
    from fastperc.rules import device_facts

    n, c, h, w = shape
    return kernels.plan(n, c, h * w, channels_inner, device_facts(torch.device("cpu")), per_sample=per_sample,
                        splits=splits, finalize_tile=finalize_tile)


# (shape, channels_inner, forced splits, finalize tile) -> partials per statistic, P-tiles, G-tiles.
# Channels_last C = 16 in the interpreter: BLOCK_C 16, BLOCK_S 64, so S = 448 is 7 tiles.
FORCED = [
    pytest.param((2, 16, 14, 32), True, 1, None, id="1-part"),
    pytest.param((2, 16, 14, 32), True, 3, None, id="3-parts-unequal"),   # chunks 192, 192, 64
    pytest.param((2, 16, 14, 32), True, 7, None, id="7-parts"),
    pytest.param((2, 16, 32, 64), True, 32, 64, id="32-parts-in-4-part-tiles"),
    pytest.param((3, 5, 40, 60), False, 3, 8, id="3-parts-nchw-one-part-tiles"),  # BLOCK_S 1024, S 2400
]


@needs_triton
@pytest.mark.parametrize("per_sample", [True, False], ids=["instance", "batch"])
@pytest.mark.parametrize("shape,channels_inner,splits,finalize_tile", FORCED)
def test_finalize_merges_any_number_of_partials(shape, channels_inner, splits, finalize_tile, per_sample):
    from fastperc.kernels import norm as kernels

    n, c, h, w = shape
    pl = _forced_plan(shape, channels_inner, per_sample, splits, finalize_tile)
    assert pl.splits == splits and pl.parts == splits * (1 if per_sample else n)
    if finalize_tile is not None:  # the finalize walks several tiles of parts (and of rows)
        assert pl.finalize_p < pl.parts and pl.finalize_p * pl.finalize_c <= finalize_tile
        assert pl.finalize_g < pl.groups or not per_sample
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = make_input(shape, torch.float32, device, "channels_last" if channels_inner else "contiguous",
                   scale=2.0, offset=3.0)
    w = _param("nc" if per_sample else "c", n, c, device, seed=1)
    b = _param("c", n, c, device, seed=2, base=0.0)
    r = make_input(shape, torch.float32, device)
    dy = make_input(shape, torch.float32, device)
    x64, w64, b64, r64, dy64 = (t.double() for t in (x, w, b, r, dy))
    if per_sample:
        y, mean, stat = kernels.launch_forward(pl, x, w, b, r, 1e-5, True, None)
        ref = reference.instance_norm_forward(x64, w64, b64, r64, 1e-5, True)
        grads = kernels.launch_backward(pl, dy, x, w, b, mean, stat, 1.0, True, True, False)
        ref_grads = reference.instance_norm_backward(dy64, x64, w64, b64, ref[1], ref[2], True)
    else:
        y, mean, stat = kernels.launch_forward(pl, x, w, b, r, 1e-5, True, None)
        ref = reference.batch_norm_forward(x64, w64, b64, r64, None, None, True, 1e-5, True)
        grads = kernels.launch_backward(pl, dy, x, w, b, mean, stat, 1e-5, True, True, True)
        ref_grads = reference.batch_norm_backward(dy64, x64, w64, b64, ref[1], ref[2], True, 1e-5, True)
    assert_close(y, ref[0], torch.float32, what="y")
    assert_close(mean[0].double() + mean[1].double(), ref[1][0] + ref[1][1], torch.float32, tol=1e-7, what="mean")
    assert_close(stat, ref[2], torch.float32, what="rstd/var")
    for name, g, rg in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert g.shape == rg.shape, name
        assert_close(g, rg, torch.float32, what=name)
    # Deterministic: a rerun is bitwise equal.
    again = kernels.launch_forward(pl, x, w, b, r, 1e-5, True, None)
    assert all(torch.equal(a, b_) for a, b_ in zip((y, mean, stat), again))


@needs_triton
@pytest.mark.parametrize("per_sample", [True, False], ids=["instance", "batch"])
def test_finalize_keeps_a_large_mean_over_many_partials(per_sample):
    """Mean 1000, spread 0.01, merged from 32 partials per row (64 for batch norm) in tiles of 4."""
    from fastperc.kernels import norm as kernels

    shape = (2, 16, 32, 64)
    pl = _forced_plan(shape, True, per_sample, 32, 64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = make_input(shape, torch.float32, device, "channels_last", scale=0.01, offset=1000.0)
    y, mean, stat = kernels.launch_forward(pl, x, None, None, None, 1e-5, False, None)
    x64 = x.double()
    if per_sample:
        ref = reference.instance_norm_forward(x64, None, None, None, 1e-5, False)
    else:
        ref = reference.batch_norm_forward(x64, None, None, None, None, None, True, 1e-5, False)
    assert_close(y, ref[0], torch.float32, what="y")
    assert_close(stat, ref[2], torch.float32, what="rstd/var")
    # The mean's low word carries what float32 cannot: hi + lo within 1e-5 of σ of the truth.
    err = (mean[0].double() + mean[1].double() - (ref[1][0] + ref[1][1])).abs().max().item()
    assert err < 1e-5 * 0.01


@pytest.mark.parametrize("per_sample", [True, False], ids=["instance", "batch"])
def test_plan_sizes_the_finalize_tiles_for_an_h200(per_sample):
    """At the DESIGN.md shapes every finalize program reads all its partials in one tile (no
    serial walk over them), FINALIZE_MIN_C to FINALIZE_MAX_C channels wide and at most MAX_TILE
    elements large."""
    pytest.importorskip("triton")
    from fastperc.kernels.norm import FINALIZE_MAX_C, FINALIZE_MIN_C, MAX_TILE, plan
    from fastperc.rules import H200

    for (n, c, h, w), inner in [((4, 32, 256, 256), False), ((4, 32, 256, 256), True), ((4, 64, 128, 128), True),
                                ((4, 128, 64, 64), False), ((4, 128, 64, 64), True)]:
        pl = plan(n, c, h * w, inner, H200, per_sample=per_sample)
        assert pl.parts == pl.splits * (1 if per_sample else n)
        assert min(c, FINALIZE_MIN_C) <= pl.finalize_c <= FINALIZE_MAX_C
        assert pl.finalize_p >= pl.parts and pl.finalize_g * pl.finalize_p * pl.finalize_c <= MAX_TILE
        assert pl.stats_finalize_grid == (pl.groups, -(-c // pl.finalize_c))
        assert pl.bwd_finalize_grid == (-(-c // pl.finalize_c),)
        if inner:  # channels_last splits each row into many parts: the case the serial merge was slow for
            assert pl.parts >= 64
