"""The CUDA C++ kernels (fastperc.cuda_backend) on a CUDA GPU; each test skipped without one.

The launchers against the float64 reference for every dtype, layout (NCHW, channels_last,
strided views, misaligned pointers that take the scalar path) and flag, forward and backward,
statistics included; the split reductions on the training shapes; bitwise-equal reruns;
gradcheck in float64 through the ops.
"""
from __future__ import annotations

import pytest
import torch

import fastperc
from fastperc import reference
from helpers import LAYOUTS, ON_GPU, TOLERANCE, assert_close, make_input

# -- on a CUDA GPU: the kernels against the float64 reference --------------------------------
# Every test is a gpu_test: without a GPU, needs_gpu skips it (the module is still collected,
# so that a test left without the mark runs, and fails, on a CPU-only machine).

needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
needs_cuda_backend = pytest.mark.skipif(
    ON_GPU and "cuda" not in fastperc.available_backends(),
    reason=f"the cuda backend cannot run here: {fastperc.backends._CUDA_UNAVAILABLE}",
)


def gpu_test(fn):
    """Marks a test as needing a CUDA GPU and the cuda backend (skipped otherwise)."""
    return pytest.mark.cuda(needs_gpu(needs_cuda_backend(fn)))


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
GPU_LAYOUTS = [*LAYOUTS, "misaligned", "misaligned_channels_last"]


def _cuda_backend():
    from fastperc import cuda_backend

    return cuda_backend


def _input(shape, dtype, layout, *, scale=1.0, offset=0.0, seed=0):
    """make_input on the GPU, plus views whose data pointer is not 16-byte aligned (one element
    into a buffer): those take the kernels' scalar path."""
    g = torch.Generator().manual_seed(seed)
    if not layout.startswith("misaligned"):
        return make_input(shape, dtype, "cuda", layout, scale=scale, offset=offset, generator=g)
    n, c, h, w = shape
    values = (torch.randn(shape, dtype=torch.float64, generator=g) * scale + offset).to("cuda", dtype)
    buf = torch.empty(values.numel() + 1, dtype=dtype, device="cuda")
    if layout == "misaligned":
        x = buf[1:].view(shape)
    else:
        x = buf.as_strided(shape, (h * w * c, 1, w * c, c), 1)
        assert x.is_contiguous(memory_format=torch.channels_last)
    return x.copy_(values)


def _tol(dtype):
    return TOLERANCE[dtype] if dtype != torch.float64 else 1e-9


TV_SHAPES = [(2, 3, 5, 7), (1, 3, 1, 6), (1, 3, 6, 1), (2, 2, 1, 1), (2, 3, 17, 19), (1, 1, 9, 8),
             (2, 8, 16, 32), (3, 16, 33, 24)]


@gpu_test
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shape", TV_SHAPES, ids=str)
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tv_loss_kernels_match_the_reference(dtype, layout, shape, p, reduction):
    _tv_case(dtype, layout, shape, p, reduction)


def _tv_case(dtype, layout, shape, p, reduction, *, scale=2.0, offset=0.5):
    cb = _cuda_backend()
    x = _input(shape, dtype, layout, scale=scale, offset=offset)
    x64 = x.double()
    loss = cb.tv_loss_forward(x, p, reduction)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == ((shape[0],) if reduction == "none" else ())
    assert_close(loss, reference.tv_loss(x64, p, reduction), dtype, tol=_tol(dtype), what="loss")
    grad = (torch.rand(shape[0], dtype=torch.float64) + 0.5) if reduction == "none" else torch.tensor(1.7)
    grad = grad.to("cuda", loss.dtype)
    dx = cb.tv_loss_backward(grad, x, p, reduction)
    assert dx.dtype == dtype and dx.stride() == torch.empty_like(x).stride()
    ref = reference.tv_loss_backward(grad.double(), x64, p, reduction)
    assert_close(dx, ref, dtype, tol=_tol(dtype), what="dx")
    # Deterministic: a rerun is bitwise equal.
    assert torch.equal(cb.tv_loss_forward(x, p, reduction), loss)
    assert torch.equal(cb.tv_loss_backward(grad, x, p, reduction), dx)


# Split reductions and long rows: the training shapes (and a few rows of 65,536 elements).
TV_LARGE = [(4, 3, 256, 256), (4, 64, 128, 128), (1, 2, 256, 256)]


@gpu_test
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", TV_LARGE, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tv_loss_kernels_on_training_shapes(dtype, shape, layout):
    _tv_case(dtype, layout, shape, 2, "none", scale=40.0, offset=128.0)


def _param(c, seed, scale=0.5, base=1.0):
    g = torch.Generator().manual_seed(seed)
    return (base + scale * torch.randn(c, generator=g, dtype=torch.float64)).to("cuda", torch.float32)


NORM_FLAGS = [(relu, res, affine) for affine in (True, False) for relu in (False, True) for res in (False, True)]
NORM_FLAG_IDS = [f"relu{int(r)}-res{int(s)}-affine{int(a)}" for r, s, a in NORM_FLAGS]
# Odd sizes, C not a multiple of the vector width, more channels than a channels_last tile,
# tiny images in a large batch, vector-friendly sizes.
NORM_SHAPES = [(1, 1, 3, 1), (2, 3, 1, 7), (1, 5, 17, 19), (2, 37, 3, 5), (2, 300, 5, 5), (16, 8, 2, 2),
               (2, 16, 16, 16)]


def _rows(n, c, seed, scale=0.5, base=1.0):
    """An (N, C) per-sample parameter on the GPU (conditional instance norm)."""
    return torch.stack([_param(c, seed + 10 * i, scale, base) for i in range(n)])


def _norm_case(kind, dtype, layout, shape, relu, with_residual, affine, *, training=True, scale=2.0, offset=0.5,
               params="c"):
    """One forward and backward of the cuda launchers against reference.<kind>_forward/backward
    in float64, statistics included, plus a bitwise-equal rerun. ``params``: weight and bias
    (C,) ("c"), (N, C) ("nc"), or a (C,) weight with an (N, C) bias ("mixed")."""
    cb = _cuda_backend()
    n, c = shape[:2]
    x = _input(shape, dtype, layout, scale=scale, offset=offset)
    w = (_rows(n, c, 1) if params == "nc" else _param(c, 1)) if affine else None
    b = (_param(c, 2, 0.3, 0.0) if params == "c" else _rows(n, c, 2, 0.3, 0.0)) if affine else None
    r = _input(shape, dtype, "contiguous", seed=3) if with_residual else None
    dy = _input(shape, dtype, "contiguous", seed=4)
    eps = 1e-5
    x64, dy64 = x.double(), dy.double()
    w64, b64, r64 = (t.double() if t is not None else None for t in (w, b, r))
    if kind == "instance_norm":
        out = cb.instance_norm_forward(x, w, b, r, eps, relu)
        ref = reference.instance_norm_forward(x64, w64, b64, r64, eps, relu)
        grads = cb.instance_norm_backward(dy, x, w, b, out[1], out[2], relu)
        ref_grads = reference.instance_norm_backward(dy64, x64, w64, b64, ref[1], ref[2], relu)
        rerun = (cb.instance_norm_forward(x, w, b, r, eps, relu),
                 cb.instance_norm_backward(dy, x, w, b, out[1], out[2], relu))
    else:
        rm = _param(c, 5, 0.5, 0.2)
        rv = _param(c, 6, 0.2, 1.0).abs()
        out = cb.batch_norm_forward(x, w, b, r, rm, rv, training, eps, relu)
        ref = reference.batch_norm_forward(x64, w64, b64, r64, rm.double(), rv.double(), training, eps, relu)
        grads = cb.batch_norm_backward(dy, x, w, b, out[1], out[2], training, eps, relu)
        ref_grads = reference.batch_norm_backward(dy64, x64, w64, b64, ref[1], ref[2], training, eps, relu)
        rerun = (cb.batch_norm_forward(x, w, b, r, rm, rv, training, eps, relu),
                 cb.batch_norm_backward(dy, x, w, b, out[1], out[2], training, eps, relu))
    y, mean, stat = out
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
    assert mean.dtype == acc and stat.dtype == acc and mean.shape == ref[1].shape and stat.shape == ref[2].shape
    tol = _tol(dtype)
    assert_close(y, ref[0], dtype, tol=tol, what="y")
    assert_close(mean[0].double() + mean[1].double(), ref[1][0] + ref[1][1], torch.float32, tol=1e-6, what="mean")
    assert_close(stat, ref[2], torch.float32, tol=1e-5 if acc == torch.float32 else 1e-9, what="rstd/var")
    dx, dweight, dbias = grads
    assert dx.dtype == dtype and dx.stride() == torch.empty_like(x).stride()
    assert dweight.dtype == acc and dbias.dtype == acc
    assert dweight.shape == (w.shape if w is not None else (c,)) and dbias.shape == (b.shape if b is not None else (c,))
    assert_close(dx, ref_grads[0], dtype, tol=tol, what="dx")
    assert_close(dweight, ref_grads[1], dtype, tol=tol, what="dweight")
    assert_close(dbias, ref_grads[2], dtype, tol=tol, what="dbias")
    for got, again in zip((*out, *grads), (*rerun[0], *rerun[1])):
        assert torch.equal(got, again), "a rerun is not bitwise equal"


@gpu_test
@pytest.mark.parametrize("relu,with_residual,affine", NORM_FLAGS, ids=NORM_FLAG_IDS)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_instance_norm_kernels_match_the_reference(dtype, layout, shape, relu, with_residual, affine):
    _norm_case("instance_norm", dtype, layout, shape, relu, with_residual, affine)


@gpu_test
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu,with_residual,affine", NORM_FLAGS, ids=NORM_FLAG_IDS)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_kernels_match_the_reference(dtype, layout, shape, relu, with_residual, affine, training):
    _norm_case("batch_norm", dtype, layout, shape, relu, with_residual, affine, training=training)


# The shapes that matter: 128 (n, c) rows of 65,536 (split reductions), VGG and TransformerNet
# activations, channels_last; a large mean (|μ| >> σ) that E[x²] − E[x]² would lose.
NORM_LARGE = [(4, 32, 256, 256), (1, 2, 256, 256), (4, 128, 64, 64), (4, 512, 32, 32)]


@gpu_test
@pytest.mark.parametrize("kind", ["instance_norm", "batch_norm"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", NORM_LARGE, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_kernels_on_training_shapes(kind, dtype, shape, layout):
    _norm_case(kind, dtype, layout, shape, True, True, True)


@gpu_test
@pytest.mark.parametrize("kind", ["instance_norm", "batch_norm"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_norm_kernels_keep_precision_with_a_large_mean(kind, layout):
    _norm_case(kind, torch.float32, layout, (2, 16, 64, 64), True, False, True, scale=0.01, offset=1000.0)


# Conditional instance norm: (N, C) weight and bias (and a (C,) weight with an (N, C) bias).
@gpu_test
@pytest.mark.parametrize("params", ["nc", "mixed"])
@pytest.mark.parametrize("relu,with_residual", [(False, False), (True, True)], ids=["plain", "relu-res"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_instance_norm_kernels_with_per_sample_params(dtype, layout, shape, relu, with_residual, params):
    _norm_case("instance_norm", dtype, layout, shape, relu, with_residual, True, params=params)


@gpu_test
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 32, 256, 256), (4, 128, 64, 64)], ids=str)
def test_instance_norm_kernels_with_per_sample_params_on_training_shapes(shape, layout):
    _norm_case("instance_norm", torch.bfloat16, layout, shape, True, True, True, params="nc")


def _norm_plan(x, per_sample):
    from fastperc._cuda_ext import load

    return load().norm_plan(x, per_sample)


# The finalize kernels merge 1, 3, 7 and many partials per statistic: (shape, layout, splits).
# Planar rows split into chunks of at least 2048 positions, channels_last ones of 64; with one
# row (or channel tile) of work the split is then ceil(S / 2048) or ceil(S / 64), capped by
# 4 blocks per SM (528 on an H200; these cases need a GPU of 16 SMs or more).
FINALIZE_CASES = [
    ((1, 1, 32, 40), "contiguous", 1),
    ((1, 1, 48, 128), "contiguous", 3),       # 6144 = 3 · 2048
    ((1, 1, 56, 200), "contiguous", 6),       # 11200: chunks of 1872, the last 1840
    ((1, 1, 112, 128), "contiguous", 7),      # 14336 = 7 · 2048
    ((1, 2, 256, 256), "contiguous", 32),
    ((1, 16, 8, 56), "channels_last", 7),     # 448 = 7 · 64
    ((1, 3, 21, 64), "channels_last", 21),    # C = 3: a finalize block of 4 channel lanes
    ((2, 40, 64, 64), "channels_last", 64),   # C = 40: two finalize channel tiles
]


@gpu_test
@pytest.mark.parametrize("kind", ["instance_norm", "batch_norm"])
@pytest.mark.parametrize("shape,layout,splits", FINALIZE_CASES, ids=[f"{c[0]}-{c[1]}" for c in FINALIZE_CASES])
def test_norm_finalize_merges_odd_numbers_of_partials(kind, shape, layout, splits):
    """The plan splits as intended (so the finalize merges that many partials per statistic,
    N times as many for batch norm), and every statistic and gradient matches the reference."""
    x = _input(shape, torch.float32, layout)
    got, chunk = _norm_plan(x, kind == "instance_norm")
    n, c, h, w = shape
    assert got == splits and (splits - 1) * chunk < h * w <= splits * chunk
    _norm_case(kind, torch.float32, layout, shape, True, True, True)


@gpu_test
@pytest.mark.parametrize("kind", ["instance_norm", "batch_norm"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_norm_finalize_keeps_a_large_mean_over_many_partials(kind, layout):
    """Mean 1000, spread 0.01, split into 32 (planar) or 64 (channels_last) partials per row."""
    shape = (1, 2, 256, 256) if layout == "contiguous" else (2, 40, 64, 64)
    assert _norm_plan(_input(shape, torch.float32, layout), kind == "instance_norm")[0] >= 32
    for params in ("c", "nc") if kind == "instance_norm" else ("c",):
        _norm_case(kind, torch.float32, layout, shape, True, False, True, scale=0.01, offset=1000.0, params=params)


# -- on a CUDA GPU: through the ops (autograd, gradcheck) ------------------------------------


@gpu_test
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ops_run_on_the_cuda_backend_with_autograd(layout):
    x = _input((2, 8, 12, 10), torch.float32, layout).requires_grad_(True)
    w, b = _param(8, 1).requires_grad_(True), _param(8, 2, 0.3, 0.0).requires_grad_(True)
    loss = (fastperc.tv_loss(x, backend="cuda")
            + fastperc.instance_norm(x, w, b, relu=True, backend="cuda").square().mean()
            + fastperc.batch_norm_relu(x, w, b, backend="cuda").square().mean())
    grads = torch.autograd.grad(loss, [x, w, b])

    def spec(x, w, b):
        return (reference.tv_loss(x) + reference.instance_norm(x, w, b, relu=True).square().mean()
                + reference.batch_norm(x, w, b, relu=True).square().mean())

    leaves = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    ref = spec(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves)
    assert_close(loss, ref, torch.float32)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, torch.float32)


@gpu_test
def test_gradcheck_in_float64_through_the_ops():
    x = _input((2, 3, 5, 4), torch.float64, "contiguous").requires_grad_(True)
    w = _param(3, 1).double().requires_grad_(True)
    b = _param(3, 2, 0.3, 0.0).double().requires_grad_(True)
    r = _input((2, 3, 5, 4), torch.float64, "channels_last", seed=7).requires_grad_(True)
    for p in (1, 2):
        assert torch.autograd.gradcheck(lambda t: fastperc.tv_loss(t, p, "none", backend="cuda"), (x,))
    assert torch.autograd.gradcheck(
        lambda t, w, b, r: fastperc.instance_norm(t, w, b, relu=False, residual=r, backend="cuda"), (x, w, b, r))
    assert torch.autograd.gradcheck(lambda t, w, b: fastperc.batch_norm(t, w, b, backend="cuda"), (x, w, b))
    w_rows = _rows(2, 3, 3).double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t, w, b, r: fastperc.instance_norm(t, w, b, relu=True, residual=r, backend="cuda"), (x, w_rows, b, r))


