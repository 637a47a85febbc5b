"""pytest-benchmark set-up shared by every kernel benchmark.

`pytest benchmarks --benchmark-only` runs the comparisons; `--benchmark-disable` runs each
body once (the smoke run in `make test`). On a GPU each case is timed with CUDA events
(`triton.testing.do_bench`, median, L2 flushed between runs) and pytest-benchmark also times
the call with a synchronise; on a CPU pytest-benchmark's own timer is the measurement.

Every benchmark records in `extra_info`: op, shape, dtype, mode ("fwd" or "fwd+bwd"),
provider ("eager", "compile", "torch", "triton", "cuda"), the bytes the op must move and the
FLOPs it must do (the floors), and the achieved GB/s and TFLOP/s at the median time.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def fastperc_providers() -> list[str]:
    """fastperc backends worth timing here: not the reference (the spec, not a competitor),
    and not Triton's CPU interpreter (a correctness tool, orders of magnitude slow)."""
    import fastperc

    names = fastperc.available_backends()
    return [b for b in names if b in ("torch", "cuda") or (b == "triton" and ON_GPU)]


def providers(with_compile: bool | None = None) -> list[str]:
    """eager, compile (on the GPU, where compiling per shape is worth it), and fastperc's."""
    with_compile = ON_GPU if with_compile is None else with_compile
    return ["eager"] + (["compile"] if with_compile else []) + fastperc_providers()


def forward_backward(fn: Callable, inputs: Sequence[torch.Tensor]) -> Callable[[], None]:
    """A closure running ``fn(*inputs)`` and its backward w.r.t. the inputs that need grad."""
    leaves = [t for t in inputs if t.requires_grad]

    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run


def _median_ms_cuda(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


@pytest.fixture
def measure(benchmark):
    """measure(fn, op=..., shape=..., dtype=..., mode=..., provider=..., bytes=..., flops=...)

    Times ``fn`` (a no-argument callable) and fills ``benchmark.extra_info`` (plus ``extra``).
    On a GPU the peak memory of the timed runs is recorded as ``peak_mem_MB``.
    """

    def run(fn: Callable[[], object], *, op: str, shape, dtype: torch.dtype, mode: str,
            provider: str, bytes: int, flops: int = 0, rounds: int | None = None,
            extra: dict | None = None) -> None:
        fn()  # warm-up: compile, autotune, allocate
        peak = {}
        if ON_GPU:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = {"peak_mem_MB": torch.cuda.max_memory_allocated() / 2**20}
            median_ms = _median_ms_cuda(fn)

            def timed():
                fn()
                torch.cuda.synchronize()

            benchmark.pedantic(timed, rounds=rounds or 20, warmup_rounds=2)
        else:
            benchmark.pedantic(fn, rounds=rounds or 5, warmup_rounds=1)
            stats = benchmark.stats
            median_ms = stats.stats.median * 1e3 if stats is not None else float("nan")
        seconds = median_ms / 1e3
        benchmark.extra_info.update(
            op=op, shape=list(shape), dtype=str(dtype).removeprefix("torch."), mode=mode,
            provider=provider, device=torch.cuda.get_device_name() if ON_GPU else "cpu",
            bytes=int(bytes), flops=int(flops), median_ms=median_ms,
            GBps=bytes / seconds / 1e9 if seconds > 0 else None,
            TFLOPs=flops / seconds / 1e12 if seconds > 0 and flops else None,
            **peak, **(extra or {}),
        )

    return run
