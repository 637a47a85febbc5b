"""The results document of ``fastperc bench``: its fields, its streamed form, merging, the table.

The document (one JSON file per run; GPU runs are committed under benchmarks/results/):

    device, torch, triton, cuda, commit, date (ISO),
    ceilings   {copy_GBps, bf16_TFLOPs},
    results    [{op, shape, dtype, mode, layout, provider, median_ms, GBps, TFLOPs, precision}],
    end_to_end [{task, size [H, W], batch, provider, median_ms, peak_mem_MB, precision}],
    errors     [{section, id, provider, error}]: measurements that raised (the run went on),
    not_started  the number of measurements a deadline left out (0: all of them ran),
    interrupted  true where an interrupt ended the run early (absent otherwise),

``precision`` is on float32 rows only: "tf32" or "ieee", the precision the provider's
convolutions and matrix products ran in (fastperc.bench.precision). benchmarks/gpu_suite.sh
adds ``tests`` {passed, failed, errors, skipped} of its CUDA test run and ``phases``
{name: {status, seconds}}.

The streamed form (``fastperc bench --jsonl FILE``): one JSON object per line, each flushed as
it is written, so that a run cut at any moment leaves every row it measured:
``{"section": "meta", <every field above but the row lists>}`` first, then one
``{"section": S, **row}`` per row, S one of "results", "end_to_end", "errors", and last, if
the run got to its end, ``{"section": "end", "not_started": n[, "interrupted": true]}``. Runs
append to the file, each starting with its meta line.
"""
from __future__ import annotations

import datetime
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import torch

from fastperc.bench.cases import BACKENDS, SPECS, known_providers
from fastperc.bench.timing import copy_bandwidth_GBps, matmul_TFLOPs

SECTIONS = ("results", "end_to_end", "errors")


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


def new_document(device: str) -> dict:
    """An empty document for a run on ``device``: the machine, versions, commit, date and the
    ceilings measured now (on a CPU the matmul ceiling is an fp32 product)."""
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        **_versions(),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ceilings": {"copy_GBps": copy_bandwidth_GBps(device), "bf16_TFLOPs": matmul_TFLOPs(device)},
        **{section: [] for section in SECTIONS},
        "not_started": 0,
    }


def meta(document: dict) -> dict:
    """The document without its row lists."""
    return {k: v for k, v in document.items() if k not in SECTIONS}


class JsonlWriter:
    """The streamed form: ``write`` appends one line and flushes it."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, section: str, record: dict) -> None:
        self.stream.write(json.dumps({"section": section, **record}) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()


def json_lines(path: Path) -> Iterator[dict]:
    """The objects of a JSON-lines file, but a line cut off mid-write (its writer was killed)."""
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


def read_jsonl(path: Path) -> list[dict]:
    """The documents a streamed file holds, one per run that appended to it."""
    documents: list[dict] = []
    for record in json_lines(path):
        section = record.pop("section", None)
        if section == "meta":
            documents.append({"not_started": 0, **record, **{s: [] for s in SECTIONS}})
        elif documents and section in SECTIONS:
            documents[-1][section].append(record)
        elif documents and section == "end":
            documents[-1].update(record)
    return documents


def merge(documents: list[dict]) -> dict:
    """One document from several runs on the same machine: the first one's machine, versions,
    commit and date; each ceiling the highest measured; the rows in order; ``not_started``
    summed."""
    if not documents:
        raise ValueError("merge: no documents")
    merged = {**meta(documents[0]), **{s: [] for s in SECTIONS}}
    merged["ceilings"] = {k: max(d["ceilings"][k] for d in documents) for k in documents[0]["ceilings"]}
    merged["not_started"] = sum(d.get("not_started", 0) for d in documents)
    for d in documents:
        for s in SECTIONS:
            merged[s] += d.get(s, [])
    return merged


@dataclass(frozen=True)
class Comparison:
    """One (op, shape, layout, dtype, mode): each provider's row and fastperc's best backend."""

    op: str
    shape: tuple
    layout: str
    dtype: str
    mode: str
    rows: dict  # provider -> row
    best: str | None  # the fastest of fastperc's backends measured

    def speedup(self, over: str) -> float | None:
        """How many times faster fastperc's best backend ran than ``over`` (None if either is missing)."""
        if self.best is None or over not in self.rows:
            return None
        return self.rows[over]["median_ms"] / self.rows[self.best]["median_ms"]


def comparisons(document: dict) -> list[Comparison]:
    """The op rows grouped by (op, shape, layout, dtype, mode), ops in the order of
    fastperc.bench.cases.SPECS."""
    groups: dict[tuple, dict] = {}
    for r in document["results"]:
        key = (r["op"], tuple(r["shape"]), r.get("layout", "nchw"), r["dtype"], r["mode"])
        groups.setdefault(key, {})[r["provider"]] = r
    order = {name: i for i, name in enumerate(SPECS)}
    out = []
    for (op, shape, layout, dtype, mode), rows in sorted(groups.items(), key=lambda kv: order.get(kv[0][0], len(order))):
        fused = {p: r for p, r in rows.items() if p in BACKENDS}
        best = min(fused, key=lambda p: fused[p]["median_ms"]) if fused else None
        out.append(Comparison(op, shape, layout, dtype, mode, rows, best))
    return out


def _fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(document: dict) -> str:
    """One line per (op, shape, layout, dtype, mode): median ms per provider (* where float32
    ran in TF32), fastperc's best speedup over eager and over compile, and its GB/s or TFLOP/s
    as a fraction of the ceiling; then the end-to-end rows, the errors and what a deadline
    left out."""
    known = known_providers()
    providers = sorted({r["provider"] for r in document["results"]},
                       key=lambda p: known.index(p) if p in known else len(known))
    ceilings = document["ceilings"]
    head = ["op", "shape", "layout", "dtype", "mode"] + [f"{p} ms" for p in providers] + \
           ["x eager", "x compile", "best", "rate", "of ceiling"]
    lines = [head]
    for c in comparisons(document):
        best = c.rows.get(c.best)
        rate, fraction = "-", "-"
        if best is not None and best["TFLOPs"]:
            rate, fraction = f"{best['TFLOPs']:.3g} TF/s", f"{best['TFLOPs'] / ceilings['bf16_TFLOPs']:.0%}"
        elif best is not None and best["GBps"]:
            rate, fraction = f"{best['GBps']:.3g} GB/s", f"{best['GBps'] / ceilings['copy_GBps']:.0%}"
        cells = []
        for p in providers:
            r = c.rows.get(p)
            cells.append("-" if r is None else _fmt(r["median_ms"]) + ("*" if r.get("precision") == "tf32" else ""))
        lines.append([c.op, "x".join(map(str, c.shape)), c.layout, c.dtype, c.mode] + cells
                     + [_fmt(c.speedup("eager"), ".2f"), _fmt(c.speedup("compile"), ".2f"), c.best or "-",
                        rate, fraction])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    text = [f"device {document['device']}, torch {document['torch']}, triton {document['triton']}, "
            f"{document['date']}; ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, "
            f"matmul {ceilings['bf16_TFLOPs']:.3g} TFLOP/s"]
    if len(lines) > 1:
        text += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines]
        if any(r.get("precision") == "tf32" for r in document["results"]):
            text.append("* float32 convolutions or matrix products in TF32")
    if document["end_to_end"]:
        text.append("")
        text.append("end to end: task, size, batch, provider, median ms, peak MB")
        for r in document["end_to_end"]:
            text.append(f"{r['task']:<11} {r['size'][0]}x{r['size'][1]:<6} {r['batch']:<3} "
                        f"{r['provider']:<22} {r['median_ms']:10.2f} {_fmt(r['peak_mem_MB'], '.0f'):>8}"
                        + ("  tf32" if r.get("precision") == "tf32" else ""))
    for e in document.get("errors", []):
        text.append(f"error: {e['id']} on {e['provider']}: {e['error']}")
    if document.get("not_started"):
        text.append(f"not started (deadline): {document['not_started']} measurements")
    return "\n".join(text)
