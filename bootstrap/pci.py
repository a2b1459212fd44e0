"""PCI devices as the kernel lays them out in sysfs, plus pci.ids names and `lspci -Dnn` parsing."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import NamedTuple

from bootstrap.fsutil import read_regular
from bootstrap.host import Host

PCI_DEVICES = "/sys/bus/pci/devices"
IOMMU_GROUPS = "/sys/kernel/iommu_groups"
PCI_IDS_PATHS = ("/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids", "/usr/share/pci.ids")

_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]")


class PciDevice(NamedTuple):
    """One PCI function as sysfs shows it, with its driver and IOMMU group."""

    address: str  # domain-qualified: dddd:bb:dd.f
    vendor_id: str  # lower-case hex, no 0x
    device_id: str
    class_id: str  # six hex digits: class, subclass, prog-if
    driver: str | None
    iommu_group: str | None
    subsystem_vendor_id: str | None = None
    subsystem_device_id: str | None = None
    revision: str | None = None
    live_vendor_id: str | None = None  # from the live `config` space; None if unreadable
    power_state: str | None = None
    driver_override: str | None = None
    boot_vga: bool = False

    @property
    def class_code(self) -> str:
        """Class and subclass, e.g. 0302 for a 3D controller."""
        return self.class_id[:4]

    @property
    def slot(self) -> str:
        """dddd:bb:dd, shared by the functions of one multi-function device."""
        return self.address.rsplit(".", 1)[0]

    @property
    def wedged(self) -> bool:
        # A device that fell off the bus answers config reads with all ones, while sysfs keeps the
        # IDs it cached at enumeration: only the live config space tells the truth.
        return self.live_vendor_id == "ffff"

    @property
    def is_bridge(self) -> bool:
        return self.class_code in ("0604", "0609")


def _read(path: str) -> str | None:
    try:
        return read_regular(path, 256).decode(errors="replace").strip()
    except OSError:
        return None


def _hex(value: str | None, width: int) -> str | None:
    if value is None:
        return None
    v = value.lower().removeprefix("0x")
    try:
        return f"{int(v, 16):0{width}x}"
    except ValueError:
        return None


def _link_name(path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _live_vendor(path: str) -> str | None:
    try:
        head = read_regular(path, 2)
    except OSError:
        return None
    if len(head) < 2:
        return None
    return f"{int.from_bytes(head, 'little'):04x}"


def list_addresses(host: Host) -> list[str]:
    try:
        names = os.listdir(host.path(PCI_DEVICES))
    except OSError:
        return []
    return sorted(n for n in names if _ADDRESS.fullmatch(n))


def read_device(host: Host, address: str, *, full: bool = True) -> PciDevice | None:
    """Read one function. `full=False` skips the fields only GPUs and NVSwitches need."""
    base = str(host.path(f"{PCI_DEVICES}/{address}"))
    vendor = _hex(_read(f"{base}/vendor"), 4)
    device = _hex(_read(f"{base}/device"), 4)
    klass = _hex(_read(f"{base}/class"), 6)
    if vendor is None or device is None or klass is None:
        return None
    dev = PciDevice(
        address=address,
        vendor_id=vendor,
        device_id=device,
        class_id=klass,
        driver=_link_name(f"{base}/driver"),
        iommu_group=_link_name(f"{base}/iommu_group"),
    )
    if not full:
        return dev
    override = _read(f"{base}/driver_override")
    return PciDevice(
        address=address,
        vendor_id=vendor,
        device_id=device,
        class_id=klass,
        driver=dev.driver,
        iommu_group=dev.iommu_group,
        subsystem_vendor_id=_hex(_read(f"{base}/subsystem_vendor"), 4),
        subsystem_device_id=_hex(_read(f"{base}/subsystem_device"), 4),
        revision=_hex(_read(f"{base}/revision"), 2),
        live_vendor_id=_live_vendor(f"{base}/config"),
        power_state=_read(f"{base}/power_state"),
        driver_override=None if override in (None, "", "(null)") else override,
        boot_vga=_read(f"{base}/boot_vga") == "1",
    )


def iommu_groups(host: Host) -> dict[str, list[str]]:
    """Group number -> member addresses, from /sys/kernel/iommu_groups/<N>/devices/."""
    base = host.path(IOMMU_GROUPS)
    try:
        names = os.listdir(base)
    except OSError:
        return {}
    groups: dict[str, list[str]] = {}
    for name in names:
        if not (name.isascii() and name.isdigit()):
            continue
        try:
            members = os.listdir(base / name / "devices")
        except OSError:
            members = []
        groups[name] = sorted(m for m in members if _ADDRESS.fullmatch(m))
    return groups


def group_sort_key(group: str | None) -> tuple[int, str]:
    return (
        (int(group), "")
        if group is not None and group.isascii() and group.isdigit()
        else (1 << 30, group or "")
    )


# --- names -------------------------------------------------------------------------------------


class PciNames(NamedTuple):
    """Vendor and device names from pci.ids, for the vendors asked for."""

    vendors: dict[str, str]
    devices: dict[tuple[str, str], str]

    def device(self, vendor_id: str, device_id: str) -> str | None:
        return self.devices.get((vendor_id, device_id))

    def vendor(self, vendor_id: str) -> str | None:
        return self.vendors.get(vendor_id)


def load_pci_ids(host: Host, wanted_vendors: Iterable[str]) -> PciNames:
    """Names for the wanted vendors only: a targeted scan of pci.ids, not a full parse."""
    names = PciNames({}, {})
    text = None
    for p in PCI_IDS_PATHS:
        text = host.read_text(p, default="")
        if text:
            break
    if not text:
        return names
    for vid in set(wanted_vendors):
        at = text.find(f"\n{vid}  ")
        if at < 0:
            continue
        end = text.find("\n", at + 1)
        names.vendors[vid] = text[at + 7 : end if end > 0 else None].strip()
        # Device lines start with one tab; subsystem lines with two; the block ends at the next
        # line that starts with neither (the next vendor or a comment).
        pos = end
        while pos > 0:
            nxt = text.find("\n", pos + 1)
            line = text[pos + 1 : nxt if nxt > 0 else None]
            if line.startswith("\t\t") or line.startswith("#") or not line:
                pos = nxt
                continue
            if not line.startswith("\t"):
                break
            did, _, name = line[1:].partition("  ")
            names.devices[(vid, did.strip().lower())] = name.strip()
            pos = nxt
    return names


def udev_names(addresses: Iterable[str]) -> dict[str, tuple[str | None, str | None]]:
    """(vendor, model) names from udev's hwdb on a live host; empty where libudev is absent."""
    wanted = set(addresses)
    out: dict[str, tuple[str | None, str | None]] = {}
    try:
        import pyudev

        ctx = pyudev.Context()
        for dev in ctx.list_devices(subsystem="pci"):
            name = dev.sys_name
            if name in wanted:
                props = dev.properties
                out[name] = (props.get("ID_VENDOR_FROM_DATABASE"), props.get("ID_MODEL_FROM_DATABASE"))
    except Exception:
        return {}
    return out


# Compiled where it is used: re's compiler is pure Python, and this pattern alone costs more start-up
# time than the doctor, which never parses lspci, can spare.
_LSPCI_LINE = (
    r"^(?P<addr>(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])\s+"
    r"(?P<cname>.*?)\s+\[(?P<class>[0-9a-fA-F]{4})\]:\s+"
    r"(?P<desc>.*)\s+\[(?P<vendor>[0-9a-fA-F]{4}):(?P<device>[0-9a-fA-F]{4})\]"
    r"(?:\s+\(rev (?P<rev>[0-9a-fA-F]{2})\))?"
    r"(?:\s+\(prog-if (?P<progif>[0-9a-fA-F]{2}).*\))?\s*$"
)


class LspciEntry(NamedTuple):
    """One line of `lspci -Dnn`."""

    address: str
    class_code: str
    vendor_id: str
    device_id: str
    description: str
    revision: str | None


def parse_lspci_nn(text: str) -> list[LspciEntry]:
    """Parse `lspci -Dnn` (or plain `lspci -nn`, assuming domain 0000)."""
    out = []
    line_re = re.compile(_LSPCI_LINE)
    for line in text.splitlines():
        m = line_re.match(line.strip())
        if not m:
            continue
        addr = m["addr"].lower()
        if addr.count(":") == 1:
            addr = "0000:" + addr
        out.append(
            LspciEntry(
                address=addr,
                class_code=m["class"].lower(),
                vendor_id=m["vendor"].lower(),
                device_id=m["device"].lower(),
                description=m["desc"].strip(),
                revision=m["rev"].lower() if m["rev"] else None,
            )
        )
    return out
