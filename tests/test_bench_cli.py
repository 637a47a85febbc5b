"""`fastperc bench --quick` on the CPU: it runs, prints the table and writes the results JSON
with the fields of the benchmarks issue."""
import json

from fastperc import cli


def test_bench_quick_writes_the_results_json(tmp_path, capsys):
    out = tmp_path / "results" / "cpu.json"
    assert cli.main(["bench", "--quick", "--ops", "feature_loss", "tv_loss", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"device", "torch", "triton", "cuda", "commit", "date", "ceilings", "results", "end_to_end"} <= set(report)
    assert set(report["ceilings"]) == {"copy_GBps", "bf16_TFLOPs"}
    assert all(v > 0 for v in report["ceilings"].values())
    ops = {(r["op"], r["mode"], r["provider"]) for r in report["results"]}
    for op in ("feature_loss", "tv_loss"):
        for mode in ("fwd", "fwd+bwd"):
            assert {(op, mode, "eager"), (op, mode, "torch")} <= ops
    for r in report["results"]:
        assert {"op", "shape", "dtype", "mode", "provider", "median_ms", "GBps", "TFLOPs"} <= set(r)
        assert r["median_ms"] > 0 and r["GBps"] > 0
    tasks = {(r["task"], r["provider"]) for r in report["end_to_end"]}
    assert {("inference", "fastperc-fp32"), ("train_step", "examples-eager-fp32")} <= tasks
    for r in report["end_to_end"]:
        assert {"task", "size", "batch", "provider", "median_ms", "peak_mem_MB"} <= set(r)
    table = capsys.readouterr().out
    assert "feature_loss" in table and "x eager" in table and "end to end" in table
