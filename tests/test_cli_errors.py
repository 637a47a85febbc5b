"""Bad input: one line on stderr naming the problem and the path, exit code 2, no traceback."""
from __future__ import annotations

import urllib.error

import pytest
import torch

from test_cli_support import (assert_one_line_error, last_line, make_dataset, make_style, noise_image, python_m,
                              run_main, train_argv)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here\n")
    (root / "text.png").write_text("not an image\n")
    (root / "a_file").write_text("a file, not a folder\n")
    torch.save({"something.weight": torch.zeros(2)}, root / "other.pth")
    noise_image((24, 20), 0).save(root / "photo.png")
    noise_image((20, 20), 1).save(root / "square.png")
    return {"root": root, "style": make_style(root / "style.png"), "data": make_dataset(root / "data", n=2)}


TRAIN_CASES = {
    # name: (argv changes, expected words in the last line; "{root}" is the fixture folder)
    "missing style": ({"--style": "{root}/nope.jpg"}, ["{root}/nope.jpg", "not found"]),
    "unreadable style": ({"--style": "{root}/text.png"}, ["{root}/text.png", "cannot read style image"]),
    "empty dataset": ({"--dataset": "{root}/empty"}, ["{root}/empty", "no readable images"]),
    "missing dataset": ({"--dataset": "{root}/nope"}, ["{root}/nope", "no such directory"]),
    "VGG file not a checkpoint": ({"--vgg-weights": "{root}/text.png"}, ["{root}/text.png", "not a loadable"]),
    "VGG file missing": ({"--vgg-weights": "{root}/vgg.pth"}, ["{root}/vgg.pth", "not found"]),
    "VGG file not VGG": ({"--vgg-weights": "{root}/other.pth"}, ["{root}/other.pth", "not a torchvision VGG-16"]),
    "output not writable": ({"--out": "{root}/a_file/run"}, ["{root}/a_file/run", "cannot write"]),
}


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_train_bad_input(name, files, tmp_path, capsys):
    changes, needles = TRAIN_CASES[name]
    argv = train_argv(files["style"], files["data"], tmp_path / "run")
    for flag, value in changes.items():
        argv[argv.index(flag) + 1] = value.format(root=files["root"])
    code, _, err = run_main(argv, capsys)
    assert_one_line_error(code, err, *(n.format(root=files["root"]) for n in needles))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_train_without_imagenet_weights_names_the_file_to_fetch(files, tmp_path, capsys, monkeypatch):
    """The default --vgg-weights imagenet, offline and with nothing cached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    argv = train_argv(files["style"], files["data"], tmp_path / "run")
    del argv[argv.index("--vgg-weights"): argv.index("--vgg-weights") + 2]
    code, _, err = run_main(argv, capsys)
    assert_one_line_error(code, err, "https://download.pytorch.org/models/vgg16-397923af.pth",
                          str(tmp_path / "torch-home" / "hub" / "checkpoints" / "vgg16-397923af.pth"))


def test_resume_needs_a_checkpoint(files, tmp_path, capsys):
    code, _, err = run_main(["train", "--out", tmp_path, "--resume"], capsys)
    assert_one_line_error(code, err, str(tmp_path / "checkpoint.pt"), "no checkpoint to resume")
    (tmp_path / "checkpoint.pt").write_text("garbage")
    code, _, err = run_main(["train", "--out", tmp_path, "--resume"], capsys)
    assert_one_line_error(code, err, str(tmp_path / "checkpoint.pt"), "not a loadable")


def test_stylize_bad_input(files, tmp_path, capsys):
    root, photo = files["root"], str(files["root"] / "photo.png")
    torch.save({"conv1.conv2d.weight": torch.zeros(1)}, tmp_path / "wrong.pth")

    def stylize(model, *inputs, out=tmp_path / "o.png"):
        return run_main(["stylize", "--model", model, *inputs, "--out", out, "--device", "cpu"], capsys)

    assert_one_line_error(*stylize(root / "text.png", photo)[::2], str(root / "text.png"), "not a loadable")
    assert_one_line_error(*stylize(tmp_path / "wrong.pth", photo)[::2], str(tmp_path / "wrong.pth"),
                          "does not fit TransformerNet")
    assert_one_line_error(*stylize(tmp_path / "none.pth", photo)[::2], str(tmp_path / "none.pth"), "not found")
    model = tmp_path / "model.pth"
    from fastperc.models.transformer import TransformerNet

    torch.save(TransformerNet().state_dict(), model)
    assert_one_line_error(*stylize(model, root / "nope.png")[::2], str(root / "nope.png"), "no such file")
    assert_one_line_error(*stylize(model, root / "text.png")[::2], str(root / "text.png"), "not a readable image")
    assert_one_line_error(*stylize(model, photo, out=root / "a_file" / "o.png")[::2],
                          str(root / "a_file"), "cannot write")
    assert_one_line_error(*stylize(model, photo, out=tmp_path / "o.xyz")[::2], str(tmp_path / "o.xyz"),
                          "unknown image file extension")
    assert_one_line_error(*stylize(model, photo, out=photo)[::2], photo, "would overwrite its input")


def test_optimize_and_objective_bad_input(files, tmp_path, capsys):
    root = files["root"]
    common = ["--vgg-weights", "random", "--device", "cpu"]
    code, _, err = run_main(["optimize", "--content", root / "nope.png", "--style", files["style"], "--out",
                             tmp_path / "o.png", "--iterations", "1", *common], capsys)
    assert_one_line_error(code, err, str(root / "nope.png"), "content image not found")
    code, _, err = run_main(["optimize", "--content", root / "photo.png", "--style", files["style"], "--out",
                             root / "a_file" / "o.png", "--iterations", "1", *common], capsys)
    assert_one_line_error(code, err, str(root / "a_file"), "cannot write")
    code, _, err = run_main(["objective", "--content", root / "photo.png", "--style", files["style"],
                             root / "square.png", *common], capsys)
    assert_one_line_error(code, err, str(root / "square.png"), "same size")


def test_usage_errors(capsys):
    code, _, err = run_main(["train", "--style", "s.png"], capsys)
    assert code == 2 and "required: --out" in last_line(err)
    code, _, err = run_main(["train", "--out", "x", "--iterations", "2", "--epochs", "1"], capsys)
    assert code == 2 and "not allowed with argument" in last_line(err)


def test_error_from_the_real_command(files, tmp_path):
    """The same through `python -m fastperc` (the console script's entry point)."""
    proc = python_m("fastperc", "stylize", "--model", tmp_path / "none.pth", files["root"] / "photo.png",
                    "--out", tmp_path / "o.png", "--device", "cpu")
    assert_one_line_error(proc.returncode, proc.stderr, str(tmp_path / "none.pth"), "not found")
    assert proc.stderr.count("\n") == 1
