"""`fastperc bench` on the CPU: the table, the results JSON, the streamed rows, the selection
options, the deadline, a failing measurement, bad options (one line, exit status 2), and the
float32 precision the rows report."""
import dataclasses
import json

import pytest
import torch

from fastperc.bench import cases, precision, report, runner
from fastperc.commands.cli import main

QUICK_LOSSES = ["bench", "--quick", "--ops", "feature_loss,tv_loss"]


def _bench(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_quick_writes_the_results_json(tmp_path, capsys):
    out = tmp_path / "results" / "cpu.json"
    code, table, _ = _bench(["bench", "--quick", "--ops", "feature_loss", "tv_loss,inference,train_step",
                             "--out", out], capsys)
    assert code == 0
    doc = json.loads(out.read_text())
    assert {"device", "torch", "triton", "cuda", "commit", "date", "ceilings", "results", "end_to_end",
            "errors", "not_started"} <= set(doc)
    assert set(doc["ceilings"]) == {"copy_GBps", "bf16_TFLOPs"}
    assert all(v > 0 for v in doc["ceilings"].values())
    assert doc["errors"] == [] and doc["not_started"] == 0
    ops = {(r["op"], r["mode"], r["provider"]) for r in doc["results"]}
    for op in ("feature_loss", "tv_loss"):
        for mode in ("fwd", "fwd+bwd"):
            assert {(op, mode, "eager"), (op, mode, "torch")} <= ops
    for r in doc["results"]:
        assert {"op", "shape", "dtype", "mode", "provider", "median_ms", "GBps", "TFLOPs"} <= set(r)
        assert r["median_ms"] > 0 and r["GBps"] > 0
        assert r["dtype"] == "float32" and r["precision"] == "ieee"  # no TF32 on a CPU
    tasks = {(r["task"], r["provider"]) for r in doc["end_to_end"]}
    assert {("inference", "fastperc-fp32"), ("train_step", "examples-eager-fp32")} <= tasks
    for r in doc["end_to_end"]:
        assert {"task", "size", "batch", "provider", "median_ms", "peak_mem_MB", "precision"} <= set(r)
    assert "feature_loss" in table and "x eager" in table and "end to end" in table


def test_every_row_is_streamed_to_the_jsonl_file(tmp_path, capsys):
    out, stream = tmp_path / "r.json", tmp_path / "rows" / "r.jsonl"
    code, _, _ = _bench(QUICK_LOSSES + ["--providers", "torch", "--out", out, "--jsonl", stream], capsys)
    assert code == 0
    lines = [json.loads(line) for line in stream.read_text().splitlines()]
    assert lines[0]["section"] == "meta" and "ceilings" in lines[0]
    doc = json.loads(out.read_text())
    assert [d["results"] for d in report.read_jsonl(stream)] == [doc["results"]]
    assert {r["provider"] for r in doc["results"]} == {"torch"}
    assert [r["op"] for r in doc["results"]] == ["feature_loss"] * 2 + ["tv_loss"] * 2  # the order of --ops
    assert doc["end_to_end"] == []  # --ops named no end-to-end task
    # A second run appends its own document.
    code, _, _ = _bench(["bench", "--quick", "--ops", "tv_loss", "--providers", "eager", "--jsonl", stream], capsys)
    first, second = report.read_jsonl(stream)
    assert code == 0 and first["results"] == doc["results"]
    assert {(r["op"], r["provider"]) for r in second["results"]} == {("tv_loss", "eager")}


def test_a_row_cut_off_mid_write_is_dropped(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps({"section": "meta", "device": "cpu", "ceilings": {"copy_GBps": 1.0}}) + "\n"
                    + json.dumps({"section": "results", "op": "gram", "median_ms": 1.0}) + "\n"
                    + '{"section": "results", "op": "gr')
    [doc] = report.read_jsonl(path)
    assert doc["device"] == "cpu" and doc["results"] == [{"op": "gram", "median_ms": 1.0}]


def test_no_measurement_starts_after_the_deadline(tmp_path, capsys, monkeypatch):
    """A clock that advances 10 s a reading: the one measurement started at 10 s runs, none
    after 20 s starts; the table and the JSON hold it, and the exit status is 0."""
    ticks = iter(range(0, 10_000, 10))
    monkeypatch.setattr(runner, "_clock", lambda: next(ticks))
    out, stream = tmp_path / "r.json", tmp_path / "r.jsonl"
    code, table, _ = _bench(QUICK_LOSSES + ["--deadline", "15", "--out", out, "--jsonl", stream], capsys)
    assert code == 0
    doc = json.loads(out.read_text())
    total = len(cases.case_providers("cpu", list(cases.iter_cases("cpu", quick=True, ops=["feature_loss", "tv_loss"]))))
    assert len(doc["results"]) == 1 and doc["not_started"] == total - 1
    [streamed] = report.read_jsonl(stream)
    assert len(streamed["results"]) == 1 and streamed["not_started"] == total - 1
    assert "feature_loss" in table and f"not started (deadline): {total - 1}" in table


def test_deadline_zero_measures_nothing_but_still_reports(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, _ = _bench(QUICK_LOSSES + ["--deadline", "0", "--out", out], capsys)
    doc = json.loads(out.read_text())
    assert code == 0 and doc["results"] == [] and doc["not_started"] > 0


def test_a_failing_measurement_is_recorded_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    def broken(*args):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(cases.SPECS, "feature_loss", dataclasses.replace(cases.SPECS["feature_loss"], eager=broken))
    out = tmp_path / "r.json"
    code, table, err = _bench(["bench", "--quick", "--ops", "feature_loss", "--out", out], capsys)
    doc = json.loads(out.read_text())
    assert code == 1
    assert {e["provider"] for e in doc["errors"]} == {"eager"} and len(doc["errors"]) == 2
    assert all("planted failure" in e["error"] for e in doc["errors"])
    assert {r["provider"] for r in doc["results"]} == {"torch"} and len(doc["results"]) == 2
    assert "planted failure" in err and "error: feature_loss" in table


def test_a_provider_that_cannot_run_here_is_left_out_with_a_note(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, err = _bench(["bench", "--quick", "--ops", "tv_loss", "--providers", "eager,cuda", "--out", out],
                          capsys)
    assert code == 0
    assert {r["provider"] for r in json.loads(out.read_text())["results"]} == {"eager"}
    assert "cuda runs none of the selected cases" in err


def test_dtypes_choose_the_input_dtypes_in_their_order():
    selected = list(cases.iter_cases("cpu", quick=True, ops=["gram", "tv_loss"], dtypes=list(cases.DTYPES.values())))
    dtypes = [c.dtype for c in selected]
    assert dtypes == sorted(dtypes, key=list(cases.DTYPES.values()).index)  # bf16 block, fp16, then fp32
    assert {c.op for c in selected if c.dtype == dtypes[0]} == {"gram", "tv_loss"}


def test_one_shape_of_every_op_in_every_dtype_comes_before_a_second_shape():
    bf16, fp32 = cases.DTYPES["bf16"], cases.DTYPES["fp32"]
    order = [(c.op, c.dtype) for c in cases.iter_cases("cpu", ops=["gram", "feature_loss"], dtypes=[bf16, fp32])
             if c.mode == "fwd"]
    assert order[:4] == [("gram", bf16), ("feature_loss", bf16), ("gram", fp32), ("feature_loss", fp32)]
    assert order[4:6] == [("gram", bf16), ("gram", fp32)] and len(order) == 4 + 2 * (len(cases.SPECS["gram"].shapes) - 1)


@pytest.mark.parametrize("argv,needles", [
    (["--ops", "gram,nope"], ["--ops", "'nope'"]),
    (["--providers", "gpu"], ["--providers", "'gpu'"]),
    (["--dtypes", "fp8"], ["--dtypes", "'fp8'"]),
    (["--dtypes", ","], ["--dtypes", "got nothing"]),
    (["--deadline", "-1"], ["--deadline", "'-1'"]),
    (["--deadline", "soon"], ["--deadline", "'soon'"]),
    (["--jsonl", "{tmp}/a_file/rows.jsonl"], ["--jsonl", "{tmp}/a_file/rows.jsonl", "cannot write"]),
    (["--out", "{tmp}/a_file/r.json"], ["--out", "{tmp}/a_file/r.json", "cannot write"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v[0].startswith("--") else None)
def test_bad_options_are_one_line_errors(argv, needles, tmp_path, capsys):
    (tmp_path / "a_file").write_text("a file, not a folder\n")
    code, out, err = _bench(["bench", "--quick"] + [a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    for needle in needles:
        assert needle.format(tmp=tmp_path) in err


_PRECISION_SETTINGS = [("", "fp32_precision"), ("cuda.matmul", "fp32_precision"), ("cudnn", "fp32_precision"),
                       ("cudnn.conv", "fp32_precision"), ("cudnn.rnn", "fp32_precision")]


@pytest.fixture
def restore_precision_settings():
    """Restores torch's float32 precision settings through the new API, which leaves the legacy
    flags readable again."""
    def node(path):
        obj = torch.backends
        for name in filter(None, path.split(".")):
            obj = getattr(obj, name)
        return obj

    saved = [(node(p), a, getattr(node(p), a)) for p, a in _PRECISION_SETTINGS if hasattr(node(p), a)]
    yield
    for obj, attr, value in saved:
        setattr(obj, attr, value)


def test_fp32_rows_say_which_precision_their_products_ran_in(restore_precision_settings):
    """Nothing runs: the rows' precision comes from the op, the provider and torch's settings."""
    conv = cases.Case(cases.SPECS["upsample_conv2d"], "up1", (1, 8, 4, 4), torch.float32, "fwd", "cuda")
    gram = dataclasses.replace(conv, spec=cases.SPECS["gram"])
    norm = dataclasses.replace(conv, spec=cases.SPECS["instance_norm_relu"])
    backends = torch.backends
    if not hasattr(backends.cudnn.conv, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no per-backend fp32_precision")
    backends.cudnn.conv.fp32_precision = "tf32"  # cuDNN's default
    backends.cuda.matmul.fp32_precision = "ieee"
    assert [conv.precision(p) for p in ("eager", "compile", "torch", "triton")] == ["tf32", "tf32", "tf32", "ieee"]
    assert gram.precision("eager") == gram.precision("triton") == "ieee"
    assert norm.precision("eager") == norm.precision("cuda") == "ieee"
    backends.cuda.matmul.fp32_precision = "tf32"  # reading allow_tf32 now raises in torch >= 2.9
    assert conv.precision("triton") == gram.precision("eager") == "tf32" and norm.precision("triton") == "ieee"
    backends.cudnn.conv.fp32_precision = "ieee"
    assert conv.precision("eager") == "ieee"
    assert dataclasses.replace(conv, dtype=torch.bfloat16).precision("eager") is None
    assert dataclasses.replace(conv, device="cpu").precision("triton") == "ieee"  # no TF32 on a CPU


def test_precision_reads_the_legacy_flags_too(restore_precision_settings):
    torch.backends.cudnn.allow_tf32 = False
    assert not precision.conv_tf32() and precision.fp32_precision(("conv",), "cuda") == "ieee"
    torch.backends.cudnn.allow_tf32 = True
    assert precision.conv_tf32() and precision.fp32_precision(("matmul", "conv"), "cuda") == "tf32"
    with pytest.raises(ValueError, match="unit"):
        precision.tf32("tensor-core")
