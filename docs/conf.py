"""Sphinx configuration: Markdown pages (MyST), the API reference from the docstrings
(autodoc; Google-style sections through napoleon, RST and :math: inside), and the
``mha`` command's help generated from its parser at build time."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ["COLUMNS"] = "88"  # argparse wraps the generated help at this width
sys.path.insert(0, str(HERE.parent / "src"))

import mha  # noqa: E402
from mha._cli import main as cli_main  # noqa: E402

project = "mha"
author = "The mha authors"
copyright = "the mha authors, MIT license"
release = version = mha.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_generated"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"mha {release}"

CLI_COMMANDS = [[], ["demo"], ["explain"], ["bench"], ["plot"]]


def _write_cli_help() -> None:
    """``mha [COMMAND] --help`` for every command, into _generated/ for cli.md to include."""
    out = HERE / "_generated"
    out.mkdir(exist_ok=True)
    for command in CLI_COMMANDS:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            cli_main([*command, "--help"])
        name = "-".join(["mha", *command])
        (out / f"{name}.txt").write_text(text.getvalue())


_write_cli_help()
