"""The library imports without the command's dependencies: the GPU test machine has torch,
triton, numpy, Pillow and matplotlib but not tqdm (see shared/GPU.md)."""
import subprocess
import sys


def test_import_fastperc_needs_no_tqdm():
    code = ("import sys; sys.modules['tqdm'] = None\n"  # any `import tqdm` now raises ImportError
            "import fastperc, torch\n"
            "net = fastperc.TransformerNet().eval()\n"
            "with torch.no_grad(): net(torch.rand(1, 3, 8, 8))\n"
            "fastperc.degrade(torch.rand(1, 3, 8, 8), 4)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
