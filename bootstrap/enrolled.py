"""The GPUs a node enrolled with (bootstrap.paths.ENROLLED_GPUS): written by the enroll stage once the
control plane has accepted the node, read by the doctor to tell a GPU that left the bus since.

    {"version": 1, "gpu_mode": "passthrough", "gpus": [{"address": "0000:18:00.0", "iommu_group": "17"}]}

Only what the enrollment reported is recorded, so a re-enrollment (a new token) is how an operator who
removed a GPU on purpose makes the node stop reporting it missing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

from bootstrap.fsutil import atomic_write, read_regular
from bootstrap.host import Host
from bootstrap.paths import ENROLLED_GPUS

VERSION = 1
# More than any board carries (a record of thousands is not one we wrote): bounds the read.
_LIMIT = 64 << 10
_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]")
_GROUP = re.compile(r"[0-9]{1,6}")


class EnrolledGpu(NamedTuple):
    address: str
    iommu_group: str | None


def gpus_of_report(hardware: Mapping[str, object]) -> list[EnrolledGpu]:
    """The GPUs of the hardware report the enrollment sent (bootstrap.hardware.hardware_report)."""
    out = []
    for g in hardware.get("gpus") or []:  # type: ignore[attr-defined]
        if isinstance(g, Mapping) and isinstance(g.get("address"), str):
            group = g.get("iommu_group")
            out.append(EnrolledGpu(g["address"], group if isinstance(group, str) else None))
    return out


def write_enrolled(host: Host, gpu_mode: str, gpus: list[EnrolledGpu]) -> None:
    import json

    record = {
        "version": VERSION,
        "gpu_mode": gpu_mode,
        "gpus": [{"address": g.address, "iommu_group": g.iommu_group} for g in gpus],
    }
    atomic_write(host.path(ENROLLED_GPUS), json.dumps(record, indent=2) + "\n", mode=0o644)


def read_enrolled(host: Host) -> list[EnrolledGpu] | None:
    """The enrolled GPUs, or None when the node has no usable record (enrolled before it existed,
    or the file is not one we wrote): then no GPU is reported missing."""
    try:
        raw = read_regular(host.path(ENROLLED_GPUS), _LIMIT + 1)
    except OSError:
        return None
    import json  # only a node with a record pays for the decoder

    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("gpus"), list):
        return None
    out = []
    for g in data["gpus"]:
        if not isinstance(g, dict):
            return None
        address, group = g.get("address"), g.get("iommu_group")
        if not (isinstance(address, str) and _ADDRESS.fullmatch(address)):
            return None
        if group is not None and not (isinstance(group, str) and _GROUP.fullmatch(group)):
            return None
        out.append(EnrolledGpu(address, group))
    return out
