"""Compile every launched Triton kernel of fastperc.kernels for the H200 (sm_90), without a GPU.

The tests run the kernels in Triton's CPU interpreter, which never compiles them, so an error
that only the compiler sees (a tl.dot operand type, a layout, a shared-memory limit) would wait
for the GPU machine. This script compiles them ahead of time with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``: compile only, nothing runs, no CUDA torch needed.

What is compiled: each kernel that a launcher launches, for fp32, bf16, fp16 and fp64 inputs
(``--dtypes`` chooses), with the block sizes, num_warps and shape-dependent flags that the launchers choose
on a GPU. Those come from the modules' own config functions, called with ``torch.device("cuda")``
(and 132 SMs, the H200's, where a plan depends on the SM count) for a few representative shapes
per op. The flags a call chooses (style loss or Gram, ReLU, residual, bias, reduction, tf32 ...)
are not multiplied out: per kernel and dtype, every distinct config and every value of every
flag is compiled at least once, in max(#configs, #values) variants. Identical variants are
compiled once. Successful compiles land in Triton's cache (TRITON_CACHE_DIR), so a repeat run
is quick.

    python tools/triton_aot_check.py [--dtypes fp32,bf16,fp64,fp16] [--jobs N]

One line per variant (OK or FAIL with the error's last line), a summary; exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time
import types
import warnings
from typing import NamedTuple

os.environ.pop("TRITON_INTERPRET", None)  # before triton and the kernels read it

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastperc.kernels import feature_loss, gram, norm, tv_loss, upsample_conv  # noqa: E402
from fastperc.kernels._common import acc_dtype, cdiv, tl_dtype  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H200: sm_90, warp size 32
H200_SMS = 132
CUDA = torch.device("cuda")  # a device object only: creating it needs no CUDA
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
FLOAT_SCALARS = {"eps"}  # scalar arguments launched as Python floats; the others are ints
# Triton 3.9 notes on every compile that its fp-fusion default will change; the launchers keep
# the default, and so does this check: the note is noise here.
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

# The launchers' SM-count lookups read the GPU's properties; the H200's instead.
gram._sm_count = lambda device: H200_SMS
norm._sm_count = lambda device: H200_SMS


class Variant(NamedTuple):
    kernel: triton.JITFunction
    dtype: str                 # the input dtype, for the report
    ptrs: dict                 # pointer argument -> element dtype, or None (passed as None)
    consts: dict               # constexpr argument -> value
    options: dict              # num_warps, num_stages


def cover(flags: dict[str, list]) -> list[dict]:
    """Few settings of the flags in which every value of every flag occurs at least once."""
    n = max((len(v) for v in flags.values()), default=1)
    return [{k: v[i % len(v)] for k, v in flags.items()} for i in range(n)]


def spread(configs: list[dict], flags: dict[str, list]) -> list[tuple[dict, dict]]:
    """(config, flags) pairs: each distinct config and each flag value at least once."""
    unique = [c for i, c in enumerate(configs) if c not in configs[:i]]
    settings = cover(flags)
    n = max(len(unique), len(settings))
    return [(unique[i % len(unique)], settings[i % len(settings)]) for i in range(n)]


def tf32_choices(fn, *args) -> list:
    """The values of a launcher's precision function with tf32 matmuls allowed and not."""
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        values = []
        for allow in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow
            values.append(fn(*args))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return sorted(set(values))


def t(dtype: torch.dtype) -> str:
    return TRITON_TYPES[dtype]


# -- per op: the variants its launchers launch on a GPU -------------------------------------------

def feature_loss_variants(dt):
    d, a = t(dt), t(acc_dtype(dt))
    cfg = dict(BLOCK=feature_loss.BLOCK)
    yield Variant(feature_loss._sq_diff_partial_kernel, d, dict(a_ptr=d, b_ptr=d, partial_ptr=a), cfg, {})
    yield Variant(feature_loss._diff_grad_kernel, d, dict(a_ptr=d, b_ptr=d, scale_ptr=a, out_ptr=d), cfg, {})


GRAM_SHAPES = [(4, 256, 64, 64), (2, 3, 8, 8)]  # VGG relu3_3 at 256 x 256 (split K); a small one


def gram_variants(dt):
    d, a = t(dt), t(acc_dtype(dt))
    fwd, split, bwd = [], [], []
    for n, c, h, w in GRAM_SHAPES:
        block_c, block_k, warps = gram._forward_config(c, dt, CUDA)
        tiles = cdiv(c, block_c)
        splits = gram._num_splits(n * tiles * (tiles + 1) // 2, h * w, block_k, CUDA)
        cfg = dict(BLOCK_C=block_c, BLOCK_K=block_k, N_TILES=tiles, SPLIT=splits > 1, num_warps=warps)
        fwd.append(cfg)
        if splits > 1:
            split.append(dict(BLOCK_C=block_c, N_TILES=tiles, num_warps=4))  # as _gram_launch
        block_m, block_j, block_k, warps = gram._backward_config(c, dt, CUDA)
        bwd.append(dict(BLOCK_M=block_m, BLOCK_J=block_j, BLOCK_K=block_k, num_warps=warps))
    common = dict(ACC=tl_dtype(acc_dtype(dt)))
    precision = tf32_choices(gram._precision, dt)

    def outputs(style):  # g, t, part: G in x's dtype for the Gram matrix, A plus target for the loss
        return dict(g_ptr=a, t_ptr=a, part_ptr=a) if style else dict(g_ptr=d, t_ptr=d, part_ptr=d)

    for cfg, f in spread(fwd, dict(STYLE=[False, True], PRECISION=precision)):
        out = outputs(f["STYLE"])
        ptrs = dict(x_ptr=d, ws_ptr=a if cfg["SPLIT"] else out["g_ptr"], **out)
        yield make(gram._gram_tile_kernel, d, ptrs, cfg, f, common)
    for cfg, f in spread(split, dict(STYLE=[False, True])):
        yield make(gram._gram_reduce_kernel, d, dict(ws_ptr=a, **outputs(f["STYLE"])), cfg, f, common)
    for cfg, f in spread(bwd, dict(HAS_A=[False, True], PRECISION=precision)):
        b = a if f["HAS_A"] else d  # style loss: the target (and G); Gram: dG in x's dtype
        ptrs = dict(x_ptr=d, out_ptr=d, b_ptr=b, a_ptr=b, scale_ptr=a, m_scale_ptr=a)
        scale_m = gram.scales_m(dt)
        yield make(gram._gram_backward_kernel, d, ptrs, cfg, f, dict(common, SCALE_M=scale_m))


# (B, C, S = H W, channels_last): TransformerNet's first instance norm at 256 x 256, batch 4,
# in NCHW, and a deeper one in channels_last.
NORM_SHAPES = [(4, 32, 256 * 256, False), (4, 128, 64 * 64, True)]


def norm_variants(dt):
    d, a = t(dt), t(acc_dtype(dt))
    tiles, fin = [], []
    for b, c, s, channels_last in NORM_SHAPES:
        block_c, block_s, _, _, _, warps = norm._plan(CUDA, b, c, s, channels_last)
        tiles.append(dict(BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps))
        fin.append(dict(BLOCK_C=norm._finalize_block(c)))
    params = dict(HAS_W=[False, True], HAS_B=[False, True], RELU=[False, True],
                  STAT_IS_VAR=[False, True])  # STAT_IS_VAR: batch norm (variance), instance (rstd)

    def wb(f):  # weight and bias: fp32 parameters, or None
        return dict(w_ptr="fp32" if f["HAS_W"] else None, b_ptr="fp32" if f["HAS_B"] else None)

    stats = dict(mean_ptr=a, stat_ptr=a)
    for cfg, f in spread(tiles, {}):
        yield make(norm._stats_partial, d, dict(x_ptr=d, pmean_ptr=a, pm2_ptr=a), cfg, f)
    for cfg, f in spread(fin, {}):
        ptrs = dict(x_ptr=d, pmean_ptr=a, pm2_ptr=a, mean_ptr=a, rstd_ptr=a, var_ptr=a)
        yield make(norm._stats_finalize, d, ptrs, cfg, f)
    for cfg, f in spread(tiles, dict(params, HAS_R=[False, True])):
        ptrs = dict(x_ptr=d, y_ptr=d, r_ptr=d if f["HAS_R"] else None, **wb(f), **stats)
        yield make(norm._apply, d, ptrs, cfg, f)
    for cfg, f in spread(tiles, params):
        yield make(norm._bwd_partial, d, dict(dy_ptr=d, x_ptr=d, pa_ptr=a, pb_ptr=a, **wb(f), **stats), cfg, f)
    for cfg, f in spread(fin, {}):
        ptrs = dict(pa_ptr=a, pb_ptr=a, ra_ptr=a, rb_ptr=a, dw_ptr=a, db_ptr=a)
        yield make(norm._bwd_finalize, d, ptrs, cfg, f)
    for cfg, f in spread(tiles, dict(params, CENTRED=[False, True])):
        ptrs = dict(dy_ptr=d, x_ptr=d, dx_ptr=d, ra_ptr=a, rb_ptr=a, **wb(f), **stats)
        yield make(norm._bwd_apply, d, ptrs, cfg, f)


TV_SHAPES = [((4, 3, 256, 256), False), ((4, 3, 256, 256), True)]  # a batch of images, NCHW and channels_last


def tv_loss_variants(dt):
    d, a = t(dt), t(acc_dtype(dt))
    tiles = []
    for shape, channels_last in TV_SHAPES:
        x = torch.empty(shape, dtype=dt, device="meta")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pl = tv_loss._plan(x, tv_loss._interleaved(x))
        tiles.append(dict(BLOCK_R=pl.block_r, BLOCK_F=pl.block_f, num_warps=pl.num_warps))
    # WIDE (64-bit in-row offsets) is chosen by the launchers for tensors of 2**31 elements and more.
    flags = dict(P=[1, 2], WIDE=[False, True])
    for cfg, f in spread(tiles, flags):
        yield make(tv_loss._tv_partial_kernel, d, dict(x_ptr=d, partial_ptr=a), cfg, f)
    for cfg, f in spread(tiles, dict(flags, MEAN=[False, True])):
        yield make(tv_loss._tv_grad_kernel, d, dict(x_ptr=d, grad_ptr=a, out_ptr=d), cfg, f,
                   dict(ACC_FP64=dt == torch.float64))
    finish = dict(BLOCK=tv_loss.FINAL_BLOCK, num_warps=4)  # as tv_loss_forward
    for cfg, f in spread([finish], dict(REDUCTION=sorted(tv_loss.REDUCTIONS.values()))):
        yield make(tv_loss._tv_finish_kernel, a, dict(partial_ptr=a, out_ptr=a), cfg, f)


# (N, C, O, H, W): TransformerNet's first upsampling layer at 256 x 256, and a small odd one.
UPSAMPLE_SHAPES = [(4, 128, 64, 64, 64), (1, 8, 3, 5, 4)]


def upsample_conv_variants(dt):
    d, a = t(dt), t(acc_dtype(dt))
    uc = upsample_conv
    # A stand-in for a CUDA tensor: _config and _precision read only its device, dtype and element size.
    x = types.SimpleNamespace(device=CUDA, dtype=dt, element_size=lambda: torch.finfo(dt).bits // 8)
    fwd, dx, border, dw = [], [], [], []
    for n, c, o, h, w in UPSAMPLE_SHAPES:  # the launchers' _config calls: (x, m, n, k) of each GEMM
        fwd.append(uc._config(x, h * w, o, c))
        dx.append(uc._config(x, h * w, c, o))
        border.append(uc._config(x, h * w if h <= 2 or w <= 2 else 2 * (h + w) - 4, c, o))
        dw.append(uc._config(x, c, o, n * h * w))
    common = dict(ACC_FP64=dt == torch.float64)
    precision = dict(PRECISION=tf32_choices(uc._precision, x))
    flags = dict(precision, MODE=[uc.UPSAMPLE, uc.TRANSPOSE], HAS_BIAS=[False, True], STATS=[False, True])
    for cfg, f in spread(fwd, flags):
        ptrs = dict(x_ptr=d, w_ptr=d, bias_ptr="fp32" if f["HAS_BIAS"] else d, y_ptr=d, stats_ptr=a)
        yield make(uc._phase_conv_fwd_kernel, d, ptrs, cfg, f, common)
    for kernel, configs in ((uc._upsample_dx_kernel, dx), (uc._upsample_dx_border_kernel, border),
                            (uc._conv_transpose_dx_kernel, dx)):
        for cfg, f in spread(configs, precision):
            yield make(kernel, d, dict(g_ptr=d, w_ptr=d, dx_ptr=d), cfg, f, common)
    for cfg, f in spread(dw, dict(precision, MODE=[uc.UPSAMPLE, uc.TRANSPOSE], HAS_DB=[False, True])):
        taps = dict(TAPS=16 if f["MODE"] == uc.UPSAMPLE else 9)  # as _dw
        yield make(uc._phase_conv_dw_kernel, d, dict(x_ptr=d, g_ptr=d, dw_ptr=a, db_ptr=a), cfg, f,
                   dict(common, **taps))


OPS = [feature_loss_variants, gram_variants, norm_variants, tv_loss_variants, upsample_conv_variants]


# -- compiling -------------------------------------------------------------------------------------

def make(kernel, dtype, ptrs, cfg, flags, extra=None) -> Variant:
    """A Variant from a launch config (block sizes plus num_warps / num_stages) and flags."""
    consts = {**cfg, **flags, **(extra or {})}
    options = {k: consts.pop(k) for k in ("num_warps", "num_stages") if k in consts}
    return Variant(kernel, dtype, ptrs, consts, options)


def source(v: Variant) -> ASTSource:
    """The kernel with the signature a launch would give it: tensors as 16-byte aligned pointers,
    None as constexpr None, ints as i32."""
    signature, consts, attrs = {}, {}, {}
    for i, p in enumerate(v.kernel.params):
        if p.is_constexpr:
            signature[p.name], consts[p.name] = "constexpr", v.consts[p.name]
        elif p.name in v.ptrs and v.ptrs[p.name] is None:
            signature[p.name], consts[p.name] = "constexpr", None
        elif p.name in v.ptrs:
            signature[p.name] = "*" + v.ptrs[p.name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name.endswith("_ptr"):
            raise KeyError(f"{v.kernel.__name__}: no dtype given for pointer {p.name}")
        else:
            signature[p.name] = "fp32" if p.name in FLOAT_SCALARS else "i32"
    unused = set(v.consts) - set(consts)
    if unused:
        raise KeyError(f"{v.kernel.__name__} has no constexpr {sorted(unused)}")
    return ASTSource(fn=v.kernel, signature=signature, constexprs=consts, attrs=attrs)


def describe(v: Variant) -> str:
    values = {**v.consts, **v.options}
    flags = " ".join(f"{k}={getattr(val, 'name', val)}" for k, val in values.items())
    return f"{v.kernel.__name__:28} {v.dtype:4}  {flags}"


VARIANTS: list[Variant] = []  # filled before the worker processes fork


def compile_variant(index: int) -> tuple[bool, str]:
    v = VARIANTS[index]
    start = time.perf_counter()
    try:
        compiled = triton.compile(source(v), target=TARGET, options=v.options)
        return True, f"{time.perf_counter() - start:.1f}s, {compiled.metadata.shared} B smem"
    except Exception as e:  # report it and go on to the next variant
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        return False, f"{type(e).__name__}: {lines[-1]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="fp32,bf16,fp16,fp64", help="input dtypes (of fp32, bf16, fp16, fp64)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args()
    seen = set()
    for name in args.dtypes.split(","):
        for op in OPS:
            for v in op(DTYPES[name]):
                key = (v.kernel.__name__, tuple(v.ptrs.items()), tuple(v.consts.items()), tuple(v.options.items()))
                if key not in seen:
                    seen.add(key)
                    VARIANTS.append(v)
    start = time.perf_counter()
    failed = 0
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        for v, (ok, message) in zip(VARIANTS, pool.map(compile_variant, range(len(VARIANTS)))):
            failed += not ok
            print(f"{'OK  ' if ok else 'FAIL'} {describe(v)}  {message}", flush=True)
    kernels = len({v.kernel.__name__ for v in VARIANTS})
    print(f"triton {triton.__version__}, sm_{TARGET.arch}: {len(VARIANTS) - failed}/{len(VARIANTS)} variants "
          f"of {kernels} kernels compiled, {failed} failed ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
