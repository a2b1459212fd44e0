"""The GPU units for rent (IOMMU groups in passthrough, GPUs in container mode), the container
mode's driver and runtime, and GPUs that fell off the bus."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from bootstrap import runsc
from bootstrap.discovery import Unit, UnitStatus
from bootstrap.host import CommandResult
from bootstrap.paths import RUNSC
from bootstrap.pci import PciDevice
from doctor.checks.registry import REINSTALL, Context, check, gpu_skip
from doctor.model import CheckResult, Status

RESTART_BIND = "sudo systemctl restart vectorlay-vfio-bind or re-run the bootstrap"


def unit_readiness(ctx: Context, unit: Unit) -> tuple[Unit, bool, str]:
    inv = ctx.inventory
    group = f"group {unit.iommu_group}" if unit.iommu_group is not None else "no group"
    gpus = ", ".join(f"{a} {inv.name(a)}".rstrip() for a in unit.gpus)
    head = f"{group}: {gpus}"
    if unit.status is UnitStatus.READY:
        if ctx.host.is_live:
            from doctor.probes import probe_vfio_group

            probe = probe_vfio_group(f"/dev/vfio/{unit.iommu_group}")
            if not probe.usable:
                return unit, False, f"{head}: on vfio-pci but {probe.state}"
            return unit, True, f"{head}: ready ({probe.state})"
        return unit, True, f"{head}: ready"
    if unit.status is UnitStatus.NEEDS_BINDING:
        drivers = sorted({inv.devices[a].driver or "no driver" for a in unit.unbound if a in inv.devices})
        return unit, False, f"{head}: not on vfio-pci ({', '.join(unit.unbound)} on {', '.join(drivers)})"
    if unit.status is UnitStatus.NOT_ISOLATABLE:
        shared = "; ".join(inv.describe(b) for b in unit.blockers)
        return unit, False, f"{head}: not isolatable, shares its IOMMU group with {shared}"
    if unit.status is UnitStatus.WEDGED:
        return unit, False, f"{head}: WEDGED (fell off the bus)"
    return unit, False, f"{head}: no IOMMU group"


def shared_readiness(ctx: Context, dev: PciDevice) -> tuple[PciDevice, bool, str]:
    head = f"{dev.address} {ctx.inventory.name(dev.address)}".rstrip()
    if dev.wedged:
        return dev, False, f"{head}: WEDGED (fell off the bus)"
    if dev.driver != "nvidia":
        return dev, False, f"{head}: on {dev.driver or 'no driver'}, not on nvidia"
    return dev, True, f"{head}: on nvidia"


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


def _check_shared_gpus(ctx: Context, name: str) -> CheckResult:
    rows = ctx.shared_gpus()
    ready, total = ctx.units()
    message = f"{ready}/{total} GPU(s) on the nvidia driver, shared through runsc"
    details = tuple(line for _, _, line in rows)
    if ready == total:
        return CheckResult(name, Status.PASS, message, None, details)
    hint = _off_nvidia_hint(d for d, ok, _ in rows if not ok)
    return CheckResult(name, Status.FAIL if ready == 0 else Status.WARN, message, hint, details)


@check("gpu_units", "GPU units")
def check_gpu_units(ctx: Context, name: str) -> CheckResult:
    skip = gpu_skip(ctx, name)
    if skip is not None:
        return skip
    if ctx.mode == "container":
        return _check_shared_gpus(ctx, name)
    rows = ctx.readiness()
    ready = sum(1 for _, ok, _ in rows if ok)
    total = len(rows)
    message = f"{ready}/{total} GPU unit(s) ready to rent"
    details = tuple(line for _, _, line in rows)
    if ready == total:
        return CheckResult(name, Status.PASS, message, None, details)
    statuses = {u.status for u, ok, _ in rows if not ok}
    if UnitStatus.NEEDS_BINDING in statuses or UnitStatus.READY in statuses:
        hint = RESTART_BIND
    elif UnitStatus.NOT_ISOLATABLE in statuses:
        blockers = [b for u, ok, _ in rows if not ok for b in u.blockers]
        hint = (
            f"move the GPU to a slot with its own IOMMU group (or enable ACS in BIOS/UEFI): "
            f"it cannot be passed through while {ctx.inventory.describe(blockers[0])} shares its group"
        )
    elif UnitStatus.WEDGED in statuses:
        hint = "power-cycle the host (see the wedged check)"
    else:
        hint = "turn the IOMMU on (see the iommu check)"
    # Some units ready: the node still rents those, so a warning; none ready: nothing to advertise.
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
        return CheckResult(
            name,
            Status.FAIL,
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
