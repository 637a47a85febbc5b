"""Compile every launched Triton kernel of fastperc.kernels for the H200 (sm_90), without a GPU.

The tests run the kernels in Triton's CPU interpreter, which never compiles them, so an error
that only the compiler sees (a tl.dot operand type, a layout, a shared-memory limit) would wait
for the GPU machine. This script compiles them ahead of time with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``: compile only, nothing runs, no CUDA torch needed.

What is compiled is what the launchers launch: for a few representative shapes per op, each
module's plans are made for the H200 (``fastperc.rules.H200``: compiled, 132 SMs) and its
``launch_*`` functions run on ``meta`` tensors inside ``fastperc.kernels.common.recording()``,
which records every kernel launch (kernel, arguments, constexprs, warps, stages) instead of
running it. Each recorded launch becomes one compile with the signature Triton would give it:
tensors as 16-byte aligned pointers of their dtype, None as constexpr None, ints as i32 (i64
from 2**31), floats as fp32. Inputs are fp32, bf16, fp16 and fp64 (``--dtypes`` chooses). The
flags a call chooses (style loss or Gram, ReLU, residual, bias, reduction, tf32 ...) are not
multiplied out: per op and dtype, every shape and every value of every flag is called at least
once, in max(#shapes, #values) calls. Identical compiles are done once. Successful compiles
land in Triton's cache (TRITON_CACHE_DIR), so a repeat run is quick.

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
import warnings
from typing import NamedTuple

os.environ.pop("TRITON_INTERPRET", None)  # before triton and fastperc read it

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastperc.kernels import feature_loss, gram, norm, tv_loss, upsample_conv  # noqa: E402
from fastperc.kernels.common import Launch, recording  # noqa: E402
from fastperc.rules import H200, acc_dtype, running_stats  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H200: sm_90, warp size 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
OPTIONS = ("num_warps", "num_stages")
# Triton 3.9 notes on every compile that its fp-fusion default will change; the launchers keep
# the default, and so does this check: the note is noise here.
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


class Variant(NamedTuple):
    kernel: triton.JITFunction
    dtype: str                 # the op's input dtype, for the report
    signature: dict            # parameter -> Triton type ("*fp32", "i32", "constexpr", ...)
    consts: dict               # constexpr parameter -> value
    options: dict              # num_warps, num_stages

    def key(self) -> tuple:
        return (self.kernel.__name__, tuple(self.signature.items()),
                tuple((k, repr(v)) for k, v in self.consts.items()), tuple(self.options.items()))


def settings(shapes: list, **flags: list) -> list[tuple[object, dict]]:
    """(shape, flags) pairs in which every shape and every value of every flag occurs at least once."""
    n = max([len(shapes)] + [len(v) for v in flags.values()])
    return [(shapes[i % len(shapes)], {k: v[i % len(v)] for k, v in flags.items()}) for i in range(n)]


def meta(shape, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


# -- per op: the launchers' calls on meta tensors, with plans for the H200 ----------------------

FEATURE_SHAPES = [(4, 128, 128, 128)]  # VGG relu2_2 at 256 x 256


def feature_loss_calls(dt):
    for shape, _ in settings(FEATURE_SHAPES):
        a, b = meta(shape, dt), meta(shape, dt)
        pl = feature_loss.plan(a.numel())
        feature_loss.launch_forward(pl, a, b)
        feature_loss.launch_backward(pl, meta((), acc_dtype(dt)), a, b)


GRAM_SHAPES = [(4, 256, 64, 64), (2, 3, 8, 8)]  # VGG relu3_3 at 256 x 256 (split K); a small one


def gram_calls(dt):
    acc = acc_dtype(dt)
    for shape, f in settings(GRAM_SHAPES, style=[False, True], tf32=[False, True]):
        n, c, _, _ = shape
        x = meta(shape, dt)
        fwd = gram.plan_forward(shape, dt, H200, style=f["style"], tf32=f["tf32"])
        bwd = gram.plan_backward(shape, dt, H200, has_a=f["style"], tf32=f["tf32"])
        if f["style"]:
            target = meta((c, c), acc)
            g, _ = gram.launch_forward(fwd, x, target)
            gram.launch_backward(bwd, x, target, g, meta((1,), acc))
        else:
            gram.launch_forward(fwd, x, None)
            gram.launch_backward(bwd, x, meta((n, c, c), dt), None, meta((1,), acc))


# (N, C, H, W, channels_last): TransformerNet's first instance norm at 256 x 256, batch 4, in
# NCHW, and a deeper one in channels_last.
NORM_SHAPES = [(4, 32, 256, 256, False), (4, 128, 64, 64, True)]
NORM_KINDS = ["instance", "batch", "batch-eval"]  # rstd saved; variance saved; running statistics


def norm_calls(dt):
    two = [False, True]
    for (n, c, h, w, cl), f in settings(NORM_SHAPES, kind=NORM_KINDS, weight=two, bias=two, residual=two, relu=two):
        per_sample = f["kind"] == "instance"
        x = meta((n, c, h, w), dt, cl)
        weight = meta((c,), torch.float32) if f["weight"] else None  # fp32 parameters, or None
        bias = meta((c,), torch.float32) if f["bias"] else None
        residual = meta((n, c, h, w), dt, cl) if f["residual"] else None
        running = meta((c,), torch.float32), meta((c,), torch.float32)
        stats = running_stats(*running, dt) if f["kind"] == "batch-eval" else None
        pl = norm.plan(n, c, h * w, cl, H200, per_sample=per_sample)
        y, mean, stat = norm.launch_forward(pl, x, weight, bias, residual, 1e-5, f["relu"], stats)
        norm.launch_backward(pl, meta((n, c, h, w), dt, cl), x, weight, bias, mean, stat, 1e-5, f["relu"],
                             centred=f["kind"] != "batch-eval", stat_is_var=not per_sample)


# (shape, channels_last): a batch of images in NCHW and channels_last, and rows too long for
# 32-bit offsets (the kernels' WIDE variant).
TV_SHAPES = [((4, 3, 256, 256), False), ((4, 3, 256, 256), True), ((1, 1, 2, 2**31), False)]


def tv_loss_calls(dt):
    acc = acc_dtype(dt)
    for (shape, cl), f in settings(TV_SHAPES, p=[1, 2], reduction=list(tv_loss.REDUCTIONS)):
        x = meta(shape, dt, cl)
        tv_loss.launch_forward(tv_loss.plan(shape, (x.stride(),), x.element_size(), H200), x, f["p"], f["reduction"])
        grad = meta((shape[0],) if f["reduction"] == "none" else (), acc)
        dx_strides = torch.empty_like(x).stride()
        pl = tv_loss.plan(shape, (x.stride(), dx_strides), x.element_size(), H200)
        tv_loss.launch_backward(pl, grad, x, f["p"], f["reduction"])


# (N, C, O, H, W): TransformerNet's first upsampling layer at 256 x 256, and a small odd one.
UPSAMPLE_SHAPES = [(4, 128, 64, 64, 64), (1, 8, 3, 5, 4)]


def upsample_conv_calls(dt):
    uc = upsample_conv
    two = [False, True]
    for (n, c, o, h, w), f in settings(UPSAMPLE_SHAPES, mode=[uc.UPSAMPLE, uc.TRANSPOSE], bias=two, stats=two,
                                       tf32=two, bias_grad=two):
        upsample = f["mode"] == uc.UPSAMPLE
        x = meta((n, c, h, w), dt)
        weight = meta((o, c, 3, 3) if upsample else (c, o, 3, 3), dt)
        bias = meta((o,), dt) if f["bias"] else None
        shape = (n, c, h, w)
        uc.launch_forward(uc.plan_forward(f["mode"], shape, o, dt, H200, tf32=f["tf32"]), x, weight, bias, f["stats"])
        pl = uc.plan_backward(f["mode"], shape, o, dt, H200, tf32=f["tf32"])
        uc.launch_backward(pl, meta((n, o, 2 * h, 2 * w), dt), x, weight, True, True, f["bias_grad"])


OPS = [feature_loss_calls, gram_calls, norm_calls, tv_loss_calls, upsample_conv_calls]


def variant(launch: Launch, dtype: str) -> Variant:
    """The compile a recorded launch needs."""
    bound = dict(zip([p.name for p in launch.kernel.params], launch.args))
    bound.update(launch.kwargs)
    signature, consts = {}, {}
    for p in launch.kernel.params:
        value = bound[p.name]
        if p.is_constexpr or value is None:
            signature[p.name], consts[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{launch.kernel.__name__}: argument {p.name} of type {type(value).__name__}")
    options = {k: v for k, v in launch.kwargs.items() if k in OPTIONS}
    return Variant(launch.kernel, dtype, signature, consts, options)


# -- compiling -------------------------------------------------------------------------------------

def source(v: Variant) -> ASTSource:
    """The kernel with its launch signature; pointers 16-byte aligned, as the allocator gives them."""
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(v.kernel.params)
             if v.signature[p.name].startswith("*")}
    return ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.consts, attrs=attrs)


def describe(v: Variant) -> str:
    values = {**{k: c for k, c in v.consts.items() if c is not None}, **v.options}
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
            with recording() as launches:
                op(DTYPES[name])
            for launch in launches:
                v = variant(launch, name)
                if v.key() not in seen:
                    seen.add(v.key())
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
