"""What the VM-attach probe's records say of one unit, for the doctor's unit health.

The probe (bootstrap.vmprobe: the install's verify stage, `vectorlay-node-doctor --probe-units`)
keeps one record per unit. On a live host a unit is rentable only once a probe attached exactly its
current devices; on a host tree (`--root`) a missing record says nothing (trees are laid out by
hand), but a record present in the tree is honoured.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from bootstrap.host import Host
from bootstrap.vmprobe import current_record, load_records

NOT_PROBED_HINT = "sudo vectorlay-node-doctor --probe-units"
_LIMIT = 200  # docs/contracts.md#doctor---json: a reason's message and hint each at most 200 characters


def probe_reason(
    host: Host,
    unit_id: str,
    devices: Iterable[str],
    records: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[str, str, str] | None:
    """(code, message, hint) when the probe keeps `unit_id` out of the rentable units, else None.

    `devices`: the unit's functions a VM is given (bootstrap.vmprobe.unit_devices). `records`: the
    loaded records (bootstrap.vmprobe.load_records), to read the file once for all units.
    """
    if records is None:
        records = load_records(host)
    rec = current_record(records, unit_id, devices)
    if rec is None:
        if not host.is_live:
            return None
        changed = unit_id in records
        message = (
            "the unit's devices changed since its VM-attach probe"
            if changed
            else "no VM-attach probe has passed for this unit yet"
        )
        return "not_probed", message, NOT_PROBED_HINT
    if rec["ok"]:
        return None
    error = rec["error"] or "QEMU failed without a message"
    message = f"VM-attach probe failed: {error}"
    if len(message) > _LIMIT:
        message = message[: _LIMIT - 3] + "..."
    hint = (rec["hint"] or NOT_PROBED_HINT)[:_LIMIT]
    return "probe_failed", message, hint
