"""The GPU units for rent (IOMMU groups in passthrough, GPUs in container mode), the container
mode's driver and runtime, and GPUs that fell off the bus."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from bootstrap import runsc
from bootstrap.host import CommandResult
from bootstrap.paths import RUNSC
from bootstrap.pci import PciDevice
from doctor.checks.registry import REINSTALL, Context, check, gpu_skip
from doctor.model import BLOCKING, DEGRADED, DEGRADING, NOT_READY, READY, CheckResult, Status, UnitHealth
from doctor.units import RESTART_BIND


def _off_nvidia_hint(devices: Iterable[PciDevice]) -> str:
    """What brings GPUs that container mode cannot share (back) onto the nvidia driver."""
    devices = list(devices)
    if any(d.wedged for d in devices):
        return "power-cycle the host (see the wedged check)"
    if any(d.driver == "vfio-pci" for d in devices):
        return (
            "GPUs on vfio-pci are set up for passthrough: sudo vectorlay-bootstrap uninstall, reboot, "
            "then re-run the install one-liner with gpu=1"
        )
    return "container mode shares only NVIDIA GPUs on the nvidia driver: sudo modprobe nvidia (or reboot)"


# Reasons the unit's own line already tells (the check's hint says the fix): not repeated below it.
_TOLD_BY_LINE = frozenset(
    {"not_on_vfio", "not_on_nvidia", "not_isolatable", "wedged", "no_group", "group_unusable"}
)


def _unit_details(units: list[UnitHealth]) -> tuple[str, ...]:
    """Each unit's line, and under a unit that is not ready its reasons, each with its fix."""
    lines = []
    for u in units:
        lines.append(u.line)
        if u.status != READY:
            lines.extend(
                f"  {_where(r.device)}{r.message} ({r.hint})"
                for r in u.reasons
                if r.code not in _TOLD_BY_LINE
            )
    return tuple(lines)


def _where(device: str | None) -> str:
    # A reason about the whole unit (the VM-attach probe's) names no device.
    return "" if device is None else f"{device}: "


def _first_reason_hint(units: list[UnitHealth], codes: frozenset[str]) -> str:
    unit, reason = next((u, r) for u in units for r in u.reasons if r.code in codes)
    return f"unit {unit.id}, {_where(reason.device)}{reason.hint}"


def _counted(ctx: Context, what: str) -> tuple[list[UnitHealth], int, bool, str]:
    """The units, how many can be rented, whether all are ready, and the check's message."""
    units = ctx.unit_health()
    ready, total = ctx.units()
    degraded = sum(1 for u in units if u.status == DEGRADED)
    message = f"{ready}/{total} {what}" + (f" ({degraded} degraded)" if degraded else "")
    return units, ready, ready == total and not degraded, message


def _check_shared_gpus(ctx: Context, name: str) -> CheckResult:
    units, ready, all_ready, message = _counted(ctx, "GPU(s) on the nvidia driver, shared through runsc")
    details = _unit_details(units)
    if all_ready:
        return CheckResult(name, Status.PASS, message, None, details)
    down = [u for u in units if u.status == NOT_READY]
    off = [
        ctx.inventory.devices[u.id]
        for u in down
        if u.id in ctx.inventory.devices and any(r.code in ("wedged", "not_on_nvidia") for r in u.reasons)
    ]
    if off:
        hint = _off_nvidia_hint(off)
    else:
        hint = _first_reason_hint(down or units, BLOCKING if down else DEGRADING)
    return CheckResult(name, Status.FAIL if ready == 0 else Status.WARN, message, hint, details)


@check("gpu_units", "GPU units")
def check_gpu_units(ctx: Context, name: str) -> CheckResult:
    skip = gpu_skip(ctx, name)
    if skip is not None:
        return skip
    if ctx.mode == "container":
        return _check_shared_gpus(ctx, name)
    units, ready, all_ready, message = _counted(ctx, "GPU unit(s) ready to rent")
    details = _unit_details(units)
    if all_ready:
        return CheckResult(name, Status.PASS, message, None, details)
    codes = {r.code for u in units if u.status == NOT_READY for r in u.reasons}
    if "not_on_vfio" in codes or "group_unusable" in codes:
        hint = RESTART_BIND
    elif "not_isolatable" in codes:
        blocker = next(r.device for u in units for r in u.reasons if r.code == "not_isolatable")
        hint = (
            f"move the GPU to a slot with its own IOMMU group (or enable ACS in BIOS/UEFI): "
            f"it cannot be passed through while {ctx.inventory.describe(blocker or '')} shares its group"
        )
    elif "wedged" in codes:
        hint = "power-cycle the host (see the wedged check)"
    elif "no_group" in codes:
        hint = "turn the IOMMU on (see the iommu check)"
    elif codes & BLOCKING:
        hint = _first_reason_hint(units, BLOCKING)
    else:
        hint = _first_reason_hint(units, DEGRADING)
    # Some units rentable: the node still rents those, so a warning; none: nothing to advertise.
    return CheckResult(name, Status.FAIL if ready == 0 else Status.WARN, message, hint, details)


@check("nvidia_driver", "NVIDIA driver", modes=("container",))
def check_nvidia_driver(ctx: Context, name: str) -> CheckResult:
    skip = gpu_skip(ctx, name)
    if skip is not None:
        return skip
    host = ctx.host
    if not host.exists("/sys/module/nvidia"):
        return CheckResult(
            name,
            Status.FAIL,
            "NVIDIA driver not loaded (no /sys/module/nvidia)",
            "install the NVIDIA server driver (sudo apt-get install nvidia-driver-550-server), reboot",
        )
    version = host.read_text("/sys/module/nvidia/version", default="").strip()
    loaded = f"NVIDIA driver {version} loaded" if version else "NVIDIA driver loaded"
    off = [d for d in ctx.inventory.gpus if d.vendor_id == "10de" and d.driver != "nvidia"]
    if off:
        listed = ", ".join(f"{d.address} on {d.driver or 'no driver'}" for d in off)
        return CheckResult(
            name, Status.WARN, f"{loaded}, but {len(off)} GPU(s) not on it: {listed}", _off_nvidia_hint(off)
        )
    return CheckResult(name, Status.PASS, loaded)


RUNSC_TIMEOUT = 10.0
_RUNSC_VERSION = re.compile(r"^runsc version (\S+)", re.M)
NEWER_RUNSC = (
    f"nvproxy needs gVisor {runsc.NVPROXY_SINCE} or later: the control plane must serve a newer runsc "
    "artifact; then re-run the install one-liner with gpu=1"
)


def _first_line(res: CommandResult) -> str:
    lines = (res.stderr or res.stdout).strip().splitlines()
    return lines[0] if lines else f"exit status {res.returncode}"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isascii() and p.isdigit() else -1 for p in version.split("."))


def _runsc_driver_support(ctx: Context, name: str, version: str, args: str) -> CheckResult:
    """The flags are accepted; nvproxy must also know the loaded NVIDIA driver's ABI."""
    host = ctx.host
    accepted = f"runsc {version} accepts {args}"
    details = [f"at {RUNSC}"]
    driver = host.read_text("/sys/module/nvidia/version", default="").strip()
    if not driver:
        return CheckResult(name, Status.PASS, accepted, None, tuple(details))  # nvidia_driver says why
    res = host.run(runsc.drivers_probe(), timeout=RUNSC_TIMEOUT)
    # runsc lists them in no particular order; the newest are what an operator would install.
    supported = sorted(res.stdout.split() if res.ok else [], key=_version_key)
    if not supported:
        details.append(f"it does not list the NVIDIA drivers nvproxy supports ({_first_line(res)})")
        return CheckResult(name, Status.PASS, accepted, None, tuple(details))
    if driver not in supported:
        return CheckResult(
            name,
            Status.FAIL,
            f"runsc {version} has no nvproxy support for NVIDIA driver {driver}: GPU containers cannot start",
            f"install an NVIDIA driver it supports (newest: {', '.join(supported[-3:])}; all: runsc "
            "nvproxy list-supported-drivers), or the control plane must serve a runsc that supports "
            + driver,
            (*details, "supported: " + " ".join(supported)),
        )
    passed = f"{accepted}; nvproxy supports driver {driver}"
    return CheckResult(name, Status.PASS, passed, None, tuple(details))


@check("runsc", "runsc", modes=("container",))
def check_runsc(ctx: Context, name: str) -> CheckResult:
    """The installed runsc, run with the arguments docker passes it: its flag parser must accept them."""
    skip = gpu_skip(ctx, name)
    if skip is not None:
        return skip
    host = ctx.host
    real = host.path(RUNSC)
    if not real.is_file():
        return CheckResult(
            name, Status.FAIL, f"runsc (gVisor) not installed at {RUNSC}", REINSTALL + " with gpu=1"
        )
    if not os.access(real, os.X_OK):
        return CheckResult(name, Status.FAIL, f"{RUNSC} is not executable", REINSTALL + " with gpu=1")
    args = " ".join(runsc.RUNTIME_ARGS)
    res = host.run(runsc.flag_probe(), timeout=RUNSC_TIMEOUT)
    found = _RUNSC_VERSION.search(res.stdout)
    if res.ok and found:
        return _runsc_driver_support(ctx, name, found[1], args)
    if res.returncode == 124:
        return CheckResult(
            name,
            Status.FAIL,
            f"{RUNSC} {args} --version did not answer within {RUNSC_TIMEOUT:.0f}s",
            REINSTALL + " with gpu=1",
        )
    if res.ok:
        return CheckResult(
            name, Status.FAIL, f"{RUNSC} {args} --version printed no runsc version", REINSTALL + " with gpu=1"
        )
    plain = host.run([RUNSC, "--version"], timeout=RUNSC_TIMEOUT)
    version = _RUNSC_VERSION.search(plain.stdout) if plain.ok else None
    what = f"runsc {version[1]}" if version else RUNSC
    return CheckResult(name, Status.FAIL, f"{what} refuses {args} ({_first_line(res)})", NEWER_RUNSC)


@check("wedged", "Wedged GPUs")
def check_wedged(ctx: Context, name: str) -> CheckResult:
    skip = gpu_skip(ctx, name)
    if skip is not None:
        return skip
    wedged = ctx.inventory.wedged
    log = ctx.kernel_log()
    details = tuple(log[-5:])
    if wedged:
        addrs = ", ".join(d.address for d in wedged)
        what = "GPU" if len(wedged) == 1 else "GPUs"
        # A wedged GPU's unit is not ready (gpu_units withholds it); a FAIL here would make the
        # verdict FAIL and withdraw every healthy unit of the node along with it.
        ready, _ = ctx.units()
        return CheckResult(
            name,
            Status.WARN if ready else Status.FAIL,
            f"{what} {addrs} fell off the bus (D3cold reset bug)",
            "power-cycle the host; a soft reboot may not clear it",
            details,
        )
    if log:
        return CheckResult(
            name,
            Status.WARN,
            f"kernel log reports a GPU falling off the bus this boot ({len(log)} line(s))",
            "if a GPU misbehaves, power-cycle the host; a soft reboot may not clear it",
            details,
        )
    n = len(ctx.inventory.gpus) + len(ctx.inventory.nvswitches)
    return CheckResult(name, Status.PASS, f"no wedged GPU ({n} GPU/NVSwitch function(s) answer)")
