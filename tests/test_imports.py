"""The import graph of ``src/mha`` has no cycle, counting imports inside functions.

Imports flow one way: module -> front end -> core -> dispatch -> backends, with the
shared types in a leaf module. A cycle hidden in a function-level import still
couples the layers, so every ``import`` and ``from ... import`` anywhere in a file
counts (``TYPE_CHECKING`` blocks included: they are read by type checkers).
"""

from __future__ import annotations

import ast
import subprocess
import sys
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


_FIRST_CALLS = """
import sys, torch
from torch import nn
x = torch.randn(5, 2, 8)
causal = nn.Transformer.generate_square_subsequent_mask(5)
nn.MultiheadAttention(8, 2)(x, x, x, attn_mask=causal, is_causal=True)
if "sympy" in sys.modules:
    print("torch")
    raise SystemExit
import mha
from mha.masks import Causal, Window
m = mha.MultiheadAttention(8, 2)
m(x, x, x, attn_mask=causal, is_causal=True)
m(x, x, x, is_causal=True, need_weights=True, average_attn_weights=False)
m(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 7, 4)
mha.attention(q, k, k, Window(2, 1, align="bottom_right"), weights="mean")
mha.attention(q, k, k, Causal(), return_lse=True)
print("sympy" if "sympy" in sys.modules else "clean")
"""


def test_first_calls_do_not_import_sympy():
    """torch imports sympy (0.4 s) on the first call of torch.broadcast_shapes; torch's own
    attention never does, and mha's first causal call did (the band predicate broadcast its
    index vectors through it)."""
    out = subprocess.run([sys.executable, "-c", _FIRST_CALLS], capture_output=True, text=True, check=True).stdout
    if out.strip() == "torch":
        pytest.skip("this torch imports sympy on its own first attention call")
    assert out.strip() == "clean"
