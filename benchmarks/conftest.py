"""pytest-benchmark set-up shared by every kernel benchmark.

`pytest benchmarks --benchmark-only` runs the comparisons; `--benchmark-disable` runs each
body once (the smoke run in `make test`). The cases (shapes, inputs, competitors, byte and
FLOP floors) come from ``fastperc.bench.cases``, shared with ``fastperc bench``.

On a GPU each case is also timed with CUDA events (``triton.testing.do_bench``, median, L2
cleared between runs); pytest-benchmark times the call plus a synchronise. On a CPU
pytest-benchmark's own timer is the measurement. Every benchmark records in `extra_info`:
op, shape, dtype, mode ("fwd" or "fwd+bwd"), provider ("eager", "compile", "torch",
"triton", "cuda", or an op's competitor), bytes, flops, median_ms, GB/s and TFLOP/s (and
peak_mem_MB on a GPU, min_ms on a CPU).
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from fastperc.bench.timing import median_ms as _median_ms
from fastperc.bench.timing import peak_memory_mb

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
_COMPILED: dict = {}


@pytest.fixture
def measure(benchmark):
    """measure(fn, op=..., shape=..., dtype=..., mode=..., provider=..., bytes=..., flops=...)

    Times ``fn`` (a no-argument callable) and fills ``benchmark.extra_info`` (plus ``extra``).
    """

    def run(fn: Callable[[], object], *, op: str, shape, dtype: torch.dtype, mode: str,
            provider: str, bytes: int, flops: int = 0, rounds: int | None = None,
            extra: dict | None = None) -> None:
        if not benchmark.disabled:
            fn()  # warm-up: compile, autotune, allocate (the smoke run calls fn once only)
        if ON_GPU:
            peak = peak_memory_mb(fn, DEVICE)
            median_ms = _median_ms(fn, DEVICE)

            def timed():
                fn()
                torch.cuda.synchronize()

            benchmark.pedantic(timed, rounds=rounds or 20, warmup_rounds=2)
        else:
            peak = None
            benchmark.pedantic(fn, rounds=rounds or 5, warmup_rounds=1)
            stats = benchmark.stats
            median_ms = stats.stats.median * 1e3 if stats is not None else float("nan")
            if stats is not None:
                # On shared CPU cores the fastest round is the steadier figure beside the median.
                benchmark.extra_info["min_ms"] = stats.stats.min * 1e3
        seconds = median_ms / 1e3
        benchmark.extra_info.update(
            op=op, shape=list(shape), dtype=str(dtype).removeprefix("torch."), mode=mode,
            provider=provider, device=torch.cuda.get_device_name() if ON_GPU else "cpu",
            bytes=int(bytes), flops=int(flops), median_ms=median_ms,
            GBps=bytes / seconds / 1e9 if seconds > 0 and bytes else None,
            TFLOPs=flops / seconds / 1e12 if seconds > 0 and flops else None,
            peak_mem_MB=peak, **(extra or {}),
        )

    return run


@pytest.fixture
def measure_case(measure, benchmark):
    """measure_case(case, provider, rounds=None): time one fastperc.bench.cases.Case on one
    provider; records its layout, label and float32 precision, and where the case counts the
    work as written too (the upsampling convs), flops_naive and TFLOPs_naive."""

    def run(case, provider: str, rounds: int | None = None) -> None:
        extra = {"layout": case.layout, "label": case.label, "precision": case.precision(provider)}
        if case.flops_naive is not None:
            extra["flops_naive"] = case.flops_naive
        measure(case.runner(provider, _COMPILED), op=case.op, shape=case.shape, dtype=case.dtype,
                mode=case.mode, provider=provider, bytes=case.bytes, flops=case.flops, rounds=rounds,
                extra=extra)
        seconds = benchmark.extra_info["median_ms"] / 1e3
        if case.flops_naive is not None:
            benchmark.extra_info["TFLOPs_naive"] = case.flops_naive / seconds / 1e12 if seconds > 0 else None

    return run
