"""Typing that the type checker's configuration cannot enforce by itself.

mypy checks ``src/mha`` with untyped definitions disallowed, except in the two modules
that hold the ``@triton.jit`` kernels (Triton reads those annotations itself; see
``[tool.mypy]`` in pyproject.toml). The host functions in those modules must stay fully
annotated all the same: this test reads their source and says which are not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mha

JIT_MODULES = ["_backends/_triton_kernels.py", "_backends/_triton_decode.py"]


def _is_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "jit"


def _untyped_host_functions(source: str) -> list[str]:
    """``name (line)`` of every function not under ``@triton.jit`` that lacks a return
    annotation or an annotation on any parameter other than ``self``/``cls``."""
    missing = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if any(_is_jit(d) for d in node.decorator_list):
            continue
        a = node.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, [a.vararg, a.kwarg])]
        untyped = [p.arg for p in params if p.annotation is None and p.arg not in ("self", "cls")]
        if untyped or node.returns is None:
            missing.append(f"{node.name} (line {node.lineno})")
    return missing


@pytest.mark.parametrize("module", JIT_MODULES)
def test_host_functions_beside_triton_kernels_are_fully_annotated(module):
    source = (Path(mha.__file__).parent / module).read_text()
    assert _untyped_host_functions(source) == []


def test_the_check_sees_a_missing_annotation_and_skips_jit_kernels():
    source = (
        "import triton\n"
        "@triton.jit\n"
        "def kernel(X, N): pass\n"
        "def launch(x: int, n) -> None: pass\n"
        "def shape(x: int): pass\n"
        "def fine(x: int, *rest: int, **kw: str) -> None: pass\n"
    )
    assert _untyped_host_functions(source) == ["launch (line 4)", "shape (line 5)"]
