"""A GPU failing in a host tree, as the kernel shows it: what the node-agent's watcher and the
doctor read.

- Fallen off the bus: the function's config space answers every read with all ones (sysfs keeps the
  IDs it cached at enumeration), and the NVIDIA driver logs Xid 79. The link attributes the kernel
  reads live from the Link Status register show that register's all-ones too (drivers/pci/
  pci-sysfs.c: current_link_width is its 6-bit width field, 63; current_link_speed looks its 4-bit
  speed code 15 up in pcie_link_speed[], which has no rate for it: "Unknown").
- The kernel log: /dev/kmsg records as Documentation/ABI/testing/dev-kmsg lays them out,
  "<prio>,<seq>,<usec>,<flags>;<message>\\n", appended to the tree's plain file.
- Unbound: the function's `driver` symlink gone, as after a write to the driver's `unbind`.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

PCI_DEVICES = "sys/bus/pci/devices"
KMSG = "dev/kmsg"
_SEQ = itertools.count(100_000)
# What the live Link Status register shows through sysfs when every config read answers all ones.
ALL_ONES_WIDTH = "63"
ALL_ONES_SPEED = "Unknown"


def config_path(root: Path, address: str) -> Path:
    return root / PCI_DEVICES / address / "config"


def _replace(path: Path, data: bytes) -> None:
    # Whole or not at all: a reader between a truncation and the write would see neither state.
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def kmsg_record(message: str, prio: int = 4) -> bytes:
    """One /dev/kmsg record (prio 4: warning, facility kernel), sequence and time made up."""
    usec = int(time.monotonic() * 1_000_000)
    return f"{prio},{next(_SEQ)},{usec},-;{message}\n".encode()


def log_kernel(root: Path, message: str) -> None:
    """Append one kernel log record, in one write (a reader never sees half of it)."""
    fd = os.open(root / KMSG, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, kmsg_record(message))
    finally:
        os.close(fd)


def xid79(address: str) -> str:
    """The NVIDIA driver's line for a GPU that fell off the bus (its slot, without the function)."""
    return f"NVRM: Xid (PCI:{address.rsplit('.', 1)[0]}): 79, pid=0, GPU has fallen off the bus."


def fall_off_the_bus(root: Path, address: str, *, config: bool = True, kmsg: bool = True) -> bytes:
    """The GPU at `address` falls off the bus; returns its config space, for `come_back`."""
    path = config_path(root, address)
    healthy = path.read_bytes()
    if config:
        _replace(path, b"\xff" * len(healthy))
        _set_link(root, address, ALL_ONES_WIDTH, ALL_ONES_SPEED)
    if kmsg:
        log_kernel(root, xid79(address))
    return healthy


def come_back(root: Path, address: str, healthy: bytes) -> None:
    """The GPU answers again (in a real host: after a power cycle, its link trained at full width
    and speed)."""
    _replace(config_path(root, address), healthy)
    ddir = root / PCI_DEVICES / address
    if (ddir / "max_link_width").exists():
        top = (ddir / "max_link_width").read_text().strip(), (ddir / "max_link_speed").read_text().strip()
        _set_link(root, address, *top)


def _set_link(root: Path, address: str, width: str, speed: str) -> None:
    ddir = root / PCI_DEVICES / address
    if (ddir / "current_link_width").exists():  # a conventional PCI function has no link attributes
        _replace(ddir / "current_link_width", f"{width}\n".encode())
        _replace(ddir / "current_link_speed", f"{speed}\n".encode())


def unbind(root: Path, address: str) -> str:
    """Take the function off its driver; returns the link's target, for `rebind`."""
    link = root / PCI_DEVICES / address / "driver"
    target = os.readlink(link)
    link.unlink()
    return target


def rebind(root: Path, address: str, target: str) -> None:
    os.symlink(target, root / PCI_DEVICES / address / "driver")
