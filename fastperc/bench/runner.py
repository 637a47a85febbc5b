"""``fastperc bench``: run the comparisons, print one table, write the results JSON.

    fastperc bench [--quick] [--device cpu|cuda] [--ops a,b,...] [--providers p,q,...]
                   [--dtypes bf16,fp16,fp32] [--no-end-to-end] [--deadline SECONDS]
                   [--jsonl FILE] [--out JSON]

What runs is a list of measurements, each one row: the op cases (fastperc.bench.cases) on
their providers, then the end-to-end cases (fastperc.bench.end_to_end). ``--ops`` names ops
and end-to-end tasks ("inference", "train_step"); ``--providers`` and ``--dtypes`` narrow both
(an end-to-end provider counts as "eager", "compile" or the backend the fused network runs on).
A provider asked for that cannot run here (cuda without its extension, say) is left out with a
note. With ``--deadline`` no measurement starts later than SECONDS after the start; what was
measured still goes to the table and the JSON, and the exit status is 0. A measurement that
raises is recorded under ``errors`` and the run goes on (exit status 1 at the end). ``--jsonl``
appends every row to a file as it is measured (each run starts with its meta line). The
document's fields: fastperc.bench.report.

A new kind of row (the host-cost rows, say) is one more plan in ``PLANS``: a function from
the device and the selection to measurements.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from fastperc.bench import cases as op_cases
from fastperc.bench import end_to_end
from fastperc.bench.report import JsonlWriter, format_table, meta, new_document
from fastperc.bench.timing import median_ms, peak_memory_mb


_clock = time.monotonic  # the deadline's clock (a test replaces it)


@dataclass(frozen=True)
class Selection:
    """What to measure."""

    ops: tuple[str, ...]                        # op names (cases.SPECS) and end-to-end tasks
    providers: tuple[str, ...] | None = None    # None: each case's default providers
    dtypes: tuple[torch.dtype, ...] | None = None  # None: the device's default dtypes
    quick: bool = False


ALL = tuple(op_cases.SPECS) + end_to_end.TASKS


@dataclass(frozen=True)
class Measurement:
    section: str                   # the document's list its row joins
    id: str
    provider: str
    measure: Callable[[], dict]    # runs it; returns the row


def op_measurements(device: str, selection: Selection) -> Iterator[Measurement]:
    ops = [op for op in selection.ops if op in op_cases.SPECS]
    if not ops:
        return
    cases = list(op_cases.iter_cases(device, quick=selection.quick, ops=ops, dtypes=selection.dtypes))
    compiled: dict = {}  # one torch.compile per case, shared by the fwd and fwd+bwd runs
    rounds = 3 if selection.quick else 5

    def measure(case: op_cases.Case, provider: str) -> dict:
        ms = median_ms(case.runner(provider, compiled), device, rounds=rounds)
        seconds = ms / 1e3
        row = {
            "op": case.op, "shape": list(case.shape), "dtype": str(case.dtype).removeprefix("torch."),
            "mode": case.mode, "layout": case.layout, "provider": provider, "median_ms": ms,
            "GBps": case.bytes / seconds / 1e9 if case.bytes else None,
            "TFLOPs": case.flops / seconds / 1e12 if case.flops else None,
        }
        if case.precision(provider) is not None:
            row["precision"] = case.precision(provider)
        return row

    for case, provider in op_cases.case_providers(device, cases, selection.providers):
        yield Measurement("results", case.id, provider, lambda c=case, p=provider: measure(c, p))


def end_to_end_measurements(device: str, selection: Selection) -> Iterator[Measurement]:
    tasks = [t for t in selection.ops if t in end_to_end.TASKS]
    if not tasks:
        return
    rounds = 2 if selection.quick else 3

    def measure(case: end_to_end.EndToEndCase, provider: str) -> dict:
        fn = end_to_end.runner(case, provider)
        row = {"task": case.task, "size": list(case.size), "batch": case.batch, "provider": provider,
               "median_ms": median_ms(fn, device, rounds=rounds), "peak_mem_MB": peak_memory_mb(fn, device)}
        if end_to_end.precision_of(provider, device) is not None:
            row["precision"] = end_to_end.precision_of(provider, device)
        return row

    for case in end_to_end.iter_cases(device, quick=selection.quick, tasks=tasks):
        for provider in end_to_end.providers(device, selection.providers, selection.dtypes):
            yield Measurement("end_to_end", case.id, provider, lambda c=case, p=provider: measure(c, p))


PLANS: tuple[Callable[[str, Selection], Iterator[Measurement]], ...] = (op_measurements, end_to_end_measurements)


def _progress(desc: str):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm

        return tqdm(desc=desc, file=sys.stderr, leave=False)
    except ImportError:
        return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def run(device: str, selection: Selection | None = None, *, deadline: float | None = None,
        sink: JsonlWriter | None = None) -> dict:
    """Measure ``selection`` (default: everything) on ``device``; returns the document.

    ``deadline``: seconds from the start after which no measurement starts (the rest are
    counted in ``not_started``). ``sink`` receives the meta line and every row as it is made.
    An interrupt (Ctrl-C, SIGINT) ends the run early with what was measured."""
    start = _clock()
    selection = selection or Selection(ops=ALL)
    document = new_document(device)
    if sink is not None:
        sink.write("meta", meta(document))
    bar = _progress("bench")
    try:
        for plan in PLANS:
            for m in plan(device, selection):
                if deadline is not None and _clock() - start >= deadline:
                    document["not_started"] += 1
                    continue
                try:
                    section, row = m.section, m.measure()
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # recorded; the other measurements still run
                    section, row = "errors", {"section": m.section, "id": m.id, "provider": m.provider,
                                              "error": _describe(exc)}
                    print(f"fastperc bench: {m.id} on {m.provider} failed: {row['error']}", file=sys.stderr)
                document[section].append(row)
                if sink is not None:
                    sink.write(section, row)
                if bar is not None:
                    bar.update()
    except KeyboardInterrupt:
        document["interrupted"] = True
        print("fastperc bench: interrupted; the table and the JSON hold what was measured", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    if sink is not None:
        sink.write("end", {k: document[k] for k in ("not_started", "interrupted") if k in document})
    return document


class OptionError(ValueError):
    """A bad option value: reported as one line, exit status 2."""


def _names(values: list[str] | None, known: list[str], option: str) -> list[str] | None:
    """Comma-separated (or space-separated) names, each one of ``known``; None if not given."""
    if values is None:
        return None
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            if name not in known:
                raise OptionError(f"{option}: unknown name {name!r} (expected a comma-separated list of "
                                  f"{', '.join(known)})")
            if name not in names:
                names.append(name)
    if not names:
        raise OptionError(f"{option}: expected a comma-separated list of {', '.join(known)}, got nothing")
    return names


def _deadline(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:  # NaN too
        raise OptionError(f"--deadline: expected a number of seconds >= 0, got {value!r}")
    return seconds


def _writable(path: Path, option: str) -> None:
    """Creates the parent folder; raises OptionError naming the path if it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with path.open("a"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise OptionError(f"{option}: cannot write {path} ({exc.strerror or exc})") from None


def selection_from(args: argparse.Namespace) -> Selection:
    ops = _names(args.ops, list(ALL), "--ops") or list(ALL)
    if args.no_end_to_end:
        ops = [op for op in ops if op not in end_to_end.TASKS]
    providers = _names(args.providers, op_cases.known_providers(), "--providers")
    dtypes = _names(args.dtypes, list(op_cases.DTYPES), "--dtypes")
    return Selection(ops=tuple(ops), providers=None if providers is None else tuple(providers),
                     dtypes=None if dtypes is None else tuple(op_cases.DTYPES[d] for d in dtypes),
                     quick=args.quick)


def _unavailable(device: str, selection: Selection) -> list[str]:
    """The providers asked for that run no case of the selection here."""
    if selection.providers is None:
        return []
    wanted = list(selection.providers)
    runs = set()
    for op in selection.ops:
        if op in op_cases.SPECS:
            runs.update(op_cases.providers(device, op_cases.SPECS[op], wanted))
    if any(op in end_to_end.TASKS for op in selection.ops):
        runs.update(end_to_end.op_provider(p, device) for p in end_to_end.providers(device, wanted))
    return [p for p in wanted if p not in runs]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="one small shape per op, fewer rounds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    parser.add_argument("--ops", nargs="+", default=None, metavar="OP[,OP...]",
                        help=f"only these ops and end-to-end tasks (default: all): {', '.join(ALL)}")
    parser.add_argument("--providers", nargs="+", default=None, metavar="P[,P...]",
                        help="only these providers: " + ", ".join(op_cases.known_providers())
                             + " (default: eager, compile on CUDA, fastperc's native backends, the ops' competitors)")
    parser.add_argument("--dtypes", nargs="+", default=None, metavar="D[,D...]",
                        help="only these input dtypes: bf16, fp16, fp32, in this order (default: fp32, "
                             "and bf16 on CUDA)")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the network benchmarks")
    parser.add_argument("--deadline", default=None, metavar="SECONDS",
                        help="start no measurement later than this after the start; what was measured "
                             "is still reported (exit status 0)")
    parser.add_argument("--jsonl", type=Path, default=None, metavar="FILE",
                        help="also append every row to FILE as it is measured, one JSON object a line")


def main(args: argparse.Namespace) -> int:
    """``fastperc bench``; bad options end with one line on stderr and exit status 2."""
    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise OptionError("--device cuda: torch sees no CUDA device")
        selection = selection_from(args)
        deadline = _deadline(args.deadline)
        for path, option in ((args.out, "--out"), (args.jsonl, "--jsonl")):
            if path is not None:
                _writable(path, option)
    except OptionError as exc:
        print(f"fastperc bench: error: {exc}", file=sys.stderr)
        return 2
    for provider in _unavailable(device, selection):
        print(f"fastperc bench: note: {provider} runs none of the selected cases on {device} here; "
              "its rows are left out", file=sys.stderr)
    sink = JsonlWriter(args.jsonl.open("a")) if args.jsonl is not None else None
    try:
        document = run(device, selection, deadline=deadline, sink=sink)
    finally:
        if sink is not None:
            sink.close()
    print(format_table(document))
    if args.out is not None:
        args.out.write_text(json.dumps(document, indent=1) + "\n")
        print(f"results written to {args.out}")
    return 1 if document["errors"] else 0
