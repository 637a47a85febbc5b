"""`fastperc optimize` (the Gatys et al. baseline, projected L-BFGS on equation 5) and
`fastperc objective` (equation 5 of any image)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_cli_support import make_style, noise_image, run_main

LOSS = ["--vgg-weights", "random", "--device", "cpu", "--style-size", "32"]


@pytest.fixture()
def images(tmp_path):
    content = tmp_path / "content.png"
    noise_image((28, 24), 1).save(content)
    return content, make_style(tmp_path / "style.png")


def test_optimize_records_the_objective_per_iteration(images, tmp_path, capsys):
    content, style = images
    out = tmp_path / "baseline.png"
    torch.manual_seed(0)  # the random VGG: the same one for optimize and objective below
    code, stdout, err = run_main(["optimize", "--content", content, "--style", style, "--out", out,
                                  "--iterations", "4", "--tv-weight", "1e-6", *LOSS], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "baseline.json").read_text())
    history = record["history"]
    assert [h["iteration"] for h in history] == [0, 1, 2, 3, 4]
    for h in history:
        assert np.isfinite(h["objective"])
        assert h["objective"] == pytest.approx(h["content"] + h["style"] + h["tv"], rel=1e-5)
        assert h["tv"] > 0
    assert history[-1]["objective"] < history[0]["objective"]  # L-BFGS from white noise makes progress
    assert record["settings"]["tv_weight"] == 1e-6
    with Image.open(out) as img:
        assert img.size == (28, 24)
    assert f"{history[-1]['objective']:.6g}" in stdout

    # objective: the same equation-5 value for the written image (up to its 8-bit rounding).
    torch.manual_seed(0)
    code, stdout, err = run_main(["objective", "--content", content, "--style", style, out,
                                  "--tv-weight", "1e-6", *LOSS], capsys)
    assert code == 0, err
    value = json.loads(stdout)
    assert set(value) >= {"objective", "content", "style", "tv"}
    assert value["objective"] == pytest.approx(history[-1]["objective"], rel=0.05)


def test_objective_of_the_content_image_has_no_content_term(images, capsys):
    content, style = images
    code, stdout, err = run_main(["objective", "--content", content, "--style", style, content, *LOSS], capsys)
    assert code == 0, err
    value = json.loads(stdout)
    assert value["content"] == 0 and value["style"] > 0

