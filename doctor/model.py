"""What a check returns: data only. Rendering (terminal, JSON, Prometheus) lives in doctor.render."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Status(str, Enum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: a status, a message and, unless it passed, a fix."""

    name: str  # stable: docs/contracts.md#vectorlay-node-doctor
    status: Status
    message: str
    hint: str | None = None  # one-line fix; required for WARN and FAIL
    details: tuple[str, ...] = ()  # evidence shown to people (not part of the JSON contract)

    def __post_init__(self) -> None:
        if self.status in (Status.WARN, Status.FAIL) and not self.hint:
            raise ValueError(f"check {self.name}: a {self.status.value} needs a hint saying what to do")


@dataclass(frozen=True)
class Report:
    """Every check's result, with the GPU unit counts and wedged devices the outputs show."""

    results: tuple[CheckResult, ...]
    mode: str  # passthrough | container | none
    units_ready: int = 0
    units_total: int = 0
    wedged: tuple[str, ...] = ()  # addresses of GPUs/NVSwitches that fell off the bus

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
