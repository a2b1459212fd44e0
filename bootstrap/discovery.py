"""GPUs, NVSwitches, IOMMU state and GPU units (docs/contracts.md#hardware-model), read from the host tree."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

from bootstrap.host import Host
from bootstrap.pci import (
    PciDevice,
    PciNames,
    group_sort_key,
    iommu_groups,
    list_addresses,
    load_pci_ids,
    parse_lspci_nn,
    read_device,
    udev_names,
)
from bootstrap.settings import Settings

NVIDIA = "10de"
AMD = "1002"
GPU_VENDORS = (NVIDIA, AMD)
GPU_CLASSES = ("0300", "0302", "0380", "1200")
NVSWITCH_CLASS = "0680"
NVSWITCH_DEVICES = ("1ac2", "1af1", "22a3")
VFIO_DRIVER = "vfio-pci"

CLASS_NAMES = {
    "0300": "VGA compatible controller",
    "0302": "3D controller",
    "0380": "Display controller",
    "1200": "Processing accelerators",
    "0680": "Bridge",
    "0403": "Audio device",
    "0c03": "USB controller",
    "0c80": "Serial bus controller",
    "0604": "PCI bridge",
    "0200": "Ethernet controller",
    "0207": "Infiniband controller",
}


class UnitStatus(str, Enum):
    READY = "ready"
    NEEDS_BINDING = "needs_binding"
    NOT_ISOLATABLE = "not_isolatable"
    WEDGED = "wedged"
    NO_IOMMU = "no_iommu"


class CpuInfo(NamedTuple):
    """The CPU's vendor and its /proc/cpuinfo flags."""

    vendor: str | None  # "intel", "amd" or None
    flags: frozenset[str]

    @property
    def virtualization(self) -> str | None:
        if "vmx" in self.flags:
            return "vmx"
        if "svm" in self.flags:
            return "svm"
        return None


class IommuState(NamedTuple):
    """Whether an IOMMU is on, how many groups it made, and who describes it."""

    active: bool
    groups: int
    vendor: str | None  # "intel" / "amd" from the kernel's IOMMU devices or firmware tables
    firmware_table: str | None  # "DMAR" / "IVRS" when the firmware describes an IOMMU
    cmdline: str


class Unit(NamedTuple):
    """One GPU unit: its IOMMU group, its GPUs and devices, and what stands in its way."""

    iommu_group: str | None
    status: UnitStatus
    gpus: tuple[str, ...]
    devices: tuple[str, ...]
    # Devices in the group that are not part of the GPU card (why the unit is not isolatable) and
    # endpoints not yet on vfio-pci (what the bind service must move).
    blockers: tuple[str, ...] = ()
    unbound: tuple[str, ...] = ()


@dataclass
class Inventory:
    """What detection found: IOMMU, CPU, PCI devices, GPUs, NVSwitches and units."""

    iommu: IommuState
    cpu: CpuInfo
    devices: dict[str, PciDevice]
    gpus: list[PciDevice]
    nvswitches: list[PciDevice]
    units: list[Unit]
    nvswitch_units: list[Unit]
    names: dict[str, str] = field(default_factory=dict)

    def name(self, address: str) -> str:
        return self.names.get(address, "")

    @property
    def wedged(self) -> list[PciDevice]:
        return [d for d in self.gpus + self.nvswitches if d.wedged]

    def describe(self, address: str) -> str:
        dev = self.devices.get(address)
        if dev is None:
            return address
        name = self.name(address) or CLASS_NAMES.get(dev.class_code, f"class {dev.class_code}")
        driver = dev.driver or "no driver"
        return f"{address} {name} [{dev.vendor_id}:{dev.device_id}] on {driver}"

    def to_json(self) -> dict[str, Any]:
        def dev_json(d: PciDevice) -> dict[str, Any]:
            return {
                "address": d.address,
                "vendor_id": d.vendor_id,
                "device_id": d.device_id,
                "class_id": d.class_id,
                "name": self.name(d.address),
                "driver": d.driver,
                "iommu_group": d.iommu_group,
                "wedged": d.wedged,
                "power_state": d.power_state,
                "boot_vga": d.boot_vga,
            }

        def unit_json(u: Unit) -> dict[str, Any]:
            out: dict[str, Any] = {
                "iommu_group": u.iommu_group,
                "status": u.status.value,
                "gpus": list(u.gpus),
                "devices": list(u.devices),
            }
            if u.blockers:
                out["blockers"] = list(u.blockers)
            return out

        return {
            "iommu": {"active": self.iommu.active, "groups": self.iommu.groups, "vendor": self.iommu.vendor},
            "gpus": [dev_json(d) for d in self.gpus],
            "nvswitches": [dev_json(d) for d in self.nvswitches],
            "units": [unit_json(u) for u in self.units],
            "nvswitch_units": [unit_json(u) for u in self.nvswitch_units],
        }


def read_cpu(host: Host) -> CpuInfo:
    vendor: str | None = None
    flags: frozenset[str] = frozenset()
    for line in host.read_text("/proc/cpuinfo", default="").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and vendor is None:
            v = value.strip()
            vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd", "HygonGenuine": "amd"}.get(v)
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if vendor is not None and flags:
            break
    return CpuInfo(vendor, flags)


def read_iommu(host: Host, group_count: int) -> IommuState:
    vendor = None
    try:
        kernel_iommus = os.listdir(host.path("/sys/class/iommu"))
    except OSError:
        kernel_iommus = []
    if any(n.startswith("dmar") for n in kernel_iommus):
        vendor = "intel"
    elif any(n.startswith("ivhd") for n in kernel_iommus):
        vendor = "amd"
    table = None
    if host.exists("/sys/firmware/acpi/tables/DMAR"):
        table = "DMAR"
    elif host.exists("/sys/firmware/acpi/tables/IVRS"):
        table = "IVRS"
    if vendor is None and table is not None:
        vendor = "intel" if table == "DMAR" else "amd"
    cmdline = host.read_text("/proc/cmdline", default="").strip()
    return IommuState(group_count > 0, group_count, vendor, table, cmdline)


def is_gpu(dev: PciDevice, settings: Settings | None = None) -> bool:
    vendors = GPU_VENDORS + (settings.extra_gpu_vendor_ids if settings else ())
    return dev.vendor_id in vendors and dev.class_code in GPU_CLASSES


def is_nvswitch(dev: PciDevice, settings: Settings | None = None) -> bool:
    ids = NVSWITCH_DEVICES + (settings.extra_nvswitch_device_ids if settings else ())
    return dev.vendor_id == NVIDIA and dev.class_code == NVSWITCH_CLASS and dev.device_id in ids


def _unit(
    group: str | None,
    members: list[str],
    anchors: list[PciDevice],
    devices: dict[str, PciDevice],
    iommu: bool,
) -> Unit:
    anchor_slots = {a.slot for a in anchors}
    blockers: list[str] = []
    unbound: list[str] = []
    for addr in members:
        dev = devices.get(addr)
        if dev is None:
            continue
        if dev.is_bridge:
            continue  # bridges may stay on pcieport; they are not handed to the VM
        # A function of the same slot is part of the card (HD audio, USB-C, UCSI of consumer GPUs).
        if dev.slot not in anchor_slots and dev not in anchors:
            blockers.append(addr)
            continue
        if dev.driver != VFIO_DRIVER:
            unbound.append(addr)
    if not iommu or group is None:
        status = UnitStatus.NO_IOMMU
    elif any(a.wedged for a in anchors):
        status = UnitStatus.WEDGED
    elif blockers:
        status = UnitStatus.NOT_ISOLATABLE
    elif unbound:
        status = UnitStatus.NEEDS_BINDING
    else:
        status = UnitStatus.READY
    return Unit(
        iommu_group=group,
        status=status,
        gpus=tuple(a.address for a in anchors),
        devices=tuple(members),
        blockers=tuple(blockers),
        unbound=tuple(unbound),
    )


def _units(
    anchors: list[PciDevice], groups: dict[str, list[str]], devices: dict[str, PciDevice], iommu: bool
) -> list[Unit]:
    by_group: dict[str | None, list[PciDevice]] = {}
    units: list[Unit] = []
    for a in anchors:
        if a.iommu_group is None or a.iommu_group not in groups:
            # No IOMMU group: the GPU can't be isolated at all; it stands alone as a no_iommu unit.
            units.append(_unit(None, [a.address], [a], devices, False))
        else:
            by_group.setdefault(a.iommu_group, []).append(a)
    for group in sorted(by_group, key=group_sort_key):
        units.append(_unit(group, groups[group or ""], by_group[group], devices, iommu))
    return units


def discover(host: Host, settings: Settings | None = None, *, with_names: bool = True) -> Inventory:
    groups = iommu_groups(host)
    iommu = read_iommu(host, len(groups))
    cpu = read_cpu(host)

    devices: dict[str, PciDevice] = {}
    gpus: list[PciDevice] = []
    nvswitches: list[PciDevice] = []
    for addr in list_addresses(host):
        dev = read_device(host, addr, full=False)
        if dev is None:
            continue
        if is_gpu(dev, settings) or is_nvswitch(dev, settings):
            full = read_device(host, addr, full=True)
            if full is None:
                continue
            dev = full
            (gpus if is_gpu(dev, settings) else nvswitches).append(dev)
        devices[addr] = dev

    # Functions that share a GPU's group get the full read too (power state, override), since
    # the bind service and the doctor look at them.
    for anchor in gpus + nvswitches:
        for member in groups.get(anchor.iommu_group or "", ()):
            if member in devices and devices[member].live_vendor_id is None and member != anchor.address:
                full = read_device(host, member, full=True)
                if full is not None:
                    devices[member] = full

    units = _units(gpus, groups, devices, iommu.active)
    nv_units = _units(nvswitches, groups, devices, iommu.active)
    inv = Inventory(iommu, cpu, devices, gpus, nvswitches, units, nv_units)
    if with_names:
        inv.names = _names(host, inv)
    return inv


def _names(host: Host, inv: Inventory) -> dict[str, str]:
    interesting = {d.address for d in inv.gpus + inv.nvswitches}
    for u in inv.units + inv.nvswitch_units:
        interesting.update(u.devices)
    vendors = {inv.devices[a].vendor_id for a in interesting if a in inv.devices}
    ids: PciNames = load_pci_ids(host, vendors)
    out: dict[str, str] = {}
    for addr in interesting:
        dev = inv.devices.get(addr)
        if dev is None:
            continue
        name = ids.device(dev.vendor_id, dev.device_id)
        if name:
            out[addr] = name
    missing = [a for a in interesting if a not in out]
    if missing and host.is_live:
        for addr, (_vendor, model) in udev_names(missing).items():
            if model:
                out[addr] = model
        missing = [a for a in missing if a not in out]
    if missing and host.runs_commands:
        # lspci carries its own (possibly compressed) copy of the ID database and reads it even
        # with no driver loaded. Only asked where commands really run: a recorded call answers nothing.
        res = host.run(["lspci", "-Dnn"], timeout=10)
        if res.ok:
            vendor_names = {v: ids.vendor(v) for v in vendors}
            for entry in parse_lspci_nn(res.stdout):
                if entry.address in missing:
                    name = entry.description
                    prefix = vendor_names.get(entry.vendor_id)
                    if prefix and name.startswith(prefix + " "):
                        name = name[len(prefix) + 1 :]
                    out[entry.address] = name
    return out
