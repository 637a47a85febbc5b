"""`fastperc train` in-process: a messy dataset, the run directory, resume, the final model in a
pytorch/examples network, --epochs, refusal to clobber, a non-finite loss."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image

from fastperc.checkpoints import load_checkpoint
from fastperc.commands.data import ResumableSampler
from fastperc.models.transformer import TransformerNet
from test_cli_support import (assert_one_line_error, last_line, load_examples_model, make_dataset, make_style,
                              read_log, run_main, train_argv)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-inputs")
    return make_style(root / "style.png"), make_dataset(root / "clean", n=4), make_dataset(root / "messy", messy=True)


def _tree_digest(path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_messy_folder_with_workers(inputs, tmp_path, capsys):
    """Grayscale, RGBA and nested WebP images train; the corrupt file is skipped at the scan, the
    truncated JPEG when a worker process fails to decode it; both are named and counted."""
    style, _, messy = inputs
    run = tmp_path / "run"
    # 7 images pass the scan (4 RGB, gray, RGBA, nested WebP) + truncated.jpg = 8 = 4 steps of 2.
    code, out, err = run_main(train_argv(style, messy, run, "--workers", "2", iterations=4), capsys)
    assert code == 0, err
    assert f"skipping {messy / 'corrupt.jpg'}" in err
    assert f"skipping {messy / 'truncated.jpg'}" in err and "truncated" in err
    assert "notes.txt" not in err
    assert "skipped 2 unreadable image files" in err
    assert "model.pth" in out

    log = read_log(run)
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    for e in log:
        assert {"step", "loss", "content", "style", "tv", "images_per_s", "world_size"} <= set(e)
        assert e["world_size"] == 1 and e["images_per_s"] > 0
        assert abs(e["loss"] - (e["content"] + e["style"] + e["tv"])) <= 1e-5 * abs(e["loss"])
    with Image.open(run / "loss.png") as png:
        assert png.format == "PNG"

    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] == 4
    assert set(ckpt) >= {"model", "optimizer", "scaler", "step", "args", "rng"}
    assert ckpt["args"]["dataset"] == str(messy) and ckpt["args"]["iterations"] == 4
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor)
    json.dumps(ckpt["args"])  # the settings are plain data: strings, numbers, booleans, None
    assert ckpt["args"]["vgg_weights"] == "random" and ckpt["args"]["workers"] == 2
    assert not list(run.glob(".*tmp*")), "temporary files left behind"


def test_resume_matches_uninterrupted_run(inputs, tmp_path, capsys):
    style, clean, _ = inputs
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_main(train_argv(style, clean, whole, iterations=4), capsys)[0] == 0
    assert run_main(train_argv(style, clean, split, iterations=2), capsys)[0] == 0
    assert load_checkpoint(split / "checkpoint.pt")["step"] == 2
    # Only --out, --resume and the new --iterations: the rest comes from the checkpoint.
    code, _, err = run_main(["train", "--out", split, "--resume", "--iterations", "4"], capsys)
    assert code == 0, err
    assert "resuming at step 2" in err

    log_whole, log_split = read_log(whole), read_log(split)
    assert [e["step"] for e in log_split] == [1, 2, 3, 4]
    for a, b in zip(log_whole, log_split):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    a, b = torch.load(whole / "model.pth"), torch.load(split / "model.pth")  # plain state dicts
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)

    # model.pth is what pytorch/examples' eval loads, and its network computes what ours does.
    examples = load_examples_model(split / "model.pth")
    ours = TransformerNet.load(split / "model.pth").eval()
    x = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        torch.testing.assert_close(ours(x), examples(x), rtol=1e-4, atol=1e-3)


def test_resume_at_another_batch_size_says_the_data_order_changes(inputs, tmp_path, capsys):
    style, clean, _ = inputs
    run = tmp_path / "run"
    assert run_main(train_argv(style, clean, run, iterations=1), capsys)[0] == 0
    code, _, err = run_main(["train", "--out", run, "--resume", "--iterations", "2", "--batch-size", "1"], capsys)
    assert code == 0, err
    assert "saved at batch 2 x 1 processes and resumes at 1 x 1" in err
    code, _, err = run_main(["train", "--out", run, "--resume", "--iterations", "3"], capsys)
    assert code == 0, err
    assert "another order" not in err  # the checkpoint now holds the new batch size


def test_sampler_resumes_the_data_order():
    full = ResumableSampler(10, batch_size=2, seed=3)
    assert full.steps_per_epoch == 5
    order = []
    for epoch in range(2):
        full.set_position(epoch, 0)
        order += list(full)
    assert sorted(order[:10]) == list(range(10)) and order[:10] != order[10:]
    resumed = ResumableSampler(10, batch_size=2, seed=3)
    resumed.set_position(1, 2)  # step 7 = epoch 1, step 2
    assert list(resumed) == order[14:]
    # Two processes split each global batch: together they read what one process with batch 4 reads.
    r0, r1 = (list(ResumableSampler(10, batch_size=2, seed=3, rank=r, world_size=2)) for r in (0, 1))
    one = list(ResumableSampler(10, batch_size=4, seed=3))
    assert len(r0) == len(r1) == 4
    for step in range(2):
        assert r0[2 * step: 2 * step + 2] + r1[2 * step: 2 * step + 2] == one[4 * step: 4 * step + 4]
    # A dataset smaller than a batch is repeated to fill it.
    assert len(list(ResumableSampler(3, batch_size=4, seed=0))) == 4


def test_epochs_amp_then_refuses_to_clobber_the_run(inputs, tmp_path, capsys):
    style, clean, _ = inputs
    run = tmp_path / "run"
    # Also mixed precision and channels_last (bf16 autocast runs on the CPU too).
    code, _, err = run_main(train_argv(style, clean, run, "--epochs", "2", "--amp", "bf16", "--channels-last",
                                       iterations=None), capsys)
    assert code == 0, err
    assert read_log(run)[-1]["step"] == 4  # 4 images, batch 2: 2 steps per epoch
    assert load_checkpoint(run / "checkpoint.pt")["args"]["amp"] == "bf16"

    before = _tree_digest(run)
    code, _, err = run_main(train_argv(style, clean, run, iterations=3), capsys)
    assert_one_line_error(code, err, str(run), "already holds a run", "--resume")
    assert _tree_digest(run) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(inputs, tmp_path, capsys):
    style, clean, _ = inputs
    run = tmp_path / "run"
    # A style weight beyond float32's range makes the loss infinite at the first step.
    code, _, err = run_main(train_argv(style, clean, run, "--style-weight", "1e45", "--checkpoint-every", "1"),
                            capsys)
    assert code == 1
    assert "Traceback" not in err
    assert "non-finite loss at step 1" in last_line(err)
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 0
    assert not (run / "model.pth").exists()

