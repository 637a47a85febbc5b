"""``fastperc bench``: run every comparison, print one table, write the results JSON.

The JSON (one file per run, committed under benchmarks/results/ for GPU runs):
    device, torch, triton, cuda, commit, date (ISO),
    ceilings {copy_GBps, bf16_TFLOPs},
    results    [{op, shape, dtype, mode, layout, provider, median_ms, GBps, TFLOPs}],
    end_to_end [{task, size [H, W], batch, provider, median_ms, peak_mem_MB}].
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fastperc.bench import cases as op_cases
from fastperc.bench import end_to_end
from fastperc.bench.timing import copy_bandwidth_GBps, matmul_TFLOPs, median_ms, peak_memory_mb


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
    except ImportError:
        return None


def run(device: str, *, quick: bool = False, ops: list[str] | None = None,
        end_to_end_cases: bool = True) -> dict:
    """Measure everything on ``device``; returns the results document."""
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        **_versions(),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # On a CPU the matmul ceiling is an fp32 product (bf16 is not the fast path there).
    "ceilings": {"copy_GBps": copy_bandwidth_GBps(device), "bf16_TFLOPs": matmul_TFLOPs(device)},
        "results": [],
        "end_to_end": [],
    }
    pairs = op_cases.case_providers(device, list(op_cases.iter_cases(device, quick=quick, ops=ops)))
    compiled: dict = {}
    bar = _progress(len(pairs), "ops")
    for case, provider in pairs:
        ms = median_ms(case.runner(provider, compiled), device, rounds=3 if quick else 5)
        seconds = ms / 1e3
        report["results"].append({
            "op": case.op, "shape": list(case.shape), "dtype": str(case.dtype).removeprefix("torch."),
            "mode": case.mode, "layout": case.layout, "provider": provider, "median_ms": ms,
            "GBps": case.bytes / seconds / 1e9 if case.bytes else None,
            "TFLOPs": case.flops / seconds / 1e12 if case.flops else None,
        })
        if bar:
            bar.update()
    if bar:
        bar.close()
    if end_to_end_cases:
        for case in end_to_end.iter_cases(device, quick=quick):
            for provider in end_to_end.providers(device):
                fn = end_to_end.runner(case, provider)
                ms = median_ms(fn, device, rounds=2 if quick else 3)
                report["end_to_end"].append({
                    "task": case.task, "size": list(case.size), "batch": case.batch,
                    "provider": provider, "median_ms": ms, "peak_mem_MB": peak_memory_mb(fn, device),
                })
    return report


def _fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    """One line per (op, shape, dtype, mode): median ms per provider, fastperc's best speedup
    over eager and over compile, and its GB/s or TFLOP/s as a fraction of the ceiling."""
    rows: dict[tuple, dict] = {}
    for r in report["results"]:
        key = (r["op"], tuple(r["shape"]), r.get("layout", "nchw"), r["dtype"], r["mode"])
        rows.setdefault(key, {})[r["provider"]] = r
    providers = sorted({r["provider"] for r in report["results"]},
                       key=lambda p: ["eager", "compile", "torch", "triton", "cuda"].index(p))
    ceilings = report["ceilings"]
    head = ["op", "shape", "layout", "dtype", "mode"] + [f"{p} ms" for p in providers] + \
           ["x eager", "x compile", "best", "rate", "of ceiling"]
    lines = [head]
    for (op, shape, layout, dtype, mode), by_provider in rows.items():
        fused = {p: r for p, r in by_provider.items() if p not in ("eager", "compile")}
        best_name, best = min(fused.items(), key=lambda kv: kv[1]["median_ms"]) if fused else (None, None)
        eager, comp = by_provider.get("eager"), by_provider.get("compile")
        rate, fraction = "-", "-"
        if best is not None and best["TFLOPs"]:
            rate, fraction = f"{best['TFLOPs']:.3g} TF/s", f"{best['TFLOPs'] / ceilings['bf16_TFLOPs']:.0%}"
        elif best is not None and best["GBps"]:
            rate, fraction = f"{best['GBps']:.3g} GB/s", f"{best['GBps'] / ceilings['copy_GBps']:.0%}"
        lines.append([op, "x".join(map(str, shape)), layout, dtype, mode]
                     + [_fmt(by_provider[p]["median_ms"]) if p in by_provider else "-" for p in providers]
                     + [_fmt(eager["median_ms"] / best["median_ms"], ".2f") if eager and best else "-",
                        _fmt(comp["median_ms"] / best["median_ms"], ".2f") if comp and best else "-",
                        best_name or "-", rate, fraction])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    text = [f"device {report['device']}, torch {report['torch']}, triton {report['triton']}, "
            f"{report['date']}; ceilings: copy {report['ceilings']['copy_GBps']:.0f} GB/s, "
            f"matmul {report['ceilings']['bf16_TFLOPs']:.3g} TFLOP/s"]
    text += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines]
    if report["end_to_end"]:
        text.append("")
        text.append("end to end: task, size, batch, provider, median ms, peak MB")
        for r in report["end_to_end"]:
            text.append(f"{r['task']:<11} {r['size'][0]}x{r['size'][1]:<6} {r['batch']:<3} "
                        f"{r['provider']:<22} {r['median_ms']:10.2f} {_fmt(r['peak_mem_MB'], '.0f'):>8}")
    return "\n".join(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="one small shape per op, fewer rounds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    parser.add_argument("--ops", nargs="+", choices=list(op_cases.SPECS), default=None,
                        help="only these ops (default: all)")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the network benchmarks")


def main(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastperc bench: --device cuda asked for, but torch sees no CUDA device")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(args.out.parent, os.W_OK):
            raise SystemExit(f"fastperc bench: cannot write to {args.out.parent}")
    report = run(device, quick=args.quick, ops=args.ops, end_to_end_cases=not args.no_end_to_end)
    print(format_table(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"results written to {args.out}")
    return 0
