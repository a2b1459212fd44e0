"""Three renderings of one Report: aligned terminal lines, the JSON contract, Prometheus text."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TextIO

from doctor.checks import CHECKS
from doctor.model import UNIT_STATUSES, DeviceHealth, Report, Status, UnitHealth

_COLOURS = {Status.PASS: "32", Status.WARN: "33", Status.FAIL: "1;31", Status.SKIP: "2"}
_LABEL_WIDTH = 15
_SUMMARY_LAST = frozenset({"gpu_units"})
_MAX_MESSAGE_WIDTH = 66


def use_colour(stream: TextIO) -> bool:
    # https://no-color.org; and never colour a pipe or a file.
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def render_text(report: Report, colour: bool = False) -> str:
    """virt-host-validate style: `  Label: message .... : STATUS (fix)`, evidence lines above each."""

    def paint(status: Status) -> str:
        return f"\033[{_COLOURS[status]}m{status.value}\033[0m" if colour else status.value

    width = min(_MAX_MESSAGE_WIDTH, max((len(r.message) for r in report.results), default=0))
    lines = []
    for r in report.results:
        label = f"{CHECKS[r.name].label}:"  # a result of no check is a bug: no fallback hides it
        line = f"{r.message:<{width}} : {paint(r.status)}"
        if r.hint and r.status is not Status.PASS:
            line += f" ({r.hint})"
        if r.name in _SUMMARY_LAST and r.details:
            # The per-unit lines come first and the check's line closes the block with N/M.
            rows = [*r.details, line]
        else:
            rows = [line, *(f"  {d}" for d in r.details)]
        lines.append(f"  {label:<{_LABEL_WIDTH}}{rows[0]}")
        lines.extend(f"  {'':<{_LABEL_WIDTH}}{row}" for row in rows[1:])
    lines.append("")
    lines.append(f"Verdict: {paint(report.verdict)} ({_verdict_reason(report)})")
    return "\n".join(lines) + "\n"


def _verdict_reason(report: Report) -> str:
    failed = [r.name for r in report.results if r.status is Status.FAIL]
    warned = [r.name for r in report.results if r.status is Status.WARN]
    if failed:
        return f"{len(failed)} check(s) failed: {', '.join(failed)}"
    if warned:
        return f"healthy with {len(warned)} warning(s): {', '.join(warned)}"
    if report.units_total:
        return f"healthy; {report.units_ready} GPU unit(s) may be advertised"
    return "healthy"


def to_json(report: Report) -> dict[str, Any]:
    """Exactly docs/contracts.md#doctor---json: scripts and the control plane parse it."""
    return {
        "verdict": report.verdict.value,
        "checks": [
            {"name": r.name, "status": r.status.value, "message": r.message, "hint": r.hint}
            for r in report.results
        ],
        "gpu_units": {"ready": report.units_ready, "total": report.units_total},
        "units": [_unit_json(u) for u in report.units],
    }


def _unit_json(unit: UnitHealth) -> dict[str, Any]:
    return {
        "id": unit.id,
        "iommu_group": unit.iommu_group,
        "status": unit.status,
        "devices": [
            {
                "address": d.address,
                "role": d.role,
                "present": d.present,
                "driver": d.driver,
                "link": None if d.link is None else d.link._asdict(),
                "aer": None if d.aer is None else d.aer._asdict(),
                "reset_method": None if d.reset_method is None else list(d.reset_method),
            }
            for d in unit.devices
        ],
        "reasons": [r._asdict() for r in unit.reasons],
    }


def render_json(report: Report) -> str:
    import json  # not at the top: the text and the Prometheus forms do without it

    return json.dumps(to_json(report), indent=2) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


PREFIX = "vectorlay_node_doctor"
_VERDICTS = (Status.PASS, Status.WARN, Status.FAIL)


def render_prometheus(report: Report, now: float | None = None) -> str:
    """node_exporter textfile-collector format: one gauge line per (check, status), like its
    systemd collector's unit state, so alerts can match `status="FAIL"` without knowing the checks."""
    out: list[str] = []

    def gauge(name: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {PREFIX}_{name} {help_text}")
        out.append(f"# TYPE {PREFIX}_{name} gauge")
        out.extend(f"{PREFIX}_{name}{labels} {_number(value)}" for labels, value in samples)

    gauge(
        "check_status",
        "Result of each doctor check: 1 on the line of the status it has, 0 on the others.",
        [
            (f'{{check="{_label(r.name)}",status="{s.value}"}}', 1 if r.status is s else 0)
            for r in report.results
            for s in Status
        ],
    )
    gauge(
        "verdict",
        "The doctor's verdict: 1 on the line of the verdict, 0 on the others.",
        [(f'{{verdict="{v.value}"}}', 1 if report.verdict is v else 0) for v in _VERDICTS],
    )
    unit = "GPUs on the nvidia driver" if report.mode == "container" else "IOMMU groups"
    gauge("gpu_units_ready", f"GPU units ({unit}) ready to rent.", [("", report.units_ready)])
    gauge("gpu_units", f"GPU units ({unit}) on the node.", [("", report.units_total)])
    # The name 0.1.0 wrote, kept for one release for the scripts and alerts that query it. Prometheus'
    # naming rules keep `_total` for counters (promtool rejects a gauge named so); untyped, as a
    # sample whose type is not declared, it passes, and queries of the name see the same value.
    out.append(f"# HELP {PREFIX}_gpu_units_total Deprecated: use {PREFIX}_gpu_units (removed in 0.3.0).")
    out.append(f"# TYPE {PREFIX}_gpu_units_total untyped")
    out.append(f"{PREFIX}_gpu_units_total {_number(report.units_total)}")
    gauge("wedged_gpus", "GPUs and NVSwitches that fell off the bus.", [("", len(report.wedged))])
    if report.wedged:
        gauge(
            "gpu_wedged",
            "1 for each GPU or NVSwitch that fell off the bus, by PCI address.",
            [(f'{{address="{_label(a)}"}}', 1) for a in report.wedged],
        )
    _unit_series(report, gauge, out)
    gauge(
        "last_run_timestamp_seconds",
        "When the doctor wrote this file (Unix time).",
        [("", round(time.time() if now is None else now, 3))],
    )
    return "\n".join(out) + "\n"


def _unit_series(
    report: Report, gauge: Callable[[str, str, list[tuple[str, float]]], None], out: list[str]
) -> None:
    """Per unit (label `unit`, its id): ready?, its status, each GPU/NVSwitch's link and AER counts."""
    units = report.units
    if not units:
        return
    gauge(
        "unit_ready",
        "1 for a GPU unit that may be rented (ready or degraded), 0 for one that may not.",
        [(f'{{unit="{_label(u.id)}"}}', 1 if u.rentable else 0) for u in units],
    )
    gauge(
        "unit_status",
        "Each GPU unit's status: 1 on the line of the status it has, 0 on the others.",
        [
            (f'{{status="{s}",unit="{_label(u.id)}"}}', 1 if u.status == s else 0)
            for u in units
            for s in UNIT_STATUSES
        ],
    )
    links = [(u, d) for u in units for d in u.devices if d.link is not None]
    if links:
        _link_series(links, gauge)
    aer = [(u, d) for u in units for d in u.devices if d.aer is not None]
    if not aer:
        return
    # Counted by the kernel since boot: a counter, so rate() and increase() apply.
    name = f"{PREFIX}_unit_aer_errors_total"
    out.append(f"# HELP {name} PCIe AER errors each GPU/NVSwitch of a unit reported since boot, by severity.")
    out.append(f"# TYPE {name} counter")
    for u, d in aer:
        for severity, count in d.aer._asdict().items() if d.aer else ():
            labels = f'{{device="{_label(d.address)}",severity="{severity}",unit="{_label(u.id)}"}}'
            out.append(f"{name}{labels} {_number(count)}")


def _link_series(
    links: list[tuple[UnitHealth, DeviceHealth]], gauge: Callable[[str, str, list[tuple[str, float]]], None]
) -> None:
    gauge(
        "unit_link_width",
        "PCIe lanes each GPU/NVSwitch of a unit trained at.",
        [
            (f'{{device="{_label(d.address)}",unit="{_label(u.id)}"}}', d.link.width)
            for u, d in links
            if d.link
        ],
    )
    gauge(
        "unit_link_max_width",
        "PCIe lanes each GPU/NVSwitch of a unit can train at.",
        [
            (f'{{device="{_label(d.address)}",unit="{_label(u.id)}"}}', d.link.max_width)
            for u, d in links
            if d.link
        ],
    )
