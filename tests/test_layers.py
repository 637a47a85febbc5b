"""The import graph of fastperc goes one way, down (DESIGN.md, "Layers").

Every module of fastperc/ and kernels/ (installed as fastperc.kernels) is parsed, not imported,
and its ``fastperc`` imports (top level and inside functions) make the edges of the graph."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ((ROOT / "fastperc", "fastperc"), (ROOT / "kernels", "fastperc.kernels"))
SUBPACKAGES = ("fastperc.kernels", "fastperc.torch_backend", "fastperc.ops", "fastperc.models",
               "fastperc.bench", "fastperc.commands")

# The library's lower layers, bottom first: each module imports only modules of a lower layer
# or of its own subpackage.
LAYERS = [
    ("bottom", {"fastperc.rules"}),
    ("spec and loaders", {"fastperc.reference", "fastperc._checks", "fastperc._cuda_ext"}),
    ("backends", {"fastperc.torch_backend", "fastperc.kernels", "fastperc.cuda_backend", "fastperc.backends"}),
    ("ops", {"fastperc.ops"}),
]
# What the bottom layer may import at all: torch and the standard library (no triton).
BOTTOM_ALLOWED = {"__future__", "dataclasses", "functools", "os", "typing", "torch"}


def module_files() -> dict[str, Path]:
    found = {}
    for base, package in PACKAGES:
        for path in base.rglob("*.py"):
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, source: str, is_package: bool, known) -> set[str]:
    """The names module ``name`` imports, resolved to the ``known`` modules where they are
    among them: ``from a import b`` is module a.b if that is one, else a; any other name
    (torch, triton, ...) is kept as written."""
    here = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the fastperc modules it imports."""
    return {name: {n for n in imports(name, path.read_text(), path.name == "__init__.py", files)
                   if n in files and n != name}
            for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def unit(name: str) -> str:
    """A module's subpackage (or the module itself)."""
    return next((p for p in SUBPACKAGES if name == p or name.startswith(p + ".")), name)


def layer_of(name: str) -> int | None:
    return next((i for i, (_, members) in enumerate(LAYERS) if unit(name) in members), None)


FILES = module_files()
GRAPH = import_graph(FILES)


def test_the_checks_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    src = "from fastperc.torch_backend import gram\nfrom .common import launch\nimport torch\n"
    known = {"fastperc.torch_backend.gram", "fastperc.kernels.common"}
    assert imports("fastperc.kernels.x", src, False, known) == known | {"torch"}
    assert "fastperc.rules" in GRAPH["fastperc.kernels.gram"]
    assert "fastperc.torch_backend.norm" in GRAPH["fastperc.ops._norm"]


def test_no_module_imports_itself_around_a_cycle():
    assert cycles(GRAPH) == []


def test_no_two_subpackages_import_each_other():
    units: dict[str, set[str]] = {}
    for name, deps in GRAPH.items():
        units.setdefault(unit(name), set()).update(unit(d) for d in deps if unit(d) != unit(name))
    assert cycles(units) == []


def test_the_bottom_layer_imports_only_torch_and_the_standard_library():
    path = FILES["fastperc.rules"]
    tops = {n.split(".")[0] for n in imports("fastperc.rules", path.read_text(), False, FILES)}
    assert tops <= BOTTOM_ALLOWED, sorted(tops - BOTTOM_ALLOWED)


def test_kernels_import_only_themselves_and_the_bottom_layer():
    for name, deps in GRAPH.items():
        if unit(name) == "fastperc.kernels":
            others = {d for d in deps if unit(d) != "fastperc.kernels"}
            assert others <= {"fastperc.rules"}, (name, sorted(others))


@pytest.mark.parametrize("layer", range(len(LAYERS)), ids=[name for name, _ in LAYERS])
def test_each_layer_imports_only_layers_below_it(layer):
    for name, deps in sorted(GRAPH.items()):
        if layer_of(name) != layer:
            continue
        for dep in deps:
            if unit(dep) == unit(name):
                continue
            below = layer_of(dep)
            assert below is not None and below < layer, f"{name} ({LAYERS[layer][0]}) imports {dep}"


def test_the_torch_backend_imports_the_bottom_layer_and_the_reference_only():
    for name, deps in GRAPH.items():
        if unit(name) == "fastperc.torch_backend":
            others = {d for d in deps if unit(d) != "fastperc.torch_backend"}
            assert others <= {"fastperc.rules", "fastperc.reference"}, (name, sorted(others))
