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


class Report(NamedTuple):
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
