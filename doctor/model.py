"""What a check returns: data only. Rendering (terminal, JSON, Prometheus) lives in doctor.render.

Named tuples, not dataclasses: every doctor run creates these classes at import, and a frozen
dataclass compiles six generated methods then, which costs more start-up time than all the checks.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple


class Status(str, Enum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


class _CheckFields(NamedTuple):
    name: str  # stable: docs/contracts.md#vectorlay-node-doctor
    status: Status
    message: str
    hint: str | None = None  # one-line fix; required for WARN and FAIL
    details: tuple[str, ...] = ()  # evidence shown to people (not part of the JSON contract)


class CheckResult(_CheckFields):
    """One check's outcome: a status, a message and, unless it passed, a fix."""

    __slots__ = ()

    # A NamedTuple cannot define __new__ itself, hence the base class.
    def __new__(
        cls,
        name: str,
        status: Status,
        message: str,
        hint: str | None = None,
        details: tuple[str, ...] = (),
    ) -> CheckResult:
        if status in (Status.WARN, Status.FAIL) and not hint:
            raise ValueError(f"check {name}: a {status.value} needs a hint saying what to do")
        return super().__new__(cls, name, status, message, hint, details)


# A unit's status (docs/contracts.md#doctor---json): rentable and advertised, rentable with a
# warning, or neither.
READY, DEGRADED, NOT_READY = "ready", "degraded", "not_ready"
UNIT_STATUSES = (READY, DEGRADED, NOT_READY)
# Reason codes by their effect on the unit. Stable: the control plane and scripts match on them.
BLOCKING = frozenset(
    {
        "not_on_vfio",
        "not_on_nvidia",
        "not_isolatable",
        "no_group",
        "wedged",
        "gpu_missing",
        "aer_fatal",
        "no_reset_method",
        "group_unusable",
        "probe_failed",
        "not_probed",
    }
)
DEGRADING = frozenset({"link_degraded", "aer_nonfatal"})
INFORMATIONAL = frozenset({"aer_correctable"})
MAX_REASONS = 16
MAX_REASON_TEXT = 200


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_REASON_TEXT else text[: MAX_REASON_TEXT - 3] + "..."


class _ReasonFields(NamedTuple):
    code: str
    device: str | None  # the PCI address it is about
    message: str
    hint: str


class Reason(_ReasonFields):
    """Why a unit is not (fully) ready: a stable code, the device, what is wrong and what to do."""

    __slots__ = ()

    def __new__(cls, code: str, device: str | None, message: str, hint: str) -> Reason:
        if code not in BLOCKING | DEGRADING | INFORMATIONAL:
            raise ValueError(f"unknown unit reason code {code!r}")
        return super().__new__(cls, code, device, _bounded(message), _bounded(hint))


class Link(NamedTuple):
    """A device's PCIe link as trained, against what the device can do."""

    speed: str  # "32.0 GT/s"
    width: int
    max_speed: str
    max_width: int


class Aer(NamedTuple):
    """A device's AER error counts since boot (the TOTAL_ERR_* lines of its aer_dev_* files)."""

    correctable: int
    nonfatal: int
    fatal: int


class DeviceHealth(NamedTuple):
    """One function of a unit as sysfs shows it now."""

    address: str
    role: str  # "gpu" | "nvswitch" | "function"
    present: bool  # False: enrolled but gone from the bus
    driver: str | None
    link: Link | None = None  # None: not a GPU/NVSwitch, or no link attributes
    aer: Aer | None = None  # None: not a GPU/NVSwitch, or not AER capable
    reset_method: tuple[str, ...] | None = None  # () when empty; None when the kernel has no file
    resettable: bool = True  # False: the kernel shows no `reset` file (it found no way to reset it)


class UnitHealth(NamedTuple):
    """One GPU unit: its devices, its status and the reasons for it."""

    id: str  # passthrough: the IOMMU group (the GPU's address without one); container: the GPU's address
    iommu_group: str | None
    status: str  # READY | DEGRADED | NOT_READY
    devices: tuple[DeviceHealth, ...]
    reasons: tuple[Reason, ...]
    line: str  # the terminal's line for it: "group 17: 0000:18:00.0 H100 ...: ready"

    @property
    def rentable(self) -> bool:
        return self.status != NOT_READY


def unit_status(reasons: tuple[Reason, ...]) -> str:
    if any(r.code in BLOCKING for r in reasons):
        return NOT_READY
    if any(r.code in DEGRADING for r in reasons):
        return DEGRADED
    return READY


class Report(NamedTuple):
    """Every check's result, with the GPU unit counts and wedged devices the outputs show."""

    results: tuple[CheckResult, ...]
    mode: str  # passthrough | container | none
    units_ready: int = 0  # units ready or degraded: the ones that may be advertised
    units_total: int = 0
    wedged: tuple[str, ...] = ()  # addresses of GPUs/NVSwitches that fell off the bus
    units: tuple[UnitHealth, ...] = ()

    @property
    def verdict(self) -> Status:
        statuses = {r.status for r in self.results}
        if Status.FAIL in statuses:
            return Status.FAIL
        if Status.WARN in statuses:
            return Status.WARN
        return Status.PASS

    @property
    def exit_code(self) -> int:
        return 1 if self.verdict is Status.FAIL else 0

    def get(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)
