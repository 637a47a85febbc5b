"""Source rules for the Triton kernels that the CPU interpreter with triton 3.9 cannot catch.

The GPU test machine runs triton 3.6, where ``tl.dot`` defaults ``out_dtype`` to float32 and
asserts that the accumulator has it: every float64 kernel with a dot then fails to compile.
Naming ``out_dtype`` is correct on both versions (triton 3.9 takes it from the accumulator)."""
import ast
from pathlib import Path

import pytest

KERNELS = sorted((Path(__file__).resolve().parents[1] / "kernels").glob("*.py"))


def _dot_calls(source: str) -> list[ast.Call]:
    """Every ``tl.dot(...)`` call in the code (not in docstrings or comments)."""
    return [node for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dot"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl"]


def _missing_out_dtype(source: str) -> list[int]:
    """Line numbers of the tl.dot calls without an out_dtype keyword."""
    return [call.lineno for call in _dot_calls(source) if "out_dtype" not in {k.arg for k in call.keywords}]


def test_the_rule_finds_the_calls():
    assert _missing_out_dtype('"""tl.dot(a, b) in a docstring"""\nacc = tl.dot(a, f(b), acc)\n') == [2]
    assert _missing_out_dtype("acc = tl.dot(a, b, acc, out_dtype=acc.dtype)\n") == []
    assert sum(len(_dot_calls(path.read_text())) for path in KERNELS) >= 7


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.name)
def test_every_dot_names_its_out_dtype(path):
    lines = _missing_out_dtype(path.read_text())
    assert not lines, f"{path.name}: tl.dot without out_dtype= at lines {lines} (fp64 fails on triton 3.6)"
