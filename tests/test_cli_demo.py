"""`make demo`: its run itself, with the defaults `make demo` uses, and its place in the Makefile
and the README.

The test calls the demo's entry point in-process (``fastperc.commands.demo.main(["--out", ...])``, which is
what ``make demo`` runs after the same $(STAMP) set-up as ``make test``) instead of ``make demo``
itself, which would reinstall the environment whenever pyproject.toml is newer than the stamp.
"""
from __future__ import annotations

import re

from PIL import Image

from fastperc.commands import demo
from fastperc.models.vgg import imagenet_weights_path
from test_cli_support import ROOT, read_log


def test_demo_run(tmp_path, capsys):
    out = tmp_path / "demo_out"
    (out / "run").mkdir(parents=True)
    (out / "run" / "checkpoint.pt").write_text("an earlier demo's run: the demo replaces its own output")
    assert demo.main(["--out", str(out)]) == 0
    stdout, err = capsys.readouterr()

    for name in ("style.png", "content.png", "stylized.png", "comparison.png", "loss.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG"
    with Image.open(out / "content.png") as a, Image.open(out / "stylized.png") as b:
        assert a.size == b.size
    log = read_log(out / "run")
    assert [e["step"] for e in log] == list(range(1, demo.DEFAULTS["steps"] + 1))
    assert log[-1]["loss"] < log[0]["loss"]
    assert len(list((out / "data").iterdir())) == demo.DEFAULTS["images"]
    note = (out / "NOTE.txt").read_text()
    assert "objective" in note and "fastperc train" in note
    if not imagenet_weights_path().is_file():
        assert "RANDOM VGG-16 weights" in note and "real results need" in note
        assert "RANDOM" in stdout and "ImageNet" in err


def test_make_demo_and_readme():
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^demo: (.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert rule and rule.group(1).strip() == "$(STAMP)"  # set up exactly as `make test` is
    assert "-m fastperc.commands.demo" in rule.group(2)
    readme = (ROOT / "README.md").read_text()
    first_section = readme.split("\n## ")[0]
    assert "make demo" in first_section and "make test" in first_section
