"""Errors the CLI turns into a clear message and an exit code, never a traceback."""

from __future__ import annotations

import sys
from typing import NoReturn


class VectorlayError(Exception):
    """An error an operator can act on: `message` says what is wrong, `hint` what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(VectorlayError):
    exit_code = 2


def exit_with(e: VectorlayError) -> NoReturn:
    """What every console script does with an operator error: message, fix, exit code."""
    print(f"error: {e.message}", file=sys.stderr)
    if e.hint:
        print(f"  fix: {e.hint}", file=sys.stderr)
    sys.exit(e.exit_code)
