"""The provisioning token as an install run holds it: read once (--token-file, VECTORLAY_TOKEN,
standard input), introspected once, kept in memory only.

`ProvisioningToken` is a value: introspecting or spending it gives a new one. Its secret is never
in its repr or str, so a token that reaches a log line or an exception's message shows as redacted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from bootstrap.errors import VectorlayError
from bootstrap.state import format_expiry

TOKEN_ENV = "VECTORLAY_TOKEN"
# The key pair of an enrollment in flight (bootstrap/stages/enroll.py: why it outlives a crash).
PENDING_KEY = "/etc/vectorlay/.enroll-pending.key"


@dataclass(frozen=True)
class ProvisioningToken:
    # None: no token was given (an enrolled node, or a plan run that does not prompt for one).
    secret: str | None = field(default=None, repr=False)
    # What introspection said: valid, used, expired, not_a_provider, unknown; None: not asked yet.
    state: str | None = None
    expires_at: datetime | None = None

    @property
    def given(self) -> bool:
        return self.secret is not None

    def introspected(self, state: str, expires_at: datetime | None) -> ProvisioningToken:
        return replace(self, state=state, expires_at=expires_at)

    def spent(self) -> ProvisioningToken:
        """After a successful enrollment: nothing later in the run may present it again."""
        return ProvisioningToken(None, "used", self.expires_at)

    def __str__(self) -> str:
        return repr(self)

    def __repr__(self) -> str:
        held = "[redacted]" if self.secret is not None else "none"
        return f"ProvisioningToken({held}, state={self.state}, expires_at={self.expires_at})"


class TokenReader:
    """Reads the token the first time a stage asks, and hands out that one value after. `prompt`
    False (a plan run): a token not given is not asked for on standard input."""

    def __init__(
        self,
        token_file: Path | None = None,
        *,
        prompt: bool = True,
        remember: Callable[[str], None] = lambda _secret: None,
        around_prompt: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self.token_file = token_file
        self.prompt = prompt
        self._remember = remember
        # Held while the token is read: the progress display steps aside for a question on the terminal.
        self._around_prompt = around_prompt
        self._token: ProvisioningToken | None = None

    def read(self, *, enrolled: bool) -> ProvisioningToken:
        """The token; one without a secret on an enrolled node that was given none (it runs
        without one: nothing to enroll)."""
        if self._token is not None:
            return self._token
        from bootstrap.enroll import read_token

        given = self.token_file is not None or bool(os.environ.get(TOKEN_ENV, "").strip())
        if not given and (not self.prompt or enrolled):
            self._token = ProvisioningToken()
            return self._token
        try:
            with self._around_prompt():
                secret = read_token(self.token_file)
        except OSError:  # no standard input to read from (a daemon, a test harness)
            raise VectorlayError(
                "no provisioning token given",
                f"set {TOKEN_ENV}=vtk_... (from the dashboard) or pass --token-file FILE",
            ) from None
        self._remember(secret)
        self._token = ProvisioningToken(secret)
        return self._token


def describe_expiry(expires_at: datetime | None) -> str:
    hhmm = format_expiry(expires_at)
    return f"valid until {hhmm}" if hhmm else "valid"
