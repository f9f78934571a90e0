"""``python -m mha`` / ``mha``: the command line (demo for now)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ._seed_demo import run

    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
