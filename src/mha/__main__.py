"""``python -m mha`` / ``mha``: the command line (see ``mha --help``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the ``mha`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    from ._cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
