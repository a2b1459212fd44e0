"""Run state in /var/lib/vectorlay/state.json: stage reached, the boot at which a reboot was asked for,
commands still owed after a crash, installed versions, the highest manifest serial accepted.
Written atomically and only when it changes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from bootstrap.errors import VectorlayError
from bootstrap.fsutil import atomic_write
from bootstrap.host import Host

STATE_PATH = "/var/lib/vectorlay/state.json"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


@dataclass
class RunState:
    stage: str | None = None
    # The kernel's boot id when a reboot was asked for: a later run with another boot id knows the box
    # did reboot, so a still-missing IOMMU points at the firmware rather than at a pending reboot.
    reboot_requested_boot_id: str | None = None
    reboot_requested_at: str | None = None
    token_expires_at: str | None = None
    # Commands a plan must still run (a crash between writing a file and running its command).
    pending_commands: list[list[str]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    # The highest artifact-manifest serial accepted, and which pinned keys it was signed under
    # (bootstrap/manifest.py: a lower serial is a rollback and refused).
    manifest_serial: int = 0
    manifest_keys: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def boot_id(host: Host) -> str | None:
    value = host.read_text(BOOT_ID_PATH, default="").strip()
    return value or None


def load_state(host: Host) -> RunState:
    text = host.read_text(STATE_PATH, default="")
    if not text.strip():
        return RunState()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise VectorlayError(
            f"{STATE_PATH} is not valid JSON ({e.msg} at line {e.lineno})",
            f"move it away (mv {STATE_PATH} {STATE_PATH}.bad) and re-run; it is rebuilt",
        ) from None
    if not isinstance(data, dict):
        raise VectorlayError(f"{STATE_PATH} must hold a JSON object", f"move {STATE_PATH} away and re-run")
    known = RunState.__dataclass_fields__
    state = RunState(**{k: v for k, v in data.items() if k in known})
    state.pending_commands = [list(map(str, c)) for c in state.pending_commands or []]
    return state


def save_state(host: Host, state: RunState) -> bool:
    """Write the state if it differs from what is on disk; True when it wrote."""
    data = json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n"
    path = host.path(STATE_PATH)
    try:
        if path.read_text() == data:
            return False
    except FileNotFoundError:
        pass
    atomic_write(path, data, mode=0o644)
    return True


def format_expiry(expires_at: datetime | None) -> str | None:
    """HH:MM in the box's local time, which is the clock the operator reads."""
    if expires_at is None:
        return None
    return expires_at.astimezone().strftime("%H:%M")


def reboot_message(expires_at: datetime | None) -> str:
    hhmm = format_expiry(expires_at)
    if hhmm is None:
        return "reboot, then re-run the same command"
    return f"reboot, then re-run the same command within the hour (your token expires at {hhmm})"
