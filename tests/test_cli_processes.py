"""`fastperc train` as real processes: killed with SIGKILL, stopped with SIGINT and SIGTERM, and
resumed; two processes under torchrun (gloo on the CPU)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from fastperc.checkpoints import load_checkpoint
from test_cli_support import (ROOT, last_line, make_dataset, make_style, python_m, read_log, run_main,
                              subprocess_env, train_argv)


@pytest.fixture()
def inputs(tmp_path):
    return make_style(tmp_path / "style.png"), make_dataset(tmp_path / "data", n=4)


def _start(argv: list, log_file) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastperc", *map(str, argv)], stdout=log_file,
                            stderr=subprocess.STDOUT, env=subprocess_env(), cwd=ROOT)


def _wait_for_steps(proc: subprocess.Popen, run, more_than: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        log = run / "log.jsonl"
        if log.exists() and sum(1 for line in log.read_text().splitlines() if line.endswith("}")) > more_than:
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail("training made no progress")


def test_sigkill_sigint_sigterm_and_resume(inputs, tmp_path, capsys):
    style, data = inputs
    run = tmp_path / "run"
    out = open(tmp_path / "output.txt", "w")
    # 1. SIGKILL at an arbitrary moment (checkpoints every step, so often mid-save).
    proc = _start(train_argv(style, data, run, "--checkpoint-every", "1", iterations=10_000), out)
    _wait_for_steps(proc, run, 2)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = load_checkpoint(run / "checkpoint.pt")["step"]
    assert killed_at >= 2

    # 2. and 3. SIGINT, then SIGTERM: a checkpoint of the step reached, exit 128 + signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = _start(["train", "--out", run, "--resume", "--checkpoint-every", "1000"], out)
        before = len(read_log(run)) if (run / "log.jsonl").exists() else 0
        _wait_for_steps(proc, run, before + 1)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == 128 + sig
        step = load_checkpoint(run / "checkpoint.pt")["step"]
        assert step == read_log(run)[-1]["step"] > killed_at
    out.close()
    text = (tmp_path / "output.txt").read_text()
    assert "Traceback" not in text
    assert "stopped by SIGINT" in text and "stopped by SIGTERM" in last_line(text)

    # 4. Resume to the end: every step logged once, in order.
    code, _, err = run_main(["train", "--out", run, "--resume", "--iterations", step + 2], capsys)
    assert code == 0, err
    assert [e["step"] for e in read_log(run)] == list(range(1, step + 3))
    assert load_checkpoint(run / "checkpoint.pt")["step"] == step + 2
    assert (run / "model.pth").is_file()


def test_torchrun_two_processes_gloo(inputs, tmp_path):
    style, data = inputs
    run = tmp_path / "run"
    # 4 images, 2 processes x batch 2: one step per epoch.
    proc = python_m("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastperc",
                    *train_argv(style, data, run, iterations=3), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = read_log(run)
    assert [e["step"] for e in log] == [1, 2, 3]
    assert all(e["world_size"] == 2 for e in log)
    assert proc.stdout.count("trained to step 3") == 1  # rank 0 reports, once
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert (run / "model.pth").is_file() and (run / "loss.png").is_file()
