"""The README and the docs as a user meets them: every Python block runs as written and
prints what the text after it says; no link leaves the repository."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _blocks(page: Path) -> list[tuple[str, str | None]]:
    """``(code, expected stdout or None)`` for each ``python`` block of ``page``; the
    expected output is the ``text`` block that follows it directly, if any."""
    fences = list(FENCE.finditer(page.read_text()))
    blocks = []
    for i, fence in enumerate(fences):
        if fence.group(1) != "python":
            continue
        after = fences[i + 1] if i + 1 < len(fences) else None
        direct = after is not None and page.read_text()[fence.end() : after.start()].strip() == ""
        expected = after.group(2) if direct and after.group(1) == "text" else None
        blocks.append((fence.group(2), expected))
    return blocks


CASES = [
    pytest.param(code, expected, id=f"{page.relative_to(ROOT)}-{n}")
    for page in PAGES
    for n, (code, expected) in enumerate(_blocks(page), start=1)
]


def test_the_readme_has_blocks_to_run():
    assert len(_blocks(ROOT / "README.md")) >= 5


@pytest.mark.parametrize(("code", "expected"), CASES)
def test_python_block_runs_and_prints_what_the_text_says(code, expected):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<block>", "exec"), {"__name__": "__block__"})
    finally:  # the distributed examples start a one-rank process group when run alone
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if expected is not None:
        assert out.getvalue() == expected


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_stay_in_the_repository_and_exist(page):
    for target in LINK.findall(page.read_text()):
        where = f"{page.name}: {target}"
        assert "://" not in target, where
        assert not target.startswith(("/", "mailto:")), where
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), where
        assert path.exists(), where
