"""The doctor's checks: pure functions of the host (root + runner) returning CheckResults.

`run_checks` is the entry point the installer's preflight and verify stages reuse
(e.g. `run_checks(host, settings, only=["kvm", "memory", "disk"])`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from functools import wraps
from typing import NamedTuple

from bootstrap import platform, resolve, runsc
from bootstrap.discovery import Inventory, Unit, UnitStatus, discover
from bootstrap.errors import UsageError, redact
from bootstrap.host import CommandResult, Host
from bootstrap.paths import (
    AGENT_SERVICES,
    IDENTITY_DIR,
    IDENTITY_LEGACY,
    RUNSC,
    SETTINGS_PATH,
    SYSTEMD_UNITS,
    UPDATE_TIMER,
)
from bootstrap.pci import PciDevice
from bootstrap.settings import GPU_MODES, Settings
from doctor.model import CheckResult, Report, Status

GB = 1000**3  # disks and DIMMs are sold in decimal GB; a "32 GB" box must not fail a 32 GB floor
DISK_FAIL_GB, DISK_WARN_GB = 20, 50
MEMORY_FAIL_GB, MEMORY_WARN_GB = 32, 64

AGENTS = tuple(AGENT_SERVICES.values())
INSTALL = "run the install one-liner"
REINSTALL = "re-run the install one-liner"
RESTART_BIND = "sudo systemctl restart vectorlay-vfio-bind or re-run the bootstrap"

# Kernel log lines that mean a GPU fell off the bus this boot: the NVIDIA driver's Xid 79, the
# driver's plain-text report, and the PCI core failing to wake a device from D3cold. Compiled only
# where a kernel log is read (a node with GPUs), not by every run's import.
_KERNEL_LOG_PATTERN = (
    r"NVRM: Xid \([^)]*\): 79\b|fallen off the bus|Unable to change power state from D3cold to D0"
)


class Context:
    """What the checks share: the host, its settings, and facts computed once on first use."""

    # A plain class, not a dataclass: every doctor run creates this class at import, and a dataclass
    # compiles its generated methods then, for an object nobody compares or prints.
    __slots__ = ("_inventory", "_kernel_log", "_mode", "_readiness", "_shared", "host", "settings")

    def __init__(self, host: Host, settings: Settings) -> None:
        self.host = host
        self.settings = settings
        self._inventory: Inventory | None = None
        self._readiness: list[tuple[Unit, bool, str]] | None = None
        self._shared: list[tuple[PciDevice, bool, str]] | None = None
        self._kernel_log: list[str] | None = None
        self._mode: str | None = None

    def __repr__(self) -> str:
        return f"Context(host={self.host!r}, settings={self.settings!r})"

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            self._inventory = discover(self.host, self.settings)
        return self._inventory

    @property
    def mode(self) -> str:
        """passthrough | container | none, resolved once per doctor run (bootstrap.resolve.gpu_mode:
        the settings', else the enrollment's, else detection's before install)."""
        if self._mode is None:
            self._mode = resolve.gpu_mode(
                self.settings.gpu_mode,
                recorded=lambda: resolve.recorded_gpu_mode(resolve.identity_or_none(self.host)),
                has_gpus=lambda: bool(self.inventory.gpus),
            )
        return self._mode

    def readiness(self) -> list[tuple[Unit, bool, str]]:
        """Per GPU unit: ready to rent?, and the line that says why."""
        if self._readiness is None:
            self._readiness = [_unit_readiness(self, u) for u in self.inventory.units]
        return self._readiness

    def shared_gpus(self) -> list[tuple[PciDevice, bool, str]]:
        """Container mode's units: per GPU, shared through runsc? (on the nvidia driver, answering)."""
        if self._shared is None:
            self._shared = [_shared_readiness(self, d) for d in self.inventory.gpus]
        return self._shared

    def units(self) -> tuple[int, int]:
        """(ready, total) GPU units for rent in this mode: IOMMU groups in passthrough, GPUs in
        container mode, none otherwise."""
        if self.mode == "passthrough":
            rows: list[tuple[object, bool, str]] = list(self.readiness())
        elif self.mode == "container":
            rows = list(self.shared_gpus())
        else:
            return 0, 0
        return sum(1 for _, ok, _ in rows if ok), len(rows)

    def kernel_log(self) -> list[str]:
        """This boot's kernel lines about GPUs falling off the bus ([] when the log is unreadable)."""
        if self._kernel_log is None:
            self._kernel_log = _read_kernel_log(self.host)
        return self._kernel_log


Check = Callable[[Context], CheckResult]


class CheckSpec(NamedTuple):
    """A check's one record: what the doctor runs, the renderer labels, preflight runs and
    --ignore-preflight-errors may waive all read it, so no list elsewhere names a check."""

    name: str  # stable: docs/contracts.md#vectorlay-node-doctor
    label: str  # the terminal line's
    run: Check
    modes: frozenset[str]  # the GPU modes it runs in unless asked for by name
    preflight: bool  # the installer's preflight runs it before changing anything
    waivable: bool  # --ignore-preflight-errors may let the run go on past its FAIL


# In the order the doctor runs and shows them: the order of the functions in this file.
CHECKS: dict[str, CheckSpec] = {}


def check(
    name: str,
    label: str,
    *,
    modes: Iterable[str] = GPU_MODES,
    preflight: bool = False,
    waivable: bool = False,
) -> Callable[[Callable[[Context, str], CheckResult]], Check]:
    """Register the function below as check `name`; it is handed the name its results carry."""
    if name in CHECKS:
        raise ValueError(f"check {name} is registered twice")
    if waivable and not preflight:
        raise ValueError(f"check {name}: only a check preflight runs can be waived there")

    def register(fn: Callable[[Context, str], CheckResult]) -> Check:
        @wraps(fn)
        def run(ctx: Context) -> CheckResult:
            return fn(ctx, name)

        CHECKS[name] = CheckSpec(name, label, run, frozenset(modes), preflight, waivable)
        return run

    return register


def _read_kernel_log(host: Host) -> list[str]:
    for argv in (["journalctl", "-k", "-b", "--no-pager", "-q"], ["dmesg"]):
        res = host.run(argv, timeout=20)
        lines = [ln for ln in res.stdout.splitlines() if ln.strip() and not ln.startswith("-- ")]
        if res.ok and lines:
            pattern = re.compile(_KERNEL_LOG_PATTERN)
            return [ln.strip() for ln in lines if pattern.search(ln)]
    return []


def _gpu_skip(ctx: Context, name: str) -> CheckResult | None:
    """The SKIP a GPU check returns on a node that serves no GPUs, else None."""
    if not ctx.inventory.gpus:
        return CheckResult(name, Status.SKIP, "no GPUs (CPU-only node)")
    if ctx.mode == "none":
        return CheckResult(name, Status.SKIP, "GPU mode is none: the node serves no GPUs")
    return None


def _systemctl_states(ctx: Context, verb: str, units: Iterable[str]) -> tuple[dict[str, str], str]:
    """`systemctl is-active/is-enabled` answers per unit, or ({}, why systemd gave none)."""
    units = list(units)
    res = ctx.host.run(["systemctl", verb, *units], timeout=20)
    answers = res.stdout.splitlines()
    if len(answers) == len(units):
        return dict(zip(units, (a.strip() for a in answers), strict=True)), ""
    text = (res.stderr or res.stdout).strip().splitlines()
    return {}, text[0] if text else f"exit status {res.returncode}"


# A --root tree runs no command: its recorded `systemctl` answers nothing, which says nothing about
# the units (not "exit status 0"). What only a running systemd can answer is not judged there.
_NO_SYSTEMD = "not checked: a --root tree runs no command, so there is no systemd to ask {}"


# --- checks ------------------------------------------------------------------------------------


@check("agents", "Agents")
def check_agents(ctx: Context, name: str) -> CheckResult:
    present = [u for u in AGENTS if ctx.host.path(f"{SYSTEMD_UNITS}/{u}").exists()]
    if not present:
        return CheckResult(name, Status.FAIL, "vectorlay agents are not installed", INSTALL)
    missing = [u for u in AGENTS if u not in present]
    if missing:
        return CheckResult(name, Status.FAIL, f"unit(s) missing: {', '.join(missing)}", REINSTALL)
    states, why = _systemctl_states(ctx, "is-active", AGENTS)
    if not states and not ctx.host.runs_commands:
        return CheckResult(name, Status.SKIP, _NO_SYSTEMD.format("whether the agents are active"))
    if not states:
        return CheckResult(
            name,
            Status.FAIL,
            f"cannot ask systemd about the agents: {why}",
            "run the doctor on the node itself, booted with systemd",
        )
    down = [u for u in AGENTS if states[u] != "active"]
    if down:
        what = ", ".join(f"{u.removesuffix('.service')} is {states[u]}" for u in down)
        names = " ".join(u.removesuffix(".service") for u in down)
        return CheckResult(
            name,
            Status.FAIL,
            what,
            f"sudo systemctl restart {names}; if it fails again: journalctl -u {down[0]} -n 50",
        )
    return CheckResult(name, Status.PASS, "nebula, nomad and node-agent active")


@check("autoupdate", "Auto-update")
def check_autoupdate(ctx: Context, name: str) -> CheckResult:
    if not ctx.settings.autoupdate:
        return CheckResult(
            name,
            Status.WARN,
            "auto-update opted out (NODE_AGENT_AUTOUPDATE=0): node-agent will not update itself",
            "to turn it back on, re-run the install one-liner without NODE_AGENT_AUTOUPDATE=0",
        )
    if not ctx.host.path(f"{SYSTEMD_UNITS}/{UPDATE_TIMER}").exists():
        if not any(ctx.host.path(f"{SYSTEMD_UNITS}/{u}").exists() for u in AGENTS):
            return CheckResult(name, Status.SKIP, "agents not installed", INSTALL)
        return CheckResult(name, Status.FAIL, f"{UPDATE_TIMER} is not installed", REINSTALL)
    states, why = _systemctl_states(ctx, "is-enabled", [UPDATE_TIMER])
    state = states.get(UPDATE_TIMER)
    if state is None and not ctx.host.runs_commands:
        return CheckResult(name, Status.SKIP, _NO_SYSTEMD.format(f"whether {UPDATE_TIMER} is enabled"))
    if state is None:
        return CheckResult(
            name,
            Status.FAIL,
            f"cannot ask systemd about {UPDATE_TIMER}: {why}",
            "run the doctor on the node itself, booted with systemd",
        )
    if state != "enabled":
        return CheckResult(
            name,
            Status.WARN,
            f"auto-update is off: {UPDATE_TIMER} is {state}",
            f"to turn it back on: sudo systemctl enable --now {UPDATE_TIMER}",
        )
    return CheckResult(name, Status.PASS, f"{UPDATE_TIMER} enabled")


@check("kvm", "KVM", preflight=True, waivable=True)
def check_kvm(ctx: Context, name: str) -> CheckResult:
    host = ctx.host
    cpu = ctx.inventory.cpu
    flags = f"CPU flags: {cpu.virtualization}" if cpu.virtualization else "CPU flags: no vmx/svm"
    module = "kvm_amd" if cpu.vendor == "amd" else "kvm_intel"
    if not host.exists("/dev/kvm"):
        if cpu.virtualization is None:
            bios = platform.virtualization_name(cpu.vendor)
            return CheckResult(
                name,
                Status.FAIL,
                f"/dev/kvm does not exist and the CPU shows no {bios}",
                f"enable {bios} (CPU virtualization) in BIOS/UEFI, then reboot",
                (flags,),
            )
        return CheckResult(
            name,
            Status.FAIL,
            "/dev/kvm does not exist",
            f"sudo modprobe {module} (if it fails, enable virtualization in BIOS/UEFI)",
            (flags,),
        )
    if not os.access(host.path("/dev/kvm"), os.R_OK | os.W_OK):
        return CheckResult(
            name, Status.FAIL, "/dev/kvm is not accessible (permission denied)", "run the doctor with sudo"
        )
    if not host.is_live:
        return CheckResult(name, Status.PASS, "/dev/kvm present (VM creation is probed on a live host)", None)
    from doctor.probes import probe_kvm

    probe = probe_kvm("/dev/kvm")
    if not probe.ok:
        return CheckResult(
            name,
            Status.FAIL,
            f"/dev/kvm present but cannot create a VM: {probe.detail}",
            f"enable virtualization in BIOS/UEFI (nested guest: enable nested virt on the host), "
            f"then sudo modprobe -r {module} && sudo modprobe {module}",
            (flags,),
        )
    note = "" if cpu.virtualization else " (nested guest: KVM works although the flags are hidden)"
    return CheckResult(name, Status.PASS, f"KVM works: {probe.detail}", None, (flags + note,))


@check("iommu", "IOMMU")
def check_iommu(ctx: Context, name: str) -> CheckResult:
    skip = _gpu_skip(ctx, name)
    if skip is not None:
        return skip
    if ctx.mode == "container":
        return CheckResult(name, Status.SKIP, "container GPU mode: no IOMMU needed")
    inv = ctx.inventory
    io, vendor = inv.iommu, inv.cpu.vendor or inv.iommu.vendor
    args = io.cmdline.split()
    details = []
    # An IOMMU option for the other vendor does nothing; worth saying when it is the only one given.
    other = "amd_iommu=on" if vendor == "intel" else "intel_iommu=on"
    own = "intel_iommu=" if vendor == "intel" else "amd_iommu="
    if other in args and not any(a.startswith(own) for a in args):
        details.append(f"{other} has no effect on this {vendor} CPU")
    if io.active:
        msg = f"IOMMU active ({io.vendor or vendor or 'unknown vendor'}, {io.groups} groups)"
        if "iommu=pt" not in args:
            details.append("iommu=pt not set: host devices pay for DMA translation (the installer adds it)")
        return CheckResult(name, Status.PASS, msg, None, tuple(details))
    if io.cmdline:
        details.insert(0, f"kernel command line: {io.cmdline}")
    if io.firmware_table is None:
        bios = f"{platform.firmware_iommu_hint(vendor)}, then reboot"
        return CheckResult(
            name,
            Status.FAIL,
            "IOMMU off: no DMAR/IVRS ACPI table (disabled in BIOS/UEFI)",
            f"{bios} and re-run the install one-liner",
            tuple(details),
        )
    off = [a for a in args if a in ("intel_iommu=off", "amd_iommu=off", "iommu=off")]
    wanted = " ".join(platform.iommu_args(vendor))
    if off:
        msg = (
            f"IOMMU in firmware ({io.firmware_table}) but disabled on the kernel command line "
            f"({' '.join(off)})"
        )
    elif all(w in args for w in wanted.split()):
        msg = f"IOMMU in firmware ({io.firmware_table}) and {wanted} given, but the kernel enabled none"
        return CheckResult(
            name,
            Status.FAIL,
            msg,
            "check VT-d / AMD-Vi in BIOS/UEFI and `journalctl -k -b | grep -i -e DMAR -e AMD-Vi`",
            tuple(details),
        )
    else:
        msg = f"IOMMU in firmware ({io.firmware_table}) but not enabled by the kernel"
    return CheckResult(
        name,
        Status.FAIL,
        msg,
        f"the installer adds {wanted} to the kernel command line: re-run the install one-liner "
        "(or vectorlay-bootstrap install --only gpu) and reboot",
        tuple(details),
    )


def _unit_readiness(ctx: Context, unit: Unit) -> tuple[Unit, bool, str]:
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


def _shared_readiness(ctx: Context, dev: PciDevice) -> tuple[PciDevice, bool, str]:
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
    skip = _gpu_skip(ctx, name)
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
    skip = _gpu_skip(ctx, name)
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
    skip = _gpu_skip(ctx, name)
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
    skip = _gpu_skip(ctx, name)
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


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


@check("disk", "Disk", preflight=True, waivable=True)
def check_disk(ctx: Context, name: str) -> CheckResult:
    path = ctx.settings.disk_path
    try:
        free = ctx.host.disk_free_bytes(path)
    except OSError as e:
        return CheckResult(name, Status.FAIL, f"cannot measure free space at {path}: {e.strerror}", REINSTALL)
    msg = f"{_gb(free)} free at {path}"
    if free < DISK_FAIL_GB * GB:
        return CheckResult(
            name,
            Status.FAIL,
            f"{msg} (needs {DISK_FAIL_GB} GB for VM base images)",
            f"free at least {_gb(DISK_WARN_GB * GB - free)} at {path}, or set disk_path in "
            f"{SETTINGS_PATH} to a larger disk",
        )
    if free < DISK_WARN_GB * GB:
        return CheckResult(
            name,
            Status.WARN,
            f"{msg} (below {DISK_WARN_GB} GB)",
            f"free {_gb(DISK_WARN_GB * GB - free)} more at {path} for VM base images",
        )
    return CheckResult(name, Status.PASS, msg)


@check("memory", "Memory", preflight=True, waivable=True)
def check_memory(ctx: Context, name: str) -> CheckResult:
    try:
        total = ctx.host.memory_total_bytes()
    except (OSError, ValueError) as e:
        return CheckResult(name, Status.FAIL, f"cannot read /proc/meminfo: {e}", "run on a Linux host")
    msg = f"{_gb(total)} RAM"
    if total < MEMORY_FAIL_GB * GB:
        return CheckResult(
            name,
            Status.FAIL,
            f"{msg}, below the {MEMORY_FAIL_GB} GB minimum",
            f"add RAM: provider nodes need at least {MEMORY_FAIL_GB} GB ({MEMORY_WARN_GB} GB+ recommended)",
        )
    if total < MEMORY_WARN_GB * GB:
        return CheckResult(
            name,
            Status.WARN,
            f"{msg}, below the recommended {MEMORY_WARN_GB} GB",
            f"add RAM: every VM needs system RAM; {MEMORY_WARN_GB} GB+ recommended",
        )
    return CheckResult(name, Status.PASS, msg)


@check("identity", "Identity")
def check_identity(ctx: Context, name: str) -> CheckResult:
    from doctor.identity import check_identity as identity_check

    return identity_check(ctx.host)._replace(name=name)


@check("overlay", "Overlay")
def check_overlay(ctx: Context, name: str) -> CheckResult:
    # load_identity's own test for a node never enrolled, made before importing bootstrap.identity:
    # its classes cost such a node more start-up time than this check's whole answer.
    ident_dir = ctx.host.path(IDENTITY_DIR, follow=False)
    if (
        not ident_dir.exists()
        and not ident_dir.is_symlink()
        and not (ident_dir.parent / IDENTITY_LEGACY).is_dir()
    ):
        return CheckResult(name, Status.SKIP, "not enrolled (no overlay IP yet)")

    from bootstrap.identity import IdentityError, load_identity

    try:
        ident = load_identity(ctx.host)
    except IdentityError:
        return CheckResult(name, Status.SKIP, "no usable identity (see the identity check)")
    if ident is None:
        return CheckResult(name, Status.SKIP, "not enrolled (no overlay IP yet)")

    # Only an enrolled node has an overlay to probe: a node being set up does not pay for it.
    from bootstrap.overlay import (
        NEBULA_CONFIG,
        PING_TIMEOUT_S,
        TUN_DEVICE,
        OverlayProbeError,
        interface,
        ping_ms,
    )

    nebula_hint = "systemctl status nebula; journalctl -u nebula -n 50"
    try:
        dev = interface(ctx.host)
    except OverlayProbeError as e:
        return CheckResult(name, Status.FAIL, f"cannot read {TUN_DEVICE}: {e}", "install iproute2 (`ip`)")
    if dev is None:
        return CheckResult(
            name, Status.FAIL, f"{TUN_DEVICE} does not exist: nebula is not running", nebula_hint
        )
    if not dev.up:
        return CheckResult(
            name, Status.FAIL, f"{TUN_DEVICE} is down", f"sudo systemctl restart nebula; {nebula_hint}"
        )
    if not dev.holds(ident.overlay_ip):
        held = ", ".join(str(a.ip) for a in dev.addresses) or "no address"
        return CheckResult(
            name,
            Status.FAIL,
            f"{TUN_DEVICE} holds {held}, not the node's overlay IP {ident.overlay_ip}",
            f"{nebula_hint}; {REINSTALL} to get a certificate for {ident.overlay_ip}",
        )
    lighthouses = _nebula_lighthouses(ctx.host, NEBULA_CONFIG)
    if not lighthouses:
        return CheckResult(
            name,
            Status.WARN,
            f"{TUN_DEVICE} holds {ident.overlay_ip}, but nebula knows no lighthouse",
            REINSTALL,
        )
    # At most two lighthouses are asked, so a cut-off node costs the doctor a bounded few seconds.
    for ip, _ in lighthouses[:2]:
        rtt = ping_ms(ctx.host, ip, dev=TUN_DEVICE, timeout_s=PING_TIMEOUT_S)
        if rtt is not None:
            shown = f"{rtt:.0f}" if rtt >= 10 else f"{rtt:.1f}"
            return CheckResult(
                name,
                Status.PASS,
                f"overlay up: {TUN_DEVICE} holds {ident.overlay_ip}, lighthouse {ip} answered in {shown} ms",
            )
    ip, endpoints = lighthouses[0]
    where = ", ".join(endpoints) or "its endpoint"
    return CheckResult(
        name,
        Status.WARN,
        f"{TUN_DEVICE} holds {ident.overlay_ip}, "
        f"but lighthouse {ip} did not answer within {PING_TIMEOUT_S} s",
        f"outbound UDP to {where} must be open (nebula's port, 4242 by default); {nebula_hint}",
    )


def _nebula_lighthouses(host: Host, config: str) -> list[tuple[str, list[str]]]:
    """(overlay IP, underlay endpoints) of each lighthouse in nebula's config, in its order."""
    import yaml

    try:
        data = yaml.safe_load(host.read_text(config))
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(data, dict):
        return []
    hosts = (data.get("lighthouse") or {}).get("hosts") or []
    static = data.get("static_host_map") or {}
    return [(str(h), [str(e) for e in static.get(h) or []]) for h in hosts]


@check("control_plane", "Control plane")
def check_control_plane(ctx: Context, name: str) -> CheckResult:
    """What the control plane answered the node-agent's last heartbeat (its status.json)."""

    ident = ctx.host.path(IDENTITY_DIR)
    if not (ident.exists() or ident.is_symlink()):
        return CheckResult(name, Status.SKIP, "not enrolled: nothing to report to the control plane")

    import time

    from bootstrap.agent_status import STATUS_PATH, parse_iso, read_status

    logs = "journalctl -u node-agent -n 50 says why; sudo systemctl restart node-agent"
    status = read_status(ctx.host)
    if status is None and os.path.lexists(ctx.host.path(STATUS_PATH, follow=False)):
        return CheckResult(
            name,
            Status.WARN,
            f"{STATUS_PATH} is not a status the node-agent wrote "
            "(not a regular file, not JSON, or too large)",
            f"sudo rm -rf {STATUS_PATH} && sudo systemctl restart node-agent (it writes a new one)",
        )
    if status is None:
        return CheckResult(name, Status.WARN, f"no heartbeat yet (no {STATUS_PATH})", logs)
    # A status written by an agent before redaction, or by hand, may still hold a secret.
    error = redact(status["last_error"]) if isinstance(status.get("last_error"), str) else None
    if status.get("status") == "removed":
        return CheckResult(
            name,
            Status.FAIL,
            "the control plane removed this node: none of its GPU units are advertised",
            "re-run the install one-liner with a new token to bring it back",
        )
    try:
        at = parse_iso(str(status["heartbeat_at"]))
        interval = int(status.get("interval_s") or 240)
        advertised = int(status["advertised_units"])
    except (KeyError, TypeError, ValueError):
        why = f": {error}" if isinstance(error, str) and error else ""
        return CheckResult(name, Status.WARN, f"no heartbeat delivered yet{why}", logs)
    age = max(0, int(time.time() - at))
    if age > 3 * interval:
        why = f"; last attempt: {error}" if isinstance(error, str) and error else ""
        return CheckResult(
            name,
            Status.WARN,
            f"last heartbeat {age} s ago, more than 3 intervals ({3 * interval} s): nothing advertised{why}",
            logs,
        )
    message = f"{advertised} GPU unit(s) advertised (heartbeat {age} s ago)"
    reason = status.get("reason")
    if isinstance(reason, str) and reason:
        message += f": {redact(reason)}"
    return CheckResult(name, Status.PASS, message)


# What the installer's preflight runs, and which of those --ignore-preflight-errors may waive.
PREFLIGHT = tuple(n for n, spec in CHECKS.items() if spec.preflight)
WAIVABLE = tuple(n for n, spec in CHECKS.items() if spec.waivable)


def run_checks(
    host: Host,
    settings: Settings | None = None,
    only: Iterable[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Report:
    """Run the checks for this node's GPU mode (or just `only`, in their usual order)."""
    if settings is None:
        from bootstrap.settings import load_settings

        settings = load_settings(host, env)
    ctx = Context(host, settings)
    if only is not None:
        wanted = list(only)
        unknown = [n for n in wanted if n not in CHECKS]
        if unknown:
            raise UsageError(f"unknown check(s): {', '.join(unknown)}", f"known: {', '.join(CHECKS)}")
        names = [n for n in CHECKS if n in wanted]
    else:
        names = [n for n, spec in CHECKS.items() if ctx.mode in spec.modes]
    results = tuple(CHECKS[n].run(ctx) for n in names)

    ready, total = ctx.units()
    return Report(results, ctx.mode, ready, total, tuple(d.address for d in ctx.inventory.wedged))
