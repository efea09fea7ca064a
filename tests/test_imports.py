"""Imports flow one way: no cycle between modules of ``src/dermlab``, and no lower layer reaches up.

Every ``import`` counts, also those inside functions (a lazy import hides a cycle from Python, not from a reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: package -> the packages it may import (besides itself); the CLI sits on top and may import any of them
ALLOWED = {
    "errors": set(),
    "io": {"errors"},
    "registry": {"errors"},
    "config": {"errors", "io"},
    "losses": {"errors", "registry"},
    "data": {"config", "errors", "io", "registry"},
    "models": {"config", "data", "errors", "io", "registry"},
    "evaluation": {"config", "data", "errors", "io", "models", "registry"},
    "explain": {"config", "data", "errors", "evaluation", "io", "models", "registry"},
    "training": {"config", "data", "errors", "evaluation", "io", "losses", "models", "registry"},
    "serving": {"config", "data", "errors", "evaluation", "explain", "io", "models", "registry"},
}


def _module_names() -> dict[str, Path]:
    names = {}
    for path in (SRC / "dermlab").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The ``dermlab`` modules ``module`` imports anywhere in its file (a package's own parents left out)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") if node.level else node.module or ""
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(target for target in targets if target in known)
    return {target for target in found if target != module and not module.startswith(target + ".")}


def _graph() -> dict[str, set[str]]:
    known = _module_names()
    return {module: _imports(module, path, known) for module, path in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_anywhere_in_src() -> None:
    graph = _graph()
    assert len(graph) > 50  # the walk found the package
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_lower_layers_never_import_higher_ones() -> None:
    wrong = []
    for module, targets in _graph().items():
        layer = module.split(".")[1] if "." in module else None
        if layer not in ALLOWED:
            continue  # the CLI and the package itself
        for target in targets:
            other = target.split(".")[1] if "." in target else None
            if other is not None and other != layer and other not in ALLOWED[layer]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []
