"""YAML host description -> a directory tree with kernel-shaped sys/, proc/, etc/ and usr/.

Description keys (all optional but `devices`):

    cpu: {vendor: intel|amd, flags: [vmx, ...], count: 8, model: "..."}
    memory_gb: 2048
    cmdline: "BOOT_IMAGE=/boot/vmlinuz ro quiet"
    iommu: true             # kernel IOMMU active: iommu_groups populated, /sys/class/iommu/<unit>
    firmware_iommu: true    # DMAR (intel) / IVRS (amd) ACPI table present
    kernel: 6.8.0-45-generic
    boot_loader: grub|systemd-boot|none
    kvm: true               # /dev/kvm present (a plain file in a tree)
    os_release: ubuntu-22.04
    files: {"/etc/default/grub": "..."}
    devices:
      - address: 0000:19:00.0      # or 19:00.0 (domain 0000)
        id: 10de:2330
        class: "030200"
        driver: nvidia             # or null
        group: 31                  # default: one group per device (when iommu is on)
        parent: 0000:18:00.0       # the bridge it sits behind (sysfs nesting)
        subsystem: 10de:16c1
        revision: a1
        power_state: D0
        config_vendor: ffff        # live config space override (a wedged device)
        boot_vga: 1
        link_speed: "32.0 GT/s PCIe"  # max_link_speed (default 16.0 GT/s PCIe); current_link_speed: trained
        link_width: 16             # max_link_width (default 16); current_link_width: as trained
        aer: {fatal: {DLP: 1}}     # AER counts by the kernel's names (default all 0); false: not AER capable
        reset_method: "flr bus"    # default: flr, and bus when alone behind a bridge; "": emptied;
                                   # null: the kernel found none (no reset_method, no reset file)
        repeat: 8                  # with address_step (device|bus|domain) and step_by: what to advance
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from hostsim.pciids import MINI_PCI_IDS

_TOPOLOGIES = Path(__file__).resolve().parent / "topologies"

OS_RELEASES = {
    "ubuntu-22.04": 'NAME="Ubuntu"\nVERSION_ID="22.04"\nID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=jammy\n',
    "ubuntu-24.04": 'NAME="Ubuntu"\nVERSION_ID="24.04"\nID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=noble\n',
    "debian-12": 'NAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\nVERSION_CODENAME=bookworm\n',
}

DEFAULT_GRUB = """# If you change this file, run 'update-grub' afterwards to update
# /boot/grub/grub.cfg.
# For full documentation of the options in this file, see:
#   info -f grub -n 'Simple configuration'

GRUB_DEFAULT=0
GRUB_TIMEOUT_STYLE=hidden
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT="quiet splash"
GRUB_CMDLINE_LINUX=""
"""


def topology_names() -> list[str]:
    return sorted(p.stem for p in _TOPOLOGIES.glob("*.yaml"))


def load_topology(name: str) -> dict[str, Any]:
    path = _TOPOLOGIES / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


def _norm_addr(addr: str) -> str:
    addr = str(addr).lower()
    return addr if addr.count(":") == 2 else "0000:" + addr


def _step(addr: str, i: int, step: str) -> str:
    dom, bus, rest = addr.split(":")
    dev, fn = rest.split(".")
    if step == "bus":
        bus = f"{int(bus, 16) + i:02x}"
    elif step == "domain":
        dom = f"{int(dom, 16) + i:04x}"
    else:
        dev = f"{int(dev, 16) + i:02x}"
    return f"{dom}:{bus}:{dev}.{fn}"


def expand_devices(devs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for d in devs:
        n = int(d.get("repeat", 1))
        step = str(d.get("address_step", "device"))
        by = int(d.get("step_by", 1))
        for i in range(n):
            e = {k: v for k, v in d.items() if k not in ("repeat", "address_step", "step_by", "group_step")}
            e["address"] = _step(_norm_addr(d["address"]), i * by, step)
            if "parent" in d and d["parent"] is not None:
                e["parent"] = _step(_norm_addr(d["parent"]), i * by, step)
            if "group" in d and d["group"] is not None and n > 1:
                e["group"] = int(d["group"]) + i * int(d.get("group_step", 1))
            out.append(e)
    return out


def _write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    os.chmod(path, mode)


def _rel_symlink(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(target, link.parent), link)


def _config_space(vendor: int, device: int, klass: int, revision: int, live_vendor: int | None) -> bytes:
    if live_vendor == 0xFFFF:
        return b"\xff" * 256
    cfg = bytearray(256)
    cfg[0:2] = (live_vendor if live_vendor is not None else vendor).to_bytes(2, "little")
    cfg[2:4] = device.to_bytes(2, "little")
    cfg[8] = revision
    cfg[9:12] = klass.to_bytes(3, "little")
    return bytes(cfg)


# The error names the kernel prints in aer_dev_* (drivers/pci/pcie/aer.c, Linux 6.x), each line "NAME
# COUNT", then the TOTAL_ line (Documentation/ABI/testing/sysfs-bus-pci-devices-aer).
AER_NAMES = {
    "correctable": (
        ("RxErr", "BadTLP", "BadDLLP", "Rollover", "Timeout", "NonFatalErr", "CorrIntErr", "HeaderOF"),
        "TOTAL_ERR_COR",
    ),
    "nonfatal": (
        (
            "Undefined", "DLP", "SDES", "TLP", "FCP", "CmpltTO", "CmpltAbrt", "UnxCmplt", "RxOF", "MalfTLP",
            "ECRC", "UnsupReq", "ACSViol", "UncorrIntErr", "BlockedTLP", "AtomicOpBlocked", "TLPBlockedErr",
            "PoisonTLPBlocked",
        ),
        "TOTAL_ERR_NONFATAL",
    ),
}  # fmt: skip
AER_NAMES["fatal"] = (AER_NAMES["nonfatal"][0], "TOTAL_ERR_FATAL")
AER_FILES = {"correctable": "aer_dev_correctable", "nonfatal": "aer_dev_nonfatal", "fatal": "aer_dev_fatal"}


def aer_text(severity: str, counts: dict[str, int]) -> str:
    """One aer_dev_* file as the kernel prints it: every error type, then the total of messages."""
    names, total = AER_NAMES[severity]
    lines = [f"{n} {int(counts.get(n, 0))}" for n in names]
    return "\n".join([*lines, f"{total} {sum(int(v) for v in counts.values())}"]) + "\n"


def _cpuinfo(cpu: dict[str, Any]) -> str:
    vendor = cpu.get("vendor", "intel")
    vendor_id = {"intel": "GenuineIntel", "amd": "AuthenticAMD"}.get(vendor, vendor)
    flags = cpu.get("flags")
    if flags is None:
        base = ["fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "lm", "sse2"]
        flags = base + (["vmx"] if vendor == "intel" else ["svm"])
    model = cpu.get("model", "Intel(R) Xeon(R) Platinum 8480+" if vendor == "intel" else "AMD EPYC 9654")
    blocks = []
    for i in range(int(cpu.get("count", 4))):
        blocks.append(
            f"processor\t: {i}\nvendor_id\t: {vendor_id}\ncpu family\t: 6\nmodel name\t: {model}\n"
            f"flags\t\t: {' '.join(flags)}\n"
        )
    return "\n".join(blocks) + "\n"


def _meminfo(gb: float) -> str:
    kb = int(gb * 1024 * 1024)
    free = kb // 2
    return (
        f"MemTotal:       {kb} kB\nMemFree:        {free} kB\nMemAvailable:   {free + kb // 8} kB\n"
        f"Buffers:        {kb // 64} kB\nCached:         {kb // 8} kB\nSwapCached:            0 kB\n"
        f"Active:         {kb // 4} kB\nInactive:       {kb // 8} kB\nShmem:          {kb // 256} kB\n"
        f"SReclaimable:   {kb // 128} kB\nSwapTotal:             0 kB\nSwapFree:              0 kB\n"
    )


def _stat(cpus: int) -> str:
    """/proc/stat of a box that has been up a while and is mostly idle (user nice system idle iowait
    irq softirq steal guest guest_nice, in USER_HZ)."""
    per_cpu = (1000, 0, 500, 98000, 200, 0, 50, 0, 0, 0)
    lines = ["cpu  " + " ".join(str(v * cpus) for v in per_cpu)]
    lines += [f"cpu{i} " + " ".join(map(str, per_cpu)) for i in range(cpus)]
    return "\n".join(lines) + "\nintr 0\nctxt 0\nbtime 1700000000\nprocesses 1\n"


def _pcie_attributes(ddir: Path, d: dict[str, Any], devices: list[dict[str, Any]]) -> None:
    """The link, AER and reset attributes of a PCIe function (Documentation/ABI/testing/sysfs-bus-pci,
    sysfs-bus-pci-devices-aer): a healthy device at its full link, no errors, its reset methods."""
    max_speed = str(d.get("link_speed", "16.0 GT/s PCIe"))
    max_width = int(d.get("link_width", 16))
    _write(ddir / "max_link_speed", max_speed + "\n", 0o444)
    _write(ddir / "max_link_width", f"{max_width}\n", 0o444)
    _write(ddir / "current_link_speed", str(d.get("current_link_speed", max_speed)) + "\n", 0o444)
    _write(ddir / "current_link_width", f"{int(d.get('current_link_width', max_width))}\n", 0o444)
    aer = d.get("aer", {})
    if aer is not False:
        for severity, name in AER_FILES.items():
            _write(ddir / name, aer_text(severity, dict((aer or {}).get(severity) or {})), 0o444)
    if int(str(d["class"]), 16) >> 8 in (0x0604, 0x0609):
        return  # bridges: the bus below them is what gets reset
    if "reset_method" in d and d["reset_method"] is None:
        return  # no method at all: the kernel shows neither reset_method nor reset
    parent = d.get("parent")
    if "reset_method" in d:
        methods = str(d["reset_method"])
    else:
        # A secondary bus reset resets every function on the bus: offered only to a function alone
        # behind its bridge (drivers/pci/pci.c, pci_parent_bus_reset).
        alone = parent is not None and not any(
            o is not d
            and o.get("parent") == parent
            and o["address"].split(":")[1] == d["address"].split(":")[1]
            for o in devices
        )
        methods = "flr bus" if alone else "flr"
    # The kernel prints nothing at all, not even a newline, once every method was disabled.
    _write(ddir / "reset_method", methods + "\n" if methods else "", 0o644)
    _write(ddir / "reset", b"", 0o200)


def build_host(root: Path, desc: dict[str, Any]) -> Path:
    """Write the tree described by `desc` under `root` and return root."""
    root.mkdir(parents=True, exist_ok=True)
    cpu = dict(desc.get("cpu") or {})
    vendor = cpu.get("vendor", "intel")
    iommu_on = bool(desc.get("iommu", True))
    fw_iommu = bool(desc.get("firmware_iommu", True))
    kernel = str(desc.get("kernel", "6.8.0-45-generic"))

    _write(root / "proc/cpuinfo", _cpuinfo(cpu))
    _write(root / "proc/meminfo", _meminfo(float(desc.get("memory_gb", 512))))
    _write(root / "proc/stat", _stat(int(cpu.get("count", 4))))
    cmdline = desc.get("cmdline", f"BOOT_IMAGE=/boot/vmlinuz-{kernel} root=UUID=0b1e ro quiet splash")
    _write(root / "proc/cmdline", cmdline + "\n")
    _write(
        root / "proc/sys/kernel/random/boot_id",
        str(desc.get("boot_id", "6f1c2d0e-0000-4000-8000-000000000001")) + "\n",
    )
    _write(root / "proc/sys/kernel/osrelease", kernel + "\n")
    _write(root / "etc/os-release", OS_RELEASES[str(desc.get("os_release", "ubuntu-22.04"))])
    (root / "var/log").mkdir(parents=True, exist_ok=True)  # every installed system has it
    (root / "usr/lib/modules" / kernel).mkdir(parents=True, exist_ok=True)
    _write(
        root / "usr/lib/modules" / kernel / "modules.builtin",
        "\n".join(desc.get("builtin_modules", [])) + "\n",
    )
    if desc.get("kvm", True):
        _write(root / "dev/kvm", b"", 0o660)
    if desc.get("pci_ids", True):
        _write(root / "usr/share/misc/pci.ids", MINI_PCI_IDS)

    loader = desc.get("boot_loader", "grub")
    if loader == "grub":
        _write(root / "etc/default/grub", desc.get("grub", DEFAULT_GRUB))
        _write(root / "boot/grub/grub.cfg", "# generated by grub-mkconfig\n")
        _write(
            root / "usr/sbin/update-grub",
            '#!/bin/sh\nexec grub-mkconfig -o /boot/grub/grub.cfg "$@"\n',
            0o755,
        )
    elif loader == "systemd-boot":
        _write(root / "boot/efi/loader/loader.conf", "timeout 3\n")
        _write(root / "etc/kernel/cmdline", "root=UUID=0b1e ro quiet\n")

    for path, content in (desc.get("files") or {}).items():
        _write(root / str(path).lstrip("/"), content)

    # IOMMU: the kernel's devices under /sys/class/iommu and the firmware's ACPI table.
    unit = "dmar0" if vendor == "intel" else "ivhd0"
    table = "DMAR" if vendor == "intel" else "IVRS"
    (root / "sys/firmware/acpi/tables").mkdir(parents=True, exist_ok=True)
    if fw_iommu:
        _write(root / "sys/firmware/acpi/tables" / table, table.encode() + b"\x00" * 44, 0o400)
    (root / "sys/class/iommu").mkdir(parents=True, exist_ok=True)
    (root / "sys/kernel/iommu_groups").mkdir(parents=True, exist_ok=True)
    if iommu_on and fw_iommu:
        (root / "sys/devices/virtual/iommu" / unit).mkdir(parents=True, exist_ok=True)
        _rel_symlink(root / "sys/devices/virtual/iommu" / unit, root / "sys/class/iommu" / unit)

    drivers_dir = root / "sys/bus/pci/drivers"
    drivers_dir.mkdir(parents=True, exist_ok=True)
    _write(root / "sys/bus/pci/drivers_probe", b"", 0o200)
    _write(root / "sys/bus/pci/rescan", b"", 0o200)

    devices = expand_devices(list(desc.get("devices") or []))
    by_addr = {d["address"]: d for d in devices}
    next_group = 0
    used_groups = {int(d["group"]) for d in devices if d.get("group") is not None}

    def device_dir(addr: str) -> Path:
        d = by_addr[addr]
        parent = d.get("parent")
        if parent:
            return device_dir(_norm_addr(parent)) / addr
        dom, bus, _ = addr.split(":")
        return root / "sys/devices" / f"pci{dom}:{bus}" / addr

    for d in devices:
        addr = d["address"]
        vid, did = (int(x, 16) for x in str(d["id"]).split(":"))
        klass = int(str(d["class"]), 16)
        rev = int(str(d.get("revision", "00")), 16)
        ddir = device_dir(addr)
        ddir.mkdir(parents=True, exist_ok=True)
        sub = str(d.get("subsystem", f"{vid:04x}:0000")).split(":")
        _write(ddir / "vendor", f"0x{vid:04x}\n", 0o444)
        _write(ddir / "device", f"0x{did:04x}\n", 0o444)
        _write(ddir / "class", f"0x{klass:06x}\n", 0o444)
        _write(ddir / "subsystem_vendor", f"0x{int(sub[0], 16):04x}\n", 0o444)
        _write(ddir / "subsystem_device", f"0x{int(sub[1], 16):04x}\n", 0o444)
        _write(ddir / "revision", f"0x{rev:02x}\n", 0o444)
        live = d.get("config_vendor")
        _write(ddir / "config", _config_space(vid, did, klass, rev, int(str(live), 16) if live else None))
        _write(ddir / "power_state", str(d.get("power_state", "D0")) + "\n", 0o444)
        _write(ddir / "driver_override", str(d.get("driver_override") or "(null)") + "\n")
        _write(ddir / "enable", "1\n")
        _write(ddir / "numa_node", str(d.get("numa_node", -1)) + "\n", 0o444)
        if klass >> 8 == 0x0300:
            _write(ddir / "boot_vga", f"{int(d.get('boot_vga', 0))}\n", 0o444)
        _pcie_attributes(ddir, d, devices)
        _write(ddir / "remove", b"", 0o200)
        _write(ddir / "uevent", f"PCI_CLASS={klass:X}\nPCI_ID={vid:04X}:{did:04X}\nPCI_SLOT_NAME={addr}\n")
        _rel_symlink(root / "sys/bus/pci", ddir / "subsystem")
        _rel_symlink(ddir, root / "sys/bus/pci/devices" / addr)

        driver = d.get("driver")
        if driver:
            ddrv = drivers_dir / str(driver)
            for f in ("bind", "unbind", "new_id", "remove_id"):
                if not (ddrv / f).exists():
                    _write(ddrv / f, b"", 0o200)
            _rel_symlink(ddrv, ddir / "driver")
            _rel_symlink(ddir, ddrv / addr)

        if iommu_on and fw_iommu:
            if d.get("group") is not None:
                group = int(d["group"])
            else:
                while next_group in used_groups:
                    next_group += 1
                group = next_group
                used_groups.add(group)
            gdir = root / "sys/kernel/iommu_groups" / str(group)
            (gdir / "devices").mkdir(parents=True, exist_ok=True)
            _write(gdir / "type", "identity\n" if "iommu=pt" in cmdline else "DMA\n", 0o444)
            _rel_symlink(ddir, gdir / "devices" / addr)
            _rel_symlink(gdir, ddir / "iommu_group")
            iommu_link = ddir / "iommu"
            _rel_symlink(root / "sys/devices/virtual/iommu" / unit, iommu_link)

    # Common drivers exist even with no device bound (vfio-pci once its module is loaded).
    for drv in desc.get("loaded_drivers", ["pcieport"]):
        for f in ("bind", "unbind", "new_id", "remove_id"):
            if not (drivers_dir / drv / f).exists():
                _write(drivers_dir / drv / f, b"", 0o200)
    return root
