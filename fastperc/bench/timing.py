"""Timing and the machine's ceilings.

GPU: CUDA events through ``triton.testing.do_bench`` (median; it clears the L2 cache before
every run, so inputs need no rotation). CPU: the median of repeated wall-clock runs.
Ceilings, measured in the same run as the kernels: a large device-to-device copy (bytes read
plus written per second) and a large bf16 matrix product (TFLOP/s).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: str, *, rounds: int = 5) -> float:
    """Median time of ``fn()`` in milliseconds, after a warm-up call."""
    fn()
    if device == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak device memory allocated during one call of ``fn`` (None on a CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def copy_bandwidth_GBps(device: str, nbytes: int = 1 << 30) -> float:
    """Achieved bandwidth of a large copy, counting bytes read plus written."""
    if device != "cuda":
        nbytes = 1 << 26
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms / 1e3) / 1e9


def matmul_TFLOPs(device: str, n: int = 8192) -> float:
    """Achieved TFLOP/s of an n x n x n matrix product (bf16 on a GPU, fp32 on a CPU)."""
    if device != "cuda":
        n = 1024
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms / 1e3) / 1e12
