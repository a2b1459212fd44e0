"""`vectorlay-node-doctor` (placeholder until the doctor issue lands: it only reports discovery)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    print("vectorlay-node-doctor: not implemented yet (see issue 3)", file=sys.stderr)
    sys.exit(1)
