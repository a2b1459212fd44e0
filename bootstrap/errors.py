"""Errors the CLI turns into a clear message and an exit code, never a traceback."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import NoReturn

REDACTED = "[redacted]"
# Provisioning tokens (vtk_), node tokens (vnt_), API keys (vlk_), bearer headers and PEM private
# keys, wherever they appear; compiled on first use (most doctor runs never redact anything).
_SECRET_PATTERN = (
    r"\b(vtk|vnt|vlk)_[A-Za-z0-9_-]+|(?<=Bearer )\S+"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----"
)
_secret_re: re.Pattern[str] | None = None
# The secrets this process holds (the token it read, the node token it presents), redacted by value
# too, whatever their shape: a control plane may echo one back in an error, and every way out of the
# process (terminal, final error line, log, status.json, exception) passes through redact().
_held: set[str] = set()


def hold_secret(secret: str) -> None:
    """Redact `secret` by value from everything this process says from now on."""
    if secret:
        _held.add(secret)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    global _secret_re
    for s in (*_held, *secrets):
        if s:
            text = text.replace(s, REDACTED)
    if _secret_re is None:
        _secret_re = re.compile(_SECRET_PATTERN, re.S)
    return _secret_re.sub(REDACTED, text)


class VectorlayError(Exception):
    """An error an operator can act on: `message` says what is wrong, `hint` what to do. Both are
    redacted when the error is made, so a secret an answer echoed never travels further."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        message = redact(message)
        hint = redact(hint) if hint else hint
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(VectorlayError):
    exit_code = 2


def exit_with(e: VectorlayError) -> NoReturn:
    """What every console script does with an operator error: message, fix, exit code."""
    print(f"error: {redact(e.message)}", file=sys.stderr)
    if e.hint:
        print(f"  fix: {redact(e.hint)}", file=sys.stderr)
    sys.exit(e.exit_code)
