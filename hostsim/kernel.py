"""The kernel's side of a host tree: what sysfs writes do, what the boot-time tools do, and a reboot.

- `KernelSim` reacts to writes the production code makes through `SimHost.sysfs_write`, the way the PCI
  core does: `driver_override` stores the name, `drivers/<drv>/unbind` detaches the device (its
  `driver` link and the driver's `<addr>` link go), `drivers_probe` and `drivers/<drv>/bind` attach
  it to the override's driver (vfio-pci only with an IOMMU group, as vfio-pci's probe requires) or,
  with no override, back to the driver that had it. Devices can be made to hang or refuse.
- `install_handlers` registers simulators of the commands the gpu stage runs on a RecordingRunner:
  `modprobe` (loads vfio-pci), `systemctl` (restart of the bind service runs the real bind code),
  `update-grub`/`grub-mkconfig` (write grub.cfg with the effective kernel arguments), `ip`/`ping`
  for nebula's device (hostsim.network), and `runsc` (the binary installed in the tree answers its
  own flag probe: hostsim.runsc).
- `simulated_reboot` boots the tree again: the command line from grub.cfg, the IOMMU on when the
  firmware and the arguments allow, groups appearing, and the udev rule's driver_override applied.
"""

from __future__ import annotations

import copy
import errno
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from bootstrap.host import CommandResult, Host, RecordingRunner
from hostsim import network
from hostsim.builder import build_host, expand_devices
from hostsim.host import SimHost
from hostsim.runsc import run_in_tree
from hostsim.systemd import Systemd, active_units, set_active_state

_OVERRIDE = re.compile(r"^/sys/bus/pci/devices/([^/]+)/driver_override$")
_UNBIND = re.compile(r"^/sys/bus/pci/drivers/([^/]+)/unbind$")
_BIND = re.compile(r"^/sys/bus/pci/drivers/([^/]+)/bind$")
_DEV_UNBIND = re.compile(r"^/sys/bus/pci/devices/([^/]+)/driver/unbind$")
PROBE = "/sys/bus/pci/drivers_probe"
DRIVERS = "/sys/bus/pci/drivers"


class KernelSim:
    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.writes: list[tuple[str, str]] = []
        # The driver each device had when the simulation started: what a probe without an override
        # attaches it to again.
        self.native: dict[str, str | None] = {
            a: host.readlink_name(f"/sys/bus/pci/devices/{a}/driver") for a in self._addresses()
        }
        self.hang: dict[str, threading.Event] = {}  # unbind blocks until the event is set
        self.refuse: set[str] = set()  # probe of these devices binds nothing

    def attach(self) -> KernelSim:
        self.host.sysfs_hooks.append(self.on_write)
        return self

    def _addresses(self) -> list[str]:
        try:
            return sorted(os.listdir(self.host.path("/sys/bus/pci/devices")))
        except OSError:
            return []

    def _dev(self, addr: str) -> Path:
        p = self.host.path(f"/sys/bus/pci/devices/{addr}")
        if not p.exists():
            raise OSError(errno.ENODEV, "No such device", str(p))
        return p.resolve()

    def driver(self, addr: str) -> str | None:
        return self.host.readlink_name(f"/sys/bus/pci/devices/{addr}/driver")

    def override(self, addr: str) -> str | None:
        v = (self._dev(addr) / "driver_override").read_text().strip()
        return None if v in ("", "(null)") else v

    def on_write(self, path: str, data: str) -> None:
        self.writes.append((path, data))
        value = data.strip()
        if m := _OVERRIDE.match(path):
            (self._dev(m[1]) / "driver_override").write_text((value or "(null)") + "\n")
        elif m := _UNBIND.match(path):
            self.unbind(m[1], value)
        elif m := _DEV_UNBIND.match(path):
            drv = self.driver(m[1])
            if drv is None:
                raise OSError(errno.ENOENT, "No such file or directory", path)
            self.unbind(drv, value)
        elif m := _BIND.match(path):
            self.bind(m[1], value)
        elif path == PROBE:
            self.probe(value)
        else:
            self.host.path(path).write_text(data)

    def unbind(self, drv: str, addr: str) -> None:
        if addr in self.hang:
            self.hang[addr].wait()
        if self.driver(addr) != drv:
            raise OSError(errno.ENODEV, "No such device")
        dev = self._dev(addr)
        (dev / "driver").unlink()
        (self.host.path(f"{DRIVERS}/{drv}") / addr).unlink()

    def bind(self, drv: str, addr: str) -> None:
        if self.driver(addr) is not None:
            raise OSError(errno.EBUSY, "Device or resource busy")
        ov = self.override(addr)
        if ov is not None and ov != drv:
            raise OSError(errno.ENODEV, "No such device")
        if not self._attach(drv, addr):
            raise OSError(errno.EINVAL, "Invalid argument")

    def probe(self, addr: str) -> None:
        self._dev(addr)  # ENODEV for an unknown address, as the kernel answers
        if self.driver(addr) is not None or addr in self.refuse:
            return
        want = self.override(addr) or self.native.get(addr)
        if want is not None:
            self._attach(want, addr)

    def _attach(self, drv: str, addr: str) -> bool:
        ddir = self.host.path(f"{DRIVERS}/{drv}")
        if not ddir.is_dir():
            return False  # module not loaded: nothing to probe with
        dev = self._dev(addr)
        group = self.host.readlink_name(f"/sys/bus/pci/devices/{addr}/iommu_group")
        if drv == "vfio-pci" and group is None:
            return False  # vfio-pci's probe fails without an IOMMU group
        os.symlink(os.path.relpath(ddir, dev), dev / "driver")
        os.symlink(os.path.relpath(dev, ddir), ddir / addr)
        if drv == "vfio-pci" and group is not None:
            node = self.host.path(f"/dev/vfio/{group}")
            node.parent.mkdir(parents=True, exist_ok=True)
            node.touch()
        return True


def load_driver(host: Host, name: str) -> None:
    ddir = host.path(f"{DRIVERS}/{name}")
    for f in ("bind", "unbind", "new_id", "remove_id"):
        p = ddir / f
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"")
            p.chmod(0o200)


# --- commands ---------------------------------------------------------------------------------------


def _modprobe(host: Host, argv: tuple[str, ...]) -> CommandResult:
    for mod in argv[1:]:
        if mod.startswith("-"):
            continue
        if mod.replace("_", "-") == "vfio-pci":
            load_driver(host, "vfio-pci")
    return CommandResult(argv, 0)


def _grub_mkconfig(host: Host, argv: tuple[str, ...]) -> CommandResult:
    from bootstrap.grub import effective_values

    out = argv[argv.index("-o") + 1] if "-o" in argv else "/boot/grub/grub.cfg"
    vals = effective_values(host, with_dropin=True)
    release = host.read_text("/proc/sys/kernel/osrelease", default="").strip()
    args = " ".join(vals["GRUB_CMDLINE_LINUX"].split() + vals["GRUB_CMDLINE_LINUX_DEFAULT"].split())
    cfg = (
        "# generated by the hostsim grub-mkconfig simulator\n"
        "menuentry 'Linux' {\n"
        f"\tlinux\t/boot/vmlinuz-{release} root=UUID=0b1e ro {args}\n"
        f"\tinitrd\t/boot/initrd.img-{release}\n"
        "}\n"
    )
    host.path(out).parent.mkdir(parents=True, exist_ok=True)
    host.path(out).write_text(cfg)
    return CommandResult(argv, 0)


class Services(Systemd):
    """systemctl against a tree (hostsim.systemd) where restarting the bind unit runs the bind code."""

    def __init__(
        self, active: set[str] | None = None, bind_timeout: float = 0.5, spawn: bool = False
    ) -> None:
        super().__init__(hooks={"vectorlay-vfio-bind.service": self._bind}, spawn=spawn)
        self.initially_active = set(active or ())
        self.bind_timeout = bind_timeout
        self.host: Host | None = None

    def attach(self, host: Host) -> None:
        self.host = host
        for unit in self.initially_active:
            set_active_state(host, unit, "active")

    @property
    def active(self) -> set[str]:
        return active_units(self.host) if self.host is not None else set(self.initially_active)

    def _bind(self, host: Host, argv: tuple[str, ...]) -> CommandResult | None:
        from bootstrap.commands.vfio_bind import run_bind
        from bootstrap.errors import VectorlayError

        try:
            result = run_bind(host, timeout=self.bind_timeout)
        except VectorlayError as e:
            return CommandResult(argv, 1, "", e.message)
        if result.failed:
            why = "; ".join(f"{a}: {w}" for a, w in result.failed)
            return CommandResult(argv, 1, "", f"vectorlay-vfio-bind.service failed: {why}")
        return None


def install_handlers(host: Host, services: Services | None = None) -> Services:
    runner = host.runner
    assert isinstance(runner, RecordingRunner)
    services = services or Services()
    services.attach(host)
    runner.handlers.update(
        {
            "modprobe": _modprobe,
            "systemctl": services,
            "update-grub": _grub_mkconfig,
            "grub-mkconfig": _grub_mkconfig,
            "ip": network.ip,
            "ping": network.ping,
            "runsc": run_in_tree,
        }
    )
    return services


def simulated_host(root: Path, *, active: set[str] | None = None) -> tuple[SimHost, KernelSim, Services]:
    """A host over `root` with the kernel and the boot-time tools simulated."""
    host = SimHost(root, RecordingRunner())
    sim = KernelSim(host).attach()
    return host, sim, install_handlers(host, Services(active))


def simulate(host: SimHost) -> None:
    """What hostsim.inject.simulating_host adds to a tree host: kernel, boot tools, and a systemd
    that really runs the agents' daemons, for the real CLI run against a tree."""
    KernelSim(host).attach()
    install_handlers(host, Services(spawn=True))


# --- reboot -----------------------------------------------------------------------------------------

_LINUX_LINE = re.compile(r"^\s*linux\s+(\S+)\s+(.*)$", re.M)
_RULE_ADDR = re.compile(r'KERNEL=="([0-9a-f:.]+)".*ATTR\{driver_override\}="vfio-pci"')


def _next_cmdline(root: Path, current: str) -> str:
    try:
        cfg = (root / "boot/grub/grub.cfg").read_text()
    except FileNotFoundError:
        return current
    m = _LINUX_LINE.search(cfg)
    if m is None:
        return current
    return f"BOOT_IMAGE={m[1]} {m[2]}".strip()


def simulated_reboot(
    root: Path,
    desc: dict[str, Any],
    *,
    firmware_iommu: bool | None = None,
    run_update_grub: bool = False,
) -> str:
    """Reboot the tree built from `desc`; returns the new boot id.

    The kernel starts with the command line of grub.cfg's first entry (unchanged when grub.cfg was
    never regenerated; `run_update_grub` regenerates it first, for runs whose commands were only
    recorded). The IOMMU comes up when the firmware describes one (`firmware_iommu`
    overrides the topology: False is VT-d/AMD-Vi disabled in BIOS) and, on Intel, intel_iommu=on is
    given; AMD's is on unless amd_iommu=off. Functions named by the udev rule come up with
    driver_override=vfio-pci and, with the IOMMU on and vfio-pci available, on vfio-pci; with it
    off they stay without a driver, as vfio-pci refuses them and the override keeps others away.
    /etc, /usr, /var and /opt are kept; what the kernel makes (sys, proc, dev) is rebuilt, /run emptied.
    """
    new = copy.deepcopy(desc)
    if run_update_grub:
        _grub_mkconfig(SimHost(root), ("update-grub",))
    cmdline = (root / "proc/cmdline").read_text().strip()
    cmdline = _next_cmdline(root, cmdline)
    args = cmdline.split()
    vendor = (new.get("cpu") or {}).get("vendor", "intel")
    fw = bool(new.get("firmware_iommu", True)) if firmware_iommu is None else firmware_iommu
    iommu = fw and ("intel_iommu=on" in args if vendor == "intel" else "amd_iommu=off" not in args)
    new.update(cmdline=cmdline, iommu=iommu, firmware_iommu=fw, boot_id=str(uuid.uuid4()))

    release = str(new.get("kernel", "6.8.0-45-generic"))
    builtin = (root / "usr/lib/modules" / release / "modules.builtin").read_text()
    new["builtin_modules"] = [line for line in builtin.splitlines() if line]
    modules_load = ""
    for conf_dir in ("etc/modules-load.d", "usr/lib/modules-load.d"):
        confs = root / conf_dir
        for f in sorted(confs.glob("*.conf")) if confs.is_dir() else []:
            modules_load += f.read_text()
    vfio_available = "vfio_pci" in modules_load.split() or "vfio-pci" in modules_load.split()
    vfio_available = vfio_available or any("vfio-pci.ko" in line for line in new["builtin_modules"])

    reserved: set[str] = set()
    rules = root / "etc/udev/rules.d"
    for f in sorted(rules.glob("*.rules")) if rules.is_dir() else []:
        reserved.update(_RULE_ADDR.findall(f.read_text()))
    devices = expand_devices(list(new.get("devices") or []))
    for d in devices:
        if d["address"] in reserved:
            d["driver_override"] = "vfio-pci"
            d["driver"] = "vfio-pci" if iommu and vfio_available else None
    new["devices"] = devices
    loaded = list(new.get("loaded_drivers", ["pcieport"]))
    if vfio_available and "vfio-pci" not in loaded:
        loaded.append("vfio-pci")
    new["loaded_drivers"] = loaded
    new["files"] = {}
    new["boot_loader"] = "none"  # the boot files on disk are kept as they are

    fresh = root.parent / f".{root.name}.boot"
    shutil.rmtree(fresh, ignore_errors=True)
    build_host(fresh, new)
    shutil.rmtree(root / "run", ignore_errors=True)  # a tmpfs: empty after every boot
    for part in ("sys", "proc", "dev"):
        shutil.rmtree(root / part, ignore_errors=True)
        if (fresh / part).exists():
            os.replace(fresh / part, root / part)
    shutil.rmtree(fresh, ignore_errors=True)
    return str(new["boot_id"])
