"""`fastperc stylize`: output sizes, folders, --scale, batching, videos, and agreement with the
pytorch/examples network running the trained weights."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

import fastperc.commands.stylize
from test_cli_support import (assert_one_line_error, load_examples_model, make_dataset, make_style, noise_image,
                              run_main, train_argv)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """model.pth of a 2-step training run."""
    from fastperc.commands.cli import main

    root = tmp_path_factory.mktemp("stylize-model")
    argv = train_argv(make_style(root / "style.png"), make_dataset(root / "data"), root / "run")
    assert main(argv) == 0
    return root / "run" / "model.pth"


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_matches_the_pytorch_examples_network(model, tmp_path, capsys):
    """Odd sizes come back the same size, and equal to pytorch/examples' output (cropped)."""
    src = tmp_path / "photo.png"
    noise_image((37, 29), 5).save(src)
    out = tmp_path / "styled.png"
    code, stdout, err = run_main(["stylize", "--model", model, src, "--out", out, "--device", "cpu"], capsys)
    assert code == 0, err
    assert str(out) in stdout
    ours = _pixels(out)
    assert ours.shape == (29, 37, 3)

    net = load_examples_model(model)
    x = torch.from_numpy(_pixels(src).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        ref = net(x)[0, :, :29, :37].clamp(0, 255).permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() <= 1.0


def test_folders_scale_and_batches(model, tmp_path, capsys):
    """A folder (recursive, mixed sizes and modes, an unreadable file skipped) and a file into an
    output folder; --scale and --batch-size keep every output at its input's size."""
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    sizes = {"a.jpg": (32, 24), "b.png": (32, 24), "sub/c.png": (20, 28), "sub/d.webp": (32, 24)}
    for i, (name, size) in enumerate(sizes.items()):
        noise_image(size, i, "L" if name == "b.png" else "RGB").save(photos / name)
    (photos / "broken.png").write_bytes(b"\x89PNG not really")
    single = tmp_path / "single.jpg"
    noise_image((24, 24), 9).save(single)
    out = tmp_path / "out"
    code, _, err = run_main(["stylize", "--model", model, photos, single, "--out", out, "--scale", "0.5",
                             "--batch-size", "2", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "broken.png" in err and "skipped 1" in err
    for name, (w, h) in sizes.items():
        with Image.open(out / name) as img:
            assert img.size == (w, h) and img.mode == "RGB"
    assert (out / "single.jpg").is_file()
    assert not (out / "broken.png").exists()


def test_checkpoint_is_a_model_too(model, tmp_path, capsys):
    src = tmp_path / "in.png"
    noise_image((16, 16), 1).save(src)
    code, _, err = run_main(["stylize", "--model", model.parent / "checkpoint.pt", src, "--out",
                             tmp_path / "o.png", "--device", "cpu"], capsys)
    assert code == 0, err


def test_video_without_the_extra(model, tmp_path, capsys, monkeypatch):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 64)
    real = importlib.util.find_spec
    monkeypatch.setattr(fastperc.commands.stylize.importlib.util, "find_spec",
                        lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a))
    code, _, err = run_main(["stylize", "--model", model, clip, "--out", tmp_path / "o.mp4", "--device", "cpu"],
                            capsys)
    assert_one_line_error(code, err, str(clip), "video extra", "pip install 'fastperc[video]'")


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is None,
                    reason="needs the video extra (imageio-ffmpeg): pip install 'fastperc[video]'")
def test_video_round_trip(model, tmp_path, capsys):
    import imageio.v2 as iio

    clip = tmp_path / "clip.mp4"
    with iio.get_writer(clip, format="FFMPEG", fps=12, macro_block_size=1) as writer:
        for i in range(5):
            writer.append_data(np.asarray(noise_image((32, 24), i)))
    out = tmp_path / "styled.mp4"
    code, stdout, err = run_main(["stylize", "--model", model, clip, "--out", out, "--batch-size", "2",
                                  "--device", "cpu"], capsys)
    assert code == 0, err
    assert "5 frames" in stdout
    with iio.get_reader(out, format="FFMPEG") as reader:
        assert reader.get_meta_data()["fps"] == pytest.approx(12)
        frames = list(reader.iter_data())
    assert len(frames) == 5 and frames[0].shape == (24, 32, 3)
