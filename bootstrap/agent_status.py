"""status.json: the control plane's last answer, as the agent got it, for the doctor and operators.

Written atomically after every attempt: the fields of the last delivered heartbeat stay until the
next one is delivered, and `last_error` says why the latest attempt failed (null when it did not).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from bootstrap.errors import redact
from bootstrap.fsutil import atomic_write, read_regular
from bootstrap.host import Host

STATUS_PATH = "/run/vectorlay/node-agent/status.json"


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_iso(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


# A status is a few hundred bytes; a larger file is not one the agent wrote.
STATUS_LIMIT = 64 << 10


def read_status(host: Host) -> dict[str, Any] | None:
    """The last status written, None when there is none, or when what is there is not a status
    (not a JSON object, too large, or not a regular file: a FIFO planted there must not hang the
    doctor or the agent, so it is read with the bounded, non-blocking reader)."""
    try:
        data = json.loads(read_regular(host.path(STATUS_PATH), STATUS_LIMIT))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def write_status(host: Host, status: dict[str, Any]) -> None:
    """Replaced atomically, 0644 and read by anyone: whatever an answer echoed, no secret is written
    here. Runtime state in /run, rewritten after every heartbeat: the directory is not synced (a
    crash loses /run anyway) and the write is none of an install run's kill points."""
    data = redact(json.dumps(status, indent=2, sort_keys=True)) + "\n"
    atomic_write(host.path(STATUS_PATH), data, mode=0o644, durable=False, fault=False)
