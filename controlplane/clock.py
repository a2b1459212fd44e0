"""Time, injectable: tests move the control plane's clock instead of sleeping through a token's hour."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

# Seconds added to the wall clock by every control-plane process that sees it (serve and the admin
# commands alike): `VECTORLAY_CP_CLOCK_OFFSET=-7200 vectorlay-control-plane token create ...` mints a
# token that expired an hour ago.
CLOCK_OFFSET_ENV = "VECTORLAY_CP_CLOCK_OFFSET"


class Clock:
    def __init__(self, offset_seconds: float = 0.0) -> None:
        self.offset = timedelta(seconds=offset_seconds)

    @classmethod
    def from_env(cls) -> Clock:
        raw = os.environ.get(CLOCK_OFFSET_ENV, "").strip()
        return cls(float(raw) if raw else 0.0)

    def now(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset


def wall_now() -> datetime:
    """Real time, for certificate validity: TLS peers check it against their own clocks."""
    return datetime.now(timezone.utc)


def to_iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def from_iso(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))
