"""`fastperc upscale` and `fastperc sr-eval`: output sizes, agreement with the network and with
an independent PSNR/SSIM computation (scikit-image), histogram matching, bad input."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastperc.degradation import degrade
from fastperc.models.superres import SuperResolutionNet
from fastperc.commands.upscale import match_histogram
from helpers import skimage
from test_cli_support import assert_one_line_error, noise_image, run_main


def _save_model(path, scale, norm="batch"):
    torch.manual_seed(scale)
    net = SuperResolutionNet(scale=scale, fused=False, norm=norm)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr")
    hr = root / "hr"
    (hr / "sub").mkdir(parents=True)
    noise_image((40, 36), 1).save(hr / "a.png")
    noise_image((45, 38), 2).save(hr / "sub" / "b.png")
    (hr / "notes.txt").write_text("not an image")
    (hr / "corrupt.png").write_bytes(b"not a PNG" * 20)  # fails the header scan
    buf = io.BytesIO()
    noise_image((48, 48), 3).save(buf, "JPEG")
    (hr / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # fails to decode
    return {"root": root, "hr": hr, "x4": _save_model(root / "x4.pth", 4), "x8": _save_model(root / "x8.pth", 8)}


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64)


def _net(path, scale):
    net = SuperResolutionNet(scale=scale, fused=False)
    net.load_state_dict(torch.load(path, weights_only=True))
    return net.eval()


def test_upscale_one_image_matches_the_network(files, tmp_path, capsys):
    src = tmp_path / "small.png"
    noise_image((9, 7), 3).save(src)
    out = tmp_path / "big.png"
    code, stdout, err = run_main(["upscale", "--model", files["x4"], src, "--out", out, "--device", "cpu"], capsys)
    assert code == 0, err
    assert str(out) in stdout
    ours = _pixels(out)
    assert ours.shape == (28, 36, 3)
    x = torch.from_numpy(_pixels(src)).float().permute(2, 0, 1)[None]
    with torch.no_grad():
        ref = _net(files["x4"], 4)(x)[0].clamp(0, 255).permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() <= 1.0


def test_upscale_folder_x8_and_match_histogram(files, tmp_path, capsys):
    src = tmp_path / "in"
    (src / "deep").mkdir(parents=True)
    noise_image((6, 5), 4).save(src / "one.png")
    noise_image((5, 6), 5).save(src / "deep" / "two.png")
    out = tmp_path / "out"
    code, _, err = run_main(["upscale", "--model", files["x8"], src, "--out", out, "--match-histogram"], capsys)
    assert code == 0, err
    one, two = _pixels(out / "one.png"), _pixels(out / "deep" / "two.png")
    assert one.shape == (40, 48, 3) and two.shape == (48, 40, 3)
    # Histogram matched: the output is the network's output with each channel's values mapped
    # onto the input's at the same quantiles.
    plain = tmp_path / "plain.png"
    assert run_main(["upscale", "--model", files["x8"], src / "one.png", "--out", plain], capsys)[0] == 0
    x = torch.from_numpy(_pixels(src / "one.png")).permute(2, 0, 1).float()
    y = torch.from_numpy(_pixels(plain)).permute(2, 0, 1).float()
    want = match_histogram(y, x).round().permute(1, 2, 0).numpy()
    # (up to the ties that the 8-bit rounding of ``plain`` makes)
    assert np.abs(one - want).mean() <= 2.0
    assert np.abs(one - _pixels(plain)).mean() > 5.0
    for c in range(3):
        assert x[c].min() <= one[..., c].min() and one[..., c].max() <= x[c].max()


def test_match_histogram_matches_skimage():
    img = torch.rand(3, 20, 24) * 255
    ref = (torch.rand(3, 7, 9) * 100 + 50).round()
    want = skimage("exposure").match_histograms(img.permute(1, 2, 0).double().numpy(), ref.permute(1, 2, 0).double().numpy(),
                            channel_axis=-1)
    np.testing.assert_allclose(match_histogram(img, ref).permute(1, 2, 0).numpy(), want, rtol=1e-5, atol=1e-3)


def _expected(hr_path, scale, upscaler):
    hr = torch.from_numpy(_pixels(hr_path)).permute(2, 0, 1)[None]
    h, w = hr.shape[-2] // scale * scale, hr.shape[-1] // scale * scale
    hr = hr[..., :h, :w]
    lr = degrade(hr.float(), scale).clamp(0, 255).round()
    with torch.no_grad():
        sr = upscaler(lr).clamp(0, 255).round().double()

    def y(t):
        t = t[0].numpy()
        return (16 + (65.481 * t[0] + 128.553 * t[1] + 24.966 * t[2]) / 255)[scale:-scale, scale:-scale]

    metrics = skimage("metrics")
    return (metrics.peak_signal_noise_ratio(y(hr), y(sr), data_range=255),
            metrics.structural_similarity(y(hr), y(sr), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=255))


def test_sr_eval_bicubic(files, tmp_path, capsys):
    out = tmp_path / "res" / "bicubic.json"
    code, stdout, err = run_main(["sr-eval", "--model", "bicubic", "--hr-dir", files["hr"], "--scale", "4",
                                  "--out", out], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["images"] == 2 and result["scale"] == 4 and result["model"] == "bicubic"
    assert result["skipped"] == 2 and "corrupt.png" in err and "truncated.jpg" in err
    names = [r["image"] for r in result["per_image"]]
    assert names == ["a.png", "sub/b.png"]
    want = [_expected(files["hr"] / n, 4, lambda lr: F.interpolate(lr, scale_factor=4, mode="bicubic"))
            for n in names]
    for row, (p, s) in zip(result["per_image"], want):
        assert row["psnr"] == pytest.approx(p, rel=1e-4) and row["ssim"] == pytest.approx(s, rel=1e-4)
    assert result["psnr"] == pytest.approx(np.mean([p for p, _ in want]), rel=1e-4)
    assert result["ssim"] == pytest.approx(np.mean([s for _, s in want]), rel=1e-4)
    assert "mean" in stdout and f"{result['psnr']:.2f}" in stdout and "sub/b.png" in stdout


def test_sr_eval_model(files, tmp_path, capsys):
    code, stdout, err = run_main(["sr-eval", "--model", files["x4"], "--hr-dir", files["hr"], "--scale", "4",
                                  "--device", "cpu"], capsys)
    assert code == 0, err
    mean_line = [line for line in stdout.splitlines() if line.startswith("mean")][0]
    want = [_expected(files["hr"] / n, 4, _net(files["x4"], 4)) for n in ("a.png", "sub/b.png")]
    psnr_mean, ssim_mean = (float(v) for v in mean_line.split()[1:])
    assert psnr_mean == pytest.approx(np.mean([p for p, _ in want]), abs=0.02)
    assert ssim_mean == pytest.approx(np.mean([s for _, s in want]), abs=2e-4)


def test_bad_input(files, tmp_path, capsys):
    hr, x4, x8 = files["hr"], files["x4"], files["x8"]
    img = tmp_path / "img.png"
    noise_image((8, 8), 6).save(img)

    def check(argv, *needles):
        assert_one_line_error(*run_main(argv, capsys)[::2], *needles)

    check(["sr-eval", "--model", "bicubic", "--hr-dir", hr, "--scale", "3"], "--scale", "4 or 8")
    check(["sr-eval", "--model", "bicubic", "--hr-dir", tmp_path / "nope"], "nope", "no such directory")
    check(["sr-eval", "--model", "bicubic", "--hr-dir", img], "not a directory")
    check(["sr-eval", "--model", x8, "--hr-dir", hr, "--scale", "4"], "x8 model", "--scale is 4")
    check(["sr-eval", "--model", tmp_path / "missing.pth", "--hr-dir", hr], "missing.pth")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    noise_image((3, 12), 7).save(tiny / "t.png")
    check(["sr-eval", "--model", "bicubic", "--hr-dir", tiny, "--scale", "4"], "t.png", "smaller than the scale 4")
    small = tmp_path / "small"
    small.mkdir()
    noise_image((20, 40), 8).save(small / "s.png")
    check(["sr-eval", "--model", "bicubic", "--hr-dir", small, "--scale", "8"], "s.png", "too small")
    empty = tmp_path / "empty"
    empty.mkdir()
    check(["sr-eval", "--model", "bicubic", "--hr-dir", empty], "no readable images")

    check(["upscale", "--model", tmp_path / "missing.pth", img, "--out", tmp_path / "o.png"], "missing.pth")
    bogus = tmp_path / "bogus.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bogus)
    check(["upscale", "--model", bogus, img, "--out", tmp_path / "o.png"], "bogus.pth", "SuperResolutionNet")
    check(["upscale", "--model", x4, tmp_path / "nothing.png", "--out", tmp_path / "o.png"], "nothing.png")
    check(["upscale", "--model", x4, img, "--out", tmp_path / "o.xyz"], "o.xyz")
    noise_image((4, 9), 9).save(tmp_path / "lr.png")
    check(["upscale", "--model", x4, tmp_path / "lr.png", "--out", tmp_path / "o.png"], "lr.png", "too small")
