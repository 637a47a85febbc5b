"""`fastperc sr-train`: a tiny CPU run with each loss, resuming, the model it writes, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from fastperc.commands.upscale import load_sr_model
from test_cli_support import assert_one_line_error, make_dataset, noise_image, run_main


def _argv(dataset, out, *extra, scale=4, iterations=2, size=20):
    return ["sr-train", "--scale", scale, "--dataset", dataset, "--out", out, "--iterations", iterations,
            "--batch-size", "2", "--image-size", size, "--vgg-weights", "random", "--workers", "0",
            "--device", "cpu", "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sr-data") / "data")


@pytest.mark.parametrize("loss,scale,size", [("perceptual", 4, 20), ("pixel", 8, 40)])
def test_train_writes_a_usable_model(dataset, tmp_path, capsys, loss, scale, size):
    run = tmp_path / "run"
    code, stdout, err = run_main(_argv(dataset, run, "--loss", loss, scale=scale, size=size), capsys)
    assert code == 0, err
    assert "trained to step 2" in stdout
    for name in ("checkpoint.pt", "log.jsonl", "loss.png", "model.pth"):
        assert (run / name).is_file(), name
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and all(e["loss"] > 0 for e in log)
    net = load_sr_model(run / "model.pth")
    assert net.scale == scale
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["args"]["loss"] == loss
    src, out = tmp_path / "lr.png", tmp_path / "sr.png"
    noise_image((6, 5), 1).save(src)
    code, _, err = run_main(["upscale", "--model", run / "model.pth", src, "--out", out], capsys)
    assert code == 0, err


def test_pixel_loss_decreases(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_main(_argv(dataset, run, "--loss", "pixel", "--lr", "3e-4", iterations=12), capsys)
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.6 * sum(losses[:3])


def test_resume_matches_an_uninterrupted_run(dataset, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(_argv(dataset, straight, "--loss", "pixel", iterations=3), capsys)[0] == 0
    assert run_main(_argv(dataset, split, "--loss", "pixel", iterations=2), capsys)[0] == 0
    code, _, err = run_main(["sr-train", "--out", split, "--resume", "--iterations", "3"], capsys)
    assert code == 0, err
    a = torch.load(straight / "model.pth", weights_only=True)
    b = torch.load(split / "model.pth", weights_only=True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    steps = [json.loads(line)["step"] for line in (split / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_bad_input(dataset, tmp_path, capsys):
    def check(argv, *needles):
        assert_one_line_error(*run_main(argv, capsys)[::2], *needles)

    check(_argv(dataset, tmp_path / "r", scale=3), "--scale", "4 or 8")
    check(_argv(tmp_path / "nope", tmp_path / "r"), "nope", "no such directory")
    check(_argv(dataset, tmp_path / "r", size=22), "--image-size", "multiple of the scale 4")
    check(_argv(dataset, tmp_path / "r", size=16), "--image-size", "at least 20")
    check(_argv(dataset, tmp_path / "r", "--loss", "l1"), "--loss", "perceptual")
    check(["sr-train", "--out", tmp_path / "r", "--dataset", dataset], "--scale 4|8 is required")
    check(["sr-train", "--out", tmp_path / "none", "--resume"], "no checkpoint to resume")
    run = tmp_path / "run"
    assert run_main(_argv(dataset, run, "--loss", "pixel", iterations=1), capsys)[0] == 0
    check(_argv(dataset, run, "--loss", "pixel"), "already holds a run", "--resume")
    empty = tmp_path / "empty"
    empty.mkdir()
    check(_argv(empty, tmp_path / "r2"), "no readable images")
