"""The import graph of ``src/mha`` has no cycle, counting imports inside functions.

Imports flow one way: module -> front end -> core -> dispatch -> backends, with the
shared types in a leaf module. A cycle hidden in a function-level import still
couples the layers, so every ``import`` and ``from ... import`` anywhere in a file
counts (``TYPE_CHECKING`` blocks included: they are read by type checkers).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "mha"


def _module_name(path: Path) -> str:
    parts = ("mha", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The mha modules that the module ``name`` (with ``source``) imports, anywhere in it."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            submodules = {f"{target}.{alias.name}" for alias in node.names} & modules  # from . import _varlen
            found.update(submodules or {target})
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    return {
        name: _imports(path.read_text(), name, path.name == "__init__.py", set(files)) for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None.

    The package ``mha`` itself (``__init__``) is left out: it imports the public names
    of the layers below it, and ``from . import __version__`` in a submodule reads an
    attribute set before any of those imports run."""
    graph = {k: {m for m in v if m != "mha"} for k, v in graph.items() if k != "mha"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_backends_import_only_the_leaf_layers():
    graph = import_graph()
    allowed = {"mha.masks", "mha._plan", "mha._types"}
    for name, deps in graph.items():
        if name.startswith("mha._backends"):
            outside = {d for d in deps if not d.startswith("mha._backends")} - allowed
            assert not outside, f"{name} imports {sorted(outside)}; backends may import only {sorted(allowed)}"
    assert not {d for d in graph["mha._types"] if d not in {"mha.masks", "mha._plan"}}


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"a"}}, ["a", "a"]),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_function_level_imports_count():
    source = "import torch\n\ndef f():\n    from ._core import attention\n    from . import masks\n"
    modules = {"mha._core", "mha.masks", "mha._dispatch"}
    assert _imports(source, "mha._dispatch", False, modules) == {"mha._core", "mha.masks"}
    assert _imports("from .. import _types\n", "mha._backends.sdpa", False, {"mha._types"}) == {"mha._types"}
