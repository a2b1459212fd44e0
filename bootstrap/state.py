"""Run state in /var/lib/vectorlay/state.json: stage reached, the boot at which a reboot was asked for,
commands still owed after a crash, the highest manifest serial accepted.
Written atomically and only when it changes."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from bootstrap.errors import VectorlayError
from bootstrap.fsutil import atomic_write
from bootstrap.host import Host

STATE_PATH = "/var/lib/vectorlay/state.json"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
MOVE_AWAY = f"move it away (mv {STATE_PATH} {STATE_PATH}.bad) and re-run; it is rebuilt"


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
    except RecursionError:
        raise VectorlayError(f"{STATE_PATH} is nested too deeply to be run state", MOVE_AWAY) from None
    except json.JSONDecodeError as e:
        raise VectorlayError(
            f"{STATE_PATH} is not valid JSON ({e.msg} at line {e.lineno})",
            MOVE_AWAY,
        ) from None
    if not isinstance(data, dict):
        raise VectorlayError(f"{STATE_PATH} must hold a JSON object", MOVE_AWAY)
    hints = typing.get_type_hints(RunState)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in hints:
            continue
        if not _has_type(value, hints[key]):
            raise VectorlayError(f"{STATE_PATH}: {key} has the wrong type ({_json_type(value)})", MOVE_AWAY)
        values[key] = value
    return RunState(**values)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _has_type(value: Any, hint: Any) -> bool:
    """`value` (parsed JSON) fits the field's annotation: str, int, None, unions, list[...], dict[...]."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _has_type(k, args[0]) and _has_type(v, args[1]) for k, v in value.items()
        )
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


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
