"""benchmarks/gpu_suite.sh, which has one time-boxed call on the GPU machine to get right, run
here first: its dry run (the same phases on the CPU, small caps) and its Python steps
(fastperc.bench.suite)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastperc.bench import report, suite

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"
OUT_FILES = {"suite.log", "cuda_build.log", "phases.jsonl", "rows.jsonl", "tests.xml", "tests_cuda.xml",
             "results.json", "chart.png"}
needs_shell = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and coreutils' timeout")


def _suite(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPERC_BACKEND")}
    full_env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", str(SCRIPT), *args, str(out)], env=full_env, capture_output=True, text=True,
                          timeout=240)


@needs_shell
def test_the_dry_run_leaves_its_results_and_a_cut_phase_keeps_its_rows(tmp_path):
    """The per-op phase runs without a deadline and is cut by its 10 s timeout: the rows it
    streamed before the cut are in results.json; the compile phase (deadline 0) starts nothing."""
    out = tmp_path / "out"
    done = _suite(out, "--dry-run", FASTPERC_SUITE_CAPS="ops=10", FASTPERC_SUITE_SLACK="ops=off")
    assert done.returncode == 0, done.stdout + done.stderr
    files = {p.name for p in out.iterdir()}
    assert files <= OUT_FILES and len(files) <= 8 and all(p.is_file() for p in out.iterdir())
    assert {"suite.log", "phases.jsonl", "rows.jsonl", "tests.xml", "results.json", "chart.png"} <= files

    doc = json.loads((out / "results.json").read_text())
    assert doc["tests"]["passed"] >= 1 and doc["tests"]["skipped"] >= 1  # the GPU-only cases skip here
    assert doc["tests"]["failed"] == 0 and doc["tests"]["errors"] == 0
    phases = doc["phases"]
    assert list(phases) == ["env", "install", "tests", "cuda_build", "cuda_tests", "ops", "e2e", "compile"]
    assert phases["ops"]["status"] == "timeout" and phases["tests"]["status"] == "ok"
    assert phases["cuda_build"]["status"] == "failed" and "CPU build" in phases["cuda_build"]["note"]
    assert phases["compile"]["status"] == "ok"

    ops, e2e, compiled = report.read_jsonl(out / "rows.jsonl")
    assert ops.get("interrupted") and ops["results"], "the cut phase streamed no row"
    assert doc["results"][:len(ops["results"])] == ops["results"]
    assert compiled["results"] == [] and compiled["not_started"] > 0
    assert doc["not_started"] >= compiled["not_started"]
    assert {r["provider"] for r in doc["results"]} == {"eager"}  # triton and cuda do not run here
    for r in doc["results"]:
        assert (r.get("precision") == "ieee") == (r["dtype"] == "float32")
    assert "phase compile: ok" in done.stdout and "tests: " in done.stdout
    assert "fastperc bench: interrupted" in (out / "suite.log").read_text()


@needs_shell
def test_the_suite_refuses_an_output_folder_in_use(tmp_path):
    (tmp_path / "old.json").write_text("{}\n")
    done = _suite(tmp_path, "--dry-run")
    assert done.returncode == 2 and "not empty" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_test_counts_sum_the_junit_files_and_skip_a_missing_one(tmp_path):
    (tmp_path / "a.xml").write_text('<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/>'
                                    '</testsuites>')
    (tmp_path / "b.xml").write_text('<testsuite tests="3" failures="0" errors="0" skipped="1"/>')
    (tmp_path / "cut.xml").write_text('<testsuite tests="3"')  # killed mid-write
    counts = suite.test_counts([tmp_path / "a.xml", tmp_path / "b.xml", tmp_path / "cut.xml", tmp_path / "none.xml"])
    assert counts == {"passed": 5, "failed": 1, "errors": 1, "skipped": 3}
    assert suite.test_counts([tmp_path / "none.xml"]) is None


def test_finish_on_a_run_cut_before_any_benchmark(tmp_path):
    (tmp_path / "phases.jsonl").write_text(json.dumps({"name": "env", "status": "ok", "seconds": 1, "note": ""})
                                           + "\n" + '{"name": "install", "sta')
    doc = suite.finish(tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == doc
    assert doc["results"] == [] and "tests" not in doc and list(doc["phases"]) == ["env"]
    assert "no benchmark rows" in suite.summary(doc)
