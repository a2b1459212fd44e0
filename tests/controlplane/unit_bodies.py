"""Heartbeat bodies carrying the doctor's per-unit state (`doctor.units`, docs/contracts.md), for the
control plane's tests: well-formed ones and the malformed ones it must answer 400."""

from __future__ import annotations

import copy
from typing import Any

BASE: dict[str, Any] = {
    "doctor": {
        "verdict": "PASS",
        "checks": [{"name": "gpu_units", "status": "PASS", "message": "8/8 GPU unit(s) ready", "hint": None}],
        "gpu_units": {"ready": 8, "total": 8},
    },
    "resources": {"cpu_percent": 12.5, "memory_percent": 40.0, "disk_percent": 30.0},
    "agents": {"nebula": "1.9.5", "nomad": "1.8.4", "node-agent": "1.0.0"},
    "draining": False,
}

LINK_X8 = {
    "code": "link_degraded",
    "device": "0000:28:00.0",
    "message": "PCIe link x8 of x16 (32.0 GT/s of 32.0 GT/s)",
    "hint": "reseat the card or its riser, or move it to a full-width slot",
}
WEDGED = {
    "code": "wedged",
    "device": "0000:18:00.0",
    "message": "GPU 0000:18:00.0 does not answer (config space reads 0xffff)",
    "hint": "power-cycle the node (a reboot does not reset a wedged GPU)",
}


def device(address: str, **changes: Any) -> dict[str, Any]:
    return {
        "address": address,
        "role": "gpu",
        "present": True,
        "driver": "vfio-pci",
        "link": {"speed": "32.0 GT/s", "width": 16, "max_speed": "32.0 GT/s", "max_width": 16},
        "aer": {"correctable": 0, "nonfatal": 0, "fatal": 0},
        "reset_method": ["flr", "bus"],
        **changes,
    }


def unit(uid: str, status: str = "ready", reasons: list[Any] | None = None, **changes: Any) -> dict[str, Any]:
    group = uid if uid.isdigit() else None
    address = f"0000:{int(uid) % 256:02x}:00.0" if uid.isdigit() else uid
    return {
        "id": uid,
        "iommu_group": group,
        "status": status,
        "devices": [device(address)],
        "reasons": reasons or [],
        **changes,
    }


def with_units(units: list[Any], *, draining: bool = False, **gpu_units: Any) -> dict[str, Any]:
    """BASE with `units` as doctor.units and doctor.gpu_units counted from them (as the doctor counts:
    ready = ready or degraded), unless `gpu_units` overrides the counts."""
    body = copy.deepcopy(BASE)
    ready = sum(1 for u in units if isinstance(u, dict) and u.get("status") in ("ready", "degraded"))
    body["doctor"]["units"] = units
    body["doctor"]["gpu_units"] = {"ready": ready, "total": len(units), **gpu_units}
    body["draining"] = draining
    return body


def _one(**changes: Any) -> dict[str, Any]:
    return with_units([unit("24", **changes)])


def _dev(**changes: Any) -> dict[str, Any]:
    return _one(devices=[{**device("0000:18:00.0"), **changes}])


def _reason(**changes: Any) -> dict[str, Any]:
    return _one(status="degraded", reasons=[{**LINK_X8, **changes}])


def malformed_units() -> list[Any]:
    """Heartbeats whose `doctor.units` breaks the contract: each must be answered 400, never 500."""
    return [
        with_units("all ready"),  # type: ignore[arg-type]
        with_units([unit(str(i)) for i in range(65)]),
        with_units(["24"]),
        with_units([unit("24"), unit("24")]),
        _one(id=24),
        _one(id="g24"),
        _one(id="1234567"),
        _one(id="24\n"),
        _one(id="0000:18:00.0 "),
        _one(id="0000:18:00.0\n"),
        _one(id="0000:18:00.8"),
        _one(id="0000:1G:00.0"),
        _one(iommu_group="twenty"),
        _one(iommu_group=24),
        with_units([unit("24", status="ok")]),
        _one(status=None),
        _one(devices="0000:18:00.0"),
        _one(devices=[device(f"0000:{i:02x}:00.0") for i in range(33)]),
        _one(devices=[device("0000:18:00.0"), device("0000:18:00.0")]),
        _one(devices=["0000:18:00.0"]),
        _dev(address="18:00.0"),
        _dev(role="display"),
        _dev(present="yes"),
        _dev(driver="vfio pci"),
        _dev(driver="x" * 65),
        _dev(link="x16"),
        _dev(link={"speed": "32.0 GT/s", "width": 99, "max_speed": "32.0 GT/s", "max_width": 16}),
        _dev(link={"speed": "32.0 GT/s\x1b[2J", "width": 16}),
        _dev(aer={"correctable": 0, "nonfatal": 0, "fatal": -1}),
        _dev(aer={"correctable": 0, "nonfatal": 0, "fatal": True}),
        _dev(aer={"correctable": 2**64, "nonfatal": 0, "fatal": 0}),
        _dev(aer={"correctable": 1.5, "nonfatal": 0, "fatal": 0}),
        _dev(reset_method="flr"),
        _dev(reset_method=["flr"] * 17),
        _dev(reset_method=["flr bus"]),
        _one(reasons="link degraded"),
        _one(status="degraded", reasons=[LINK_X8] * 17),
        _one(status="degraded", reasons=["link degraded"]),
        _reason(code="LinkDegraded"),
        _reason(code=None),
        _reason(device="0000:18:00"),
        _reason(message=""),
        _reason(message="m" * 201),
        _reason(message="PCIe link x8\x1b[2J"),
        _reason(message="PCIe link x8\n"),
        _reason(message=None),
        _reason(hint="h" * 201),
        _reason(hint=["reseat"]),
        # The count older control planes read must agree with the units.
        with_units([unit("24"), unit("25", status="not_ready", reasons=[WEDGED])], ready=2),
        with_units([unit("24")], total=2),
    ]
