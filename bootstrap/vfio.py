"""Binding GPU units to vfio-pci: what to bind, and binding it the way the kernel expects.

Each function is moved by `driver_override` + unbind + `drivers_probe`, never by `new_id`/`ids=`:
an ID match would also grab an identical card the operator keeps on the host, and the functions of a
group must move together or not at all. A unit whose group holds a device that is not part of the
card (a NIC, a disk controller) is never touched: binding it would take that device off the host.

Every sysfs write goes through `Host.sysfs_write` and is bounded by a timeout, because an unbind can
block in the kernel while a process (nvidia-persistenced, a display server) holds the GPU.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bootstrap.discovery import VFIO_DRIVER, Inventory, Unit, UnitStatus
from bootstrap.host import Host

PCI_DEVICES = "/sys/bus/pci/devices"
PCI_DRIVERS = "/sys/bus/pci/drivers"
DRIVERS_PROBE = "/sys/bus/pci/drivers_probe"
VFIO_MODULES = ("vfio", "vfio_pci", "vfio_iommu_type1")
# Host drivers that would claim a passthrough function if they loaded first.
HOST_DRIVERS = ("nvidia", "nouveau", "amdgpu", "snd_hda_intel")
DEFAULT_TIMEOUT = 10.0


def _norm(module: str) -> str:
    return module.replace("-", "_")


def builtin_modules(host: Host) -> set[str]:
    """Modules compiled into the running kernel, from modules.builtin (names with `_`)."""
    release = host.read_text("/proc/sys/kernel/osrelease", default="").strip()
    if not release:
        return set()
    for base in ("/lib/modules", "/usr/lib/modules"):
        text = host.read_text(f"{base}/{release}/modules.builtin", default="")
        if text:
            return {_norm(os.path.basename(line.strip()).removesuffix(".ko")) for line in text.splitlines()}
    return set()


def vfio_pci_builtin(host: Host) -> bool:
    return "vfio_pci" in builtin_modules(host)


# --- what to bind -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    address: str
    group: str | None
    driver: str | None
    boot_vga: bool = False


@dataclass(frozen=True)
class Skipped:
    group: str | None
    devices: tuple[str, ...]
    reason: str


def _endpoints(inv: Inventory, unit: Unit) -> list[str]:
    return [a for a in unit.devices if a in inv.devices and not inv.devices[a].is_bridge]


def _skip_reason(inv: Inventory, unit: Unit) -> str | None:
    if unit.status is UnitStatus.NOT_ISOLATABLE:
        shared = ", ".join(inv.describe(b) for b in unit.blockers)
        return (
            f"IOMMU group {unit.iommu_group} also holds {shared}: binding the group would take it off "
            "the host, so nothing in it is bound (put the card in a slot with its own group, or enable "
            "ACS in BIOS/UEFI)"
        )
    if unit.status is UnitStatus.WEDGED:
        return f"IOMMU group {unit.iommu_group}: a GPU fell off the bus (D3cold); power-cycle the host"
    if unit.status is UnitStatus.NO_IOMMU:
        return "no IOMMU group: the IOMMU is off, so vfio-pci cannot take it"
    return None


def select(inv: Inventory) -> tuple[list[Target], list[Skipped]]:
    """Every GPU and NVSwitch, with every non-bridge function of its IOMMU group; never a unit that
    is not isolatable, wedged, or without a group."""
    targets: dict[str, Target] = {}
    skipped: list[Skipped] = []
    for unit in inv.units + inv.nvswitch_units:
        why = _skip_reason(inv, unit)
        if why is not None:
            skipped.append(Skipped(unit.iommu_group, unit.devices, why))
            continue
        for addr in _endpoints(inv, unit):
            dev = inv.devices[addr]
            targets[addr] = Target(addr, unit.iommu_group, dev.driver, dev.boot_vga)
    return [targets[a] for a in sorted(targets)], skipped


def reserved_addresses(inv: Inventory) -> list[str]:
    """The functions the boot-time udev rule reserves for vfio-pci.

    With the IOMMU on, the groups say exactly what to take (a wedged unit stays reserved: after the
    power cycle it needs its binding back). With it off, groups are unknown until the reboot, so the
    rule takes the GPUs, NVSwitches and the other functions of their slots, which are part of the
    card; the first run after the reboot narrows it to what the groups allow.
    """
    if inv.iommu.active:
        out: set[str] = set()
        for unit in inv.units + inv.nvswitch_units:
            if unit.status in (UnitStatus.NOT_ISOLATABLE, UnitStatus.NO_IOMMU):
                continue
            out.update(_endpoints(inv, unit))
        return sorted(out)
    slots = {d.slot for d in inv.gpus + inv.nvswitches}
    return sorted(a for a, d in inv.devices.items() if d.slot in slots and not d.is_bridge)


# --- binding ----------------------------------------------------------------------------------------


class BindTimeout(Exception):
    pass


def _bounded(fn: Callable[[], None], timeout: float, what: str) -> None:
    """Run a sysfs write that may block in the kernel; give up waiting after `timeout` seconds."""
    box: list[BaseException] = []

    def work() -> None:
        try:
            fn()
        except BaseException as e:
            box.append(e)

    t = threading.Thread(target=work, name=f"sysfs {what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise BindTimeout(f"{what} did not return within {timeout:g}s")
    if box:
        raise box[0]


def current_driver(host: Host, address: str) -> str | None:
    return host.readlink_name(f"{PCI_DEVICES}/{address}/driver")


def _wait_for_driver(host: Host, address: str, want: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if current_driver(host, address) == want:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def bind_one(host: Host, address: str, *, timeout: float = DEFAULT_TIMEOUT) -> str | None:
    """Move one function to vfio-pci. None on success, else why it did not take."""
    dev = f"{PCI_DEVICES}/{address}"
    try:
        _bounded(
            lambda: host.sysfs_write(f"{dev}/driver_override", VFIO_DRIVER),
            timeout,
            f"writing {dev}/driver_override",
        )
        driver = current_driver(host, address)
        if driver is not None and driver != VFIO_DRIVER:
            unbind = f"{PCI_DRIVERS}/{driver}/unbind"
            _bounded(lambda: host.sysfs_write(unbind, address), timeout, f"unbinding from {driver}")
        if current_driver(host, address) != VFIO_DRIVER:
            _bounded(lambda: host.sysfs_write(DRIVERS_PROBE, address), timeout, "drivers_probe")
    except BindTimeout as e:
        return f"{e} (a process may hold the device; the boot-time rule will bind it: reboot)"
    except OSError as e:
        return f"the kernel refused: {e.strerror or e}"
    if not _wait_for_driver(host, address, VFIO_DRIVER, timeout):
        now = current_driver(host, address) or "no driver"
        return f"still on {now} after the bind (is the vfio-pci module loaded? check dmesg)"
    return None


@dataclass
class BindResult:
    bound: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def _service_active(host: Host, unit: str, timeout: float) -> bool:
    return host.run(["systemctl", "is-active", "--quiet", unit], timeout=timeout).ok


def _ensure_vfio_driver(host: Host, timeout: float) -> str | None:
    if host.path(f"{PCI_DRIVERS}/{VFIO_DRIVER}").is_dir():
        return None
    res = host.run(["modprobe", "-a", *VFIO_MODULES], timeout=timeout)
    if host.path(f"{PCI_DRIVERS}/{VFIO_DRIVER}").is_dir():
        return None
    detail = (res.stderr or res.stdout).strip()
    return "the vfio-pci driver is not available" + (f" (modprobe: {detail})" if detail else "")


def bind_all(
    host: Host,
    inv: Inventory,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    log: Callable[[str], None] = lambda _m: None,
) -> BindResult:
    targets, skipped = select(inv)
    result = BindResult(skipped=skipped)
    todo = [t for t in targets if t.driver != VFIO_DRIVER]
    result.already = [t.address for t in targets if t.driver == VFIO_DRIVER]
    if not todo:
        return result
    for t in todo:
        if t.boot_vga:
            result.warnings.append(
                f"{t.address} drives the local console (boot_vga=1): once it is on vfio-pci the "
                "console goes dark; manage this box over SSH, serial or IPMI"
            )
            log(result.warnings[-1])
    missing = _ensure_vfio_driver(host, timeout)
    if missing is not None:
        result.failed = [(t.address, missing) for t in todo]
        return result
    if any(t.driver == "nvidia" for t in todo) and _service_active(
        host, "nvidia-persistenced.service", timeout
    ):
        # The daemon keeps the GPUs open; with it running, unbinding from nvidia blocks in the kernel.
        log("stopping nvidia-persistenced.service (it holds the GPUs open)")
        res = host.run(["systemctl", "stop", "nvidia-persistenced.service"], timeout=timeout)
        if not res.ok:
            result.warnings.append(f"could not stop nvidia-persistenced.service: {res.stderr.strip()}")
    for t in todo:
        log(f"binding {t.address} ({t.driver or 'no driver'}) to vfio-pci")
        why = bind_one(host, t.address, timeout=timeout)
        if why is None:
            result.bound.append(t.address)
        else:
            result.failed.append((t.address, why))
    return result
