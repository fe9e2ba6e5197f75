"""The import graph, read from the source: no cycles, and no module imports from a layer above its own.

Layers, bottom up: the library (``pfedla``), its operations subpackage (``pfedla.ops``), its command
line (``pfedla.cli``), the KFP components (``components/``, installed as ``pfedla_components``) and
the pipelines built from them (``pipelines/``, ``pfedla_pipelines``). Every ``import`` counts,
inside functions too: an import deferred into a function body is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"pfedla": ROOT / "src" / "pfedla", "pfedla_components": ROOT / "components",
            "pfedla_pipelines": ROOT / "pipelines"}
# (name prefix, layer); the longest matching prefix decides
LAYERS = (("pfedla", 0), ("pfedla.ops", 1), ("pfedla.cli", 2), ("pfedla.__main__", 2),
          ("pfedla_components", 3), ("pfedla_pipelines", 4))


def modules() -> dict[str, Path]:
    """Every module of the three packages by dotted name (a package by its name, for __init__.py)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pfedla import rundir` imports the module pfedla.rundir; `from pfedla.x import f` pfedla.x
            targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                           for alias in node.names)
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layer(name: str) -> int:
    matches = [(prefix, rank) for prefix, rank in LAYERS if name == prefix or name.startswith(prefix + ".")]
    return max(matches, key=lambda match: len(match[0]))[1]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} -> {target}" for source, targets in edges.items() for target in targets
                  if layer(target) > layer(source))


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_no_module_imports_from_a_layer_above_it():
    assert upward(graph()) == []


def test_the_library_imports_nothing_of_the_kfp_layer():
    edges = graph()
    assert not [f"{s} -> {t}" for s, targets in edges.items() if s.startswith("pfedla.") or s == "pfedla"
                for t in targets if not t.startswith("pfedla.") and t != "pfedla"]


@pytest.mark.parametrize(("edges", "problem"), [
    ({"pfedla.a": {"pfedla.b"}, "pfedla.b": {"pfedla.c"}, "pfedla.c": {"pfedla.a"}}, "cycle"),
    ({"pfedla.cli": {"pfedla_pipelines.cli"}, "pfedla_pipelines.cli": set()}, "upward"),
    ({"pfedla.steps": {"pfedla.ops.deploy"}, "pfedla.ops.deploy": set()}, "upward"),
])
def test_the_checks_catch_a_cycle_and_an_upward_import(edges, problem):
    assert (cycles(edges) != []) == (problem == "cycle")
    assert (upward(edges) != []) == (problem == "upward")


def test_imports_are_read_from_function_bodies_and_relative_forms(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from pfedla_pipelines.runner import run_local\n")
    known = {"pfedla.mod", "pfedla_pipelines.runner", "pfedla_pipelines"}
    assert imports("pfedla.mod", source, known) == {"pfedla_pipelines.runner"}
    package = tmp_path / "__init__.py"
    package.write_text("from .runner import run_local\nfrom . import runner\n")
    assert imports("pfedla_pipelines", package, known) == {"pfedla_pipelines.runner"}
