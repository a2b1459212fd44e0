"""Facts about the platform that the installer acts on and the doctor explains: which kernel
arguments the IOMMU needs on each CPU vendor, what to switch on in the firmware, and which OS this
is. One definition each, so the installer's action and the doctor's hint cannot drift apart."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, NamedTuple

from bootstrap.paths import SYSTEMD_BOOTED

if TYPE_CHECKING:
    from bootstrap.host import Host


def iommu_args(cpu_vendor: str | None) -> list[str]:
    """The kernel arguments passthrough needs. AMD's IOMMU is on by default (and `amd_iommu=on` is no
    value the kernel knows), Intel's must be asked for; `iommu=pt` spares host devices DMA translation."""
    return ["iommu=pt"] if cpu_vendor == "amd" else ["intel_iommu=on", "iommu=pt"]


def virtualization_name(cpu_vendor: str | None) -> str:
    """The firmware's name for CPU virtualization."""
    return "SVM" if cpu_vendor == "amd" else "VT-x"


def firmware_iommu_hint(cpu_vendor: str | None) -> str:
    """What to switch on in BIOS/UEFI for passthrough (the provider documentation's wording)."""
    if cpu_vendor == "amd":
        return "enable SVM and IOMMU (set to Enabled, not Auto) in BIOS/UEFI"
    if cpu_vendor == "intel":
        return "enable VT-x and VT-d in BIOS/UEFI"
    return "enable VT-x and VT-d (Intel) or SVM and IOMMU set to Enabled, not Auto (AMD) in BIOS/UEFI"


def gpu_mode(*choices: str | None, has_gpus: bool) -> str:
    """passthrough | container | none: the first mode given, else detection's (passthrough on a box
    with GPUs, none without). bootstrap.resolve.gpu_mode decides which sources are given, in which order."""
    for choice in choices:
        if choice:
            return choice
    return "passthrough" if has_gpus else "none"


class OsRelease(NamedTuple):
    id: str = ""
    version_id: str = ""
    pretty_name: str = ""
    id_like: tuple[str, ...] = ()

    @property
    def debian_family(self) -> bool:
        return bool({"debian", "ubuntu"} & {self.id, *self.id_like})


def os_release(host: Host) -> OsRelease:
    """/etc/os-release (os-release(5): KEY=value lines, values optionally quoted); empty fields where
    the file or a key is missing."""
    fields: dict[str, str] = {}
    for line in host.read_text("/etc/os-release", default="").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip("\"'")
    return OsRelease(
        fields.get("ID", ""),
        fields.get("VERSION_ID", ""),
        fields.get("PRETTY_NAME", ""),
        tuple(fields.get("ID_LIKE", "").split()),
    )


# The releases vectorlay-node is built and tested for: (ID, VERSION_ID, name). install.sh cannot import
# this module (it runs before the installer exists), so it carries the same list in two lines that
# tests/install_sh/test_os_support.py keeps equal to this one.
SUPPORTED_RELEASES: tuple[tuple[str, str, str], ...] = (
    ("ubuntu", "22.04", "Ubuntu 22.04"),
    ("ubuntu", "24.04", "Ubuntu 24.04"),
    ("ubuntu", "26.04", "Ubuntu 26.04"),
    ("debian", "12", "Debian 12"),
    ("debian", "13", "Debian 13"),
)
MIN_PYTHON = (3, 10)
# What another Debian or Ubuntu release must have for the install to go on (with a warning).
CAPABILITIES = "systemd, Python {}.{} or newer, GRUB and the vfio modules".format(*MIN_PYTHON)


def supported_names() -> str:
    """'Ubuntu 22.04, ... and Debian 13': the list as an operator reads it."""
    names = [name for _id, _version, name in SUPPORTED_RELEASES]
    return ", ".join(names[:-1]) + " and " + names[-1]


class OsSupport(NamedTuple):
    found: str  # PRETTY_NAME, else ID and VERSION_ID
    supported: bool  # a release of SUPPORTED_RELEASES
    missing: tuple[str, ...]  # what refuses a release that is not: empty means it goes on with a WARN

    @property
    def refused(self) -> bool:
        return bool(self.missing)

    def warning(self) -> str:
        return (
            f"{self.found} is not a release vectorlay-node is tested on ({supported_names()}); "
            f"it has {CAPABILITIES}, so the install goes on"
        )

    def error(self) -> tuple[str, str]:
        """(message, fix) for a refused OS."""
        return (
            f"unsupported OS: {self.found}: " + "; ".join(self.missing),
            f"vectorlay-node supports {supported_names()}, and other Debian or Ubuntu releases with "
            f"{CAPABILITIES}",
        )


def os_support(host: Host) -> OsSupport:
    """Whether this OS can be a node: a supported release by name, else by what it has. install.sh
    makes the same checks in shell, on the same files."""
    rel = os_release(host)
    found = rel.pretty_name or f"{rel.id or 'unknown'} {rel.version_id}".strip()
    if any((rel.id, rel.version_id) == (i, v) for i, v, _name in SUPPORTED_RELEASES):
        return OsSupport(found, True, ())
    missing: list[str] = []
    if not rel.debian_family:
        like = f", ID_LIKE={' '.join(rel.id_like)}" if rel.id_like else ""
        missing.append(f"not Debian or Ubuntu (ID={rel.id or 'unknown'}{like})")
    # systemd's own test of being the running init (sd_booted(3)).
    if not host.path(SYSTEMD_BOOTED).is_dir():
        missing.append(f"systemd is not the running init (no {SYSTEMD_BOOTED})")
    python = system_python(host)
    if python is not None and python < MIN_PYTHON:
        missing.append("Python {}.{} (".format(*python) + "{}.{} or newer needed)".format(*MIN_PYTHON))
    if not any(_executable(host, f"{d}/{tool}") for d in SBIN_DIRS for tool in GRUB_TOOLS):
        missing.append("no GRUB (neither update-grub nor grub-mkconfig)")
    release = host.read_text("/proc/sys/kernel/osrelease", default="").strip()
    if not vfio_module_present(host, release):
        missing.append(f"no vfio-pci kernel module for kernel {release or '(unknown)'}")
    return OsSupport(found, False, tuple(missing))


SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
GRUB_TOOLS = ("update-grub", "grub-mkconfig")
_PYTHON_NAME = re.compile(r"python(\d+)\.(\d+)")
_VFIO_PCI = re.compile(r"(^|/)vfio-pci\.ko", re.M)


def _executable(host: Host, p: str) -> bool:
    real = host.path(p)
    return real.is_file() and os.access(real, os.X_OK)


def system_python(host: Host) -> tuple[int, int] | None:
    """The version /usr/bin/python3 points to (Debian and Ubuntu link it to python3.N); None when
    there is none yet (install.sh installs the release's own) or it is no such link."""
    try:
        target = os.readlink(host.path("/usr/bin/python3", follow=False))
    except OSError:
        return None
    m = _PYTHON_NAME.fullmatch(os.path.basename(target))
    return (int(m[1]), int(m[2])) if m else None


def vfio_module_present(host: Host, release: str) -> bool:
    """vfio-pci as a module (modules.dep) or built in (modules.builtin) of kernel `release`."""
    if not release:
        return False
    for base in ("/lib/modules", "/usr/lib/modules"):
        for name in ("modules.dep", "modules.builtin"):
            if _VFIO_PCI.search(host.read_text(f"{base}/{release}/{name}", default="")):
                return True
    return False
