"""The Python steps of benchmarks/gpu_suite.sh, the one time-boxed call on the GPU machine.

    python -m fastperc.bench.suite build-cuda    build fastperc._C just in time (exit 1, saying why, if it cannot)
    python -m fastperc.bench.suite finish OUT    OUT/results.json from what the phases left in OUT; print the table

``finish`` reads what the suite's phases write as they go, and works on whatever a cut run left
(run it again on a copy of OUT):

- OUT/rows.jsonl: every ``fastperc bench`` run's rows (fastperc.bench.report's streamed form);
- OUT/phases.jsonl: one line per phase, {"name", "status" (ok, failed, timeout, skipped),
  "seconds", "note"};
- OUT/tests*.xml: the JUnit XML of the test phases.

It writes OUT/results.json: the merged document (fastperc.bench.report) with ``tests``
{passed, failed, errors, skipped} summed over the XML files (absent if none was written) and
``phases`` {name: {status, seconds, note}}.
"""
from __future__ import annotations

import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from fastperc.bench.report import SECTIONS, format_table, json_lines, merge, read_jsonl

COUNTS = ("passed", "failed", "errors", "skipped")


def test_counts(paths: list[Path]) -> dict | None:
    """{passed, failed, errors, skipped} summed over pytest's JUnit XML files; None if none
    could be read (a test run killed before pytest wrote its file)."""
    total = dict.fromkeys(COUNTS, 0)
    read = False
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            continue
        read = True
        for suite in root.iter("testsuite"):
            tests, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
            total["failed"] += failed
            total["errors"] += errors
            total["skipped"] += skipped
            total["passed"] += tests - failed - errors - skipped
    return total if read else None


def read_phases(path: Path) -> dict:
    """{name: {status, seconds, note}} from the suite's phase lines (a cut-off line is dropped)."""
    return {r.pop("name"): r for r in json_lines(path) if "name" in r} if path.is_file() else {}


def finish(out: Path) -> dict:
    """Assemble OUT/results.json; returns the document."""
    rows = out / "rows.jsonl"
    documents = read_jsonl(rows) if rows.is_file() else []
    if documents:
        document = merge(documents)
    else:  # no bench run got as far as its first line
        document = {"device": None, "ceilings": None, **{s: [] for s in SECTIONS}, "not_started": 0}
    tests = test_counts(sorted(out.glob("tests*.xml")))
    if tests is not None:
        document["tests"] = tests
    document["phases"] = read_phases(out / "phases.jsonl")
    (out / "results.json").write_text(json.dumps(document, indent=1) + "\n")
    return document


def summary(document: dict) -> str:
    """The table (where a bench run started), then the test counts and the phases."""
    lines = [format_table(document)] if document.get("ceilings") else ["no benchmark rows"]
    tests = document.get("tests")
    lines.append("tests: " + (", ".join(f"{tests[k]} {k}" for k in COUNTS) if tests else "no JUnit XML"))
    for name, p in document["phases"].items():
        lines.append(f"phase {name:<10} {p.get('status', '?'):<8} {p.get('seconds', 0):>5} s  {p.get('note', '')}")
    return "\n".join(lines)


def build_cuda() -> int:
    """Build the cuda backend's extension with the just-in-time route (into $FASTPERC_CACHE_DIR),
    where it can be built; one line saying why not otherwise."""
    from fastperc import _cuda_ext

    reason = _cuda_ext.jit_unavailable_reason()
    if reason is not None:
        print(f"fastperc._C not built: {reason}", flush=True)
        return 1
    start = time.perf_counter()
    _cuda_ext.jit_build(verbose=True)
    print(f"fastperc._C built in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


def main(argv: list[str]) -> int:
    if argv == ["build-cuda"]:
        return build_cuda()
    if len(argv) == 2 and argv[0] == "finish":
        print(summary(finish(Path(argv[1]))))
        return 0
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    print(__doc__.strip().splitlines()[3].strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
