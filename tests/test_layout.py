"""The package's layout (ARCHITECTURE.md): imports run one way, from the layers above to the layers below.

Parsed from the source, not imported: every ``import``/``from ... import`` of a package module, at
module level or inside a function, is an edge. The test fails on an import cycle, on an edge that
goes up the layer table below, on ``models/`` importing anything of the package outside itself, and
on a package-internal import inside a function that is not in ``LAZY`` with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mindcv_poolformer"

# Layer of each module (longest matching prefix wins); a module may import its own layer and those below.
LAYERS = {
    "errors": 0, "_paths": 0, "_atomic": 0,
    "models": 1,
    "kernels": 2,
    "backends": 3,
    "config": 4, "checkpoint": 4,
    "_script": 5, "_runtime": 5, "distributed": 5, "amp": 5, "factory": 5, "flops": 5, "transforms": 5,
    "summary": 6, "convert": 6,
    "data": 7,
    "deploy.artifacts": 8,
    "evaluation": 9,
    "deploy": 10, "predict": 10,
    "train": 11,
    "": 12,  # the package's __init__: the public API
}

# Package-internal imports that stay inside a function, each for a reason.
LAZY = {
    ("", "convert"): "`python -m mindcv_poolformer.convert` would otherwise import convert twice",
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(p, root): p for p in root.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to (``a.b.c`` may name a function of module ``a.b``)."""
    while name and name not in modules:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name if name in modules else None


def _edges(modules: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported, inside_a_function) for every package-internal import."""
    edges = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        in_function = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function.update(id(n) for n in ast.walk(node) if n is not node)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.startswith("mindcv_poolformer"):
                    module = node.module.removeprefix("mindcv_poolformer").lstrip(".")
                else:
                    continue
                targets = [f"{module}.{alias.name}".lstrip(".") for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.removeprefix("mindcv_poolformer").lstrip(".") for a in node.names
                           if a.name.startswith("mindcv_poolformer")]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    edges.append((name, resolved, id(node) in in_function))
    return edges


def _layer(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".") or not prefix),
               key=len)
    return LAYERS[best]


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return modules, _edges(modules)


def test_every_module_has_a_layer(graph):
    modules, _ = graph
    assert all(_layer(m) < LAYERS[""] for m in modules if m), "a new top-level module needs a row in LAYERS"


def test_no_import_cycles(graph):
    modules, edges = graph
    out: dict[str, set[str]] = {m: set() for m in modules}
    for a, b, _ in edges:
        out[a].add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(out[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module)


def test_imports_go_down_the_layers(graph):
    _, edges = graph
    upward = sorted({f"{a} (layer {_layer(a)}) -> {b} (layer {_layer(b)})" for a, b, _ in edges
                     if _layer(b) > _layer(a)})
    assert not upward, "imports going up a layer:\n" + "\n".join(upward)


def test_models_import_nothing_above_them(graph):
    _, edges = graph
    bad = sorted({f"{a} -> {b}" for a, b, _ in edges if a.startswith("models") and not b.startswith("models")})
    assert not bad, "models/ is the bottom of the network code and device-neutral:\n" + "\n".join(bad)


def test_function_level_imports_only_where_needed(graph):
    _, edges = graph
    lazy = sorted({(a, b) for a, b, inside in edges if inside} - set(LAZY))
    assert not lazy, "package imports inside functions (move them to the module top, or add to LAZY with why):\n" + \
        "\n".join(f"{a} -> {b}" for a, b in lazy)


def test_the_parser_sees_every_import_form(tmp_path):
    """The parser finds relative, absolute and function-level imports, so the checks above can fail."""
    pkg = tmp_path / "mindcv_poolformer"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("from .net import Net\n")
    (pkg / "models" / "net.py").write_text("def f():\n    from ..checkpoint import load\n")
    (pkg / "checkpoint.py").write_text("import mindcv_poolformer.models.net\nfrom .errors import E\n")
    modules = _modules(pkg)
    edges = set(_edges(modules))
    assert ("models.net", "checkpoint", True) in edges
    assert ("checkpoint", "models.net", False) in edges
    assert ("checkpoint", "errors", False) in edges
    assert ("models", "models.net", False) in edges
    assert _layer("models.net") < _layer("checkpoint")
