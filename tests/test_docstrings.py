"""The examples in the docstrings as a user meets them (``help(mha.explain)``): every
``Example::`` block is a doctest, and every doctest in ``src/mha`` runs and shows what
it claims."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch

import mha

SOURCE = Path(mha.__file__).parent
# The Triton kernel modules are left out: importing them defines the kernels, which must
# happen under TRITON_INTERPRET=1 on a CPU (tests/test_triton.py sets it first). Their
# docstrings are still checked for Example:: blocks, as text.
MODULES: list[ModuleType] = [
    importlib.import_module(info.name)
    for info in pkgutil.walk_packages(mha.__path__, "mha.")
    if info.name != "mha.__main__" and not info.name.rpartition(".")[2].startswith("_triton")
] + [mha]
FINDER = doctest.DocTestFinder(recurse=True)
# Doctests of the modules they are defined in (the finder skips objects imported from elsewhere).
TESTS = sorted(
    (test for module in MODULES for test in FINDER.find(module) if test.examples),
    key=lambda test: test.name,
)
EXAMPLE = re.compile(r"Example::\n\n((?:[ \t]+.*\n|[ \t]*\n)+)")


def test_there_are_doctests():
    assert {"mha._explain.explain", "mha._dispatch.use_backend", "mha._swap.swap"} <= {t.name for t in TESTS}


def test_every_example_block_is_a_doctest():
    for path in sorted(SOURCE.rglob("*.py")):
        for block in EXAMPLE.findall(path.read_text()):
            assert ">>>" in block, f"{path.relative_to(SOURCE)}: an Example:: block that no test runs:\n{block}"


@pytest.mark.parametrize("test", TESTS, ids=[t.name for t in TESTS])
def test_docstring_example_runs_and_shows_what_it_claims(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    test.globs = {"__name__": "__doctest__"}
    try:
        runner.run(test)
    finally:  # the distributed example starts a one-rank process group when run alone
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert runner.failures == 0, f"{test.name}: {runner.failures} of {runner.tries} examples failed (see stdout)"
