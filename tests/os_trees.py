"""Host trees of the releases the OS check has to tell apart: each release's real /etc/os-release
(as its base image ships it), and what the check looks at for a release it does not know by name:
/run/systemd/system, the /usr/bin/python3 link, update-grub / grub-mkconfig and the kernel's
vfio-pci module (modules.dep lines as `depmod` writes them for that release's kernel)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

UBUNTU_TAIL = (
    'HOME_URL="https://www.ubuntu.com/"\n'
    'SUPPORT_URL="https://help.ubuntu.com/"\n'
    'BUG_REPORT_URL="https://bugs.launchpad.net/ubuntu/"\n'
    'PRIVACY_POLICY_URL="https://www.ubuntu.com/legal/terms-and-policies/privacy-policy"\n'
)
DEBIAN_TAIL = (
    'HOME_URL="https://www.debian.org/"\n'
    'SUPPORT_URL="https://www.debian.org/support"\n'
    'BUG_REPORT_URL="https://bugs.debian.org/"\n'
)


def _ubuntu(version: str, point: str, lts: bool, name: str, codename: str) -> str:
    label = f"{point}{' LTS' if lts else ''}"
    return (
        f'PRETTY_NAME="Ubuntu {label}"\nNAME="Ubuntu"\nVERSION_ID="{version}"\n'
        f'VERSION="{label} ({name})"\nVERSION_CODENAME={codename}\nID=ubuntu\nID_LIKE=debian\n'
        f"{UBUNTU_TAIL}UBUNTU_CODENAME={codename}\nLOGO=ubuntu-logo\n"
    )


class Release(NamedTuple):
    os_release: str
    python: str  # what /usr/bin/python3 links to
    kernel: str
    vfio: str  # modules.dep / modules.builtin line naming vfio-pci
    grub_tools: tuple[str, ...]  # in /usr/sbin


VFIO_DEP = "kernel/drivers/vfio/pci/vfio-pci.ko{ext}: kernel/drivers/vfio/pci/vfio-pci-core.ko{ext}\n"

RELEASES: dict[str, Release] = {
    "ubuntu-22.04": Release(
        _ubuntu("22.04", "22.04.5", True, "Jammy Jellyfish", "jammy").replace("LOGO=ubuntu-logo\n", ""),
        "python3.10",
        "5.15.0-126-generic",
        VFIO_DEP.format(ext=""),
        ("update-grub", "grub-mkconfig"),
    ),
    "ubuntu-24.04": Release(
        _ubuntu("24.04", "24.04.3", True, "Noble Numbat", "noble"),
        "python3.12",
        "6.8.0-88-generic",
        VFIO_DEP.format(ext=".zst"),
        ("update-grub", "grub-mkconfig"),
    ),
    "ubuntu-26.04": Release(
        _ubuntu("26.04", "26.04", True, "Resolute Raccoon", "resolute"),
        "python3.14",
        "7.0.0-14-generic",
        VFIO_DEP.format(ext=".zst"),
        ("update-grub", "grub-mkconfig"),
    ),
    "debian-12": Release(
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\n'
        'VERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n' + DEBIAN_TAIL,
        "python3.11",
        "6.1.0-41-amd64",
        VFIO_DEP.format(ext=""),
        ("update-grub", "grub-mkconfig"),
    ),
    "debian-13": Release(
        'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nNAME="Debian GNU/Linux"\nVERSION_ID="13"\n'
        'VERSION="13 (trixie)"\nVERSION_CODENAME=trixie\nDEBIAN_VERSION_FULL=13.2\nID=debian\n' + DEBIAN_TAIL,
        "python3.13",
        "6.12.57+deb13-amd64",
        VFIO_DEP.format(ext=".xz"),
        ("update-grub", "grub-mkconfig"),
    ),
    "ubuntu-25.10": Release(
        _ubuntu("25.10", "25.10", False, "Questing Quokka", "questing"),
        "python3.13",
        "6.17.0-7-generic",
        VFIO_DEP.format(ext=".zst"),
        ("update-grub", "grub-mkconfig"),
    ),
    # Debian 14 as it is today, the testing release: its os-release has no VERSION_ID.
    "debian-14": Release(
        'PRETTY_NAME="Debian GNU/Linux forky/sid"\nNAME="Debian GNU/Linux"\nVERSION_CODENAME=forky\n'
        "ID=debian\n" + DEBIAN_TAIL,
        "python3.13",
        "6.17.8-amd64",
        VFIO_DEP.format(ext=".xz"),
        ("update-grub", "grub-mkconfig"),
    ),
    "ubuntu-20.04": Release(
        'NAME="Ubuntu"\nVERSION="20.04.6 LTS (Focal Fossa)"\nID=ubuntu\nID_LIKE=debian\n'
        'PRETTY_NAME="Ubuntu 20.04.6 LTS"\nVERSION_ID="20.04"\n'
        + UBUNTU_TAIL
        + "VERSION_CODENAME=focal\nUBUNTU_CODENAME=focal\n",
        "python3.8",
        "5.4.0-216-generic",
        "kernel/drivers/vfio/pci/vfio-pci.ko\n",  # built in (modules.builtin)
        ("update-grub", "grub-mkconfig"),
    ),
    "centos-stream-9": Release(
        'NAME="CentOS Stream"\nVERSION="9"\nID="centos"\nID_LIKE="rhel fedora"\nVERSION_ID="9"\n'
        'PLATFORM_ID="platform:el9"\nPRETTY_NAME="CentOS Stream 9"\nANSI_COLOR="0;31"\n'
        'LOGO="fedora-logo-icon"\nCPE_NAME="cpe:/o:centos:centos:9"\nHOME_URL="https://centos.org/"\n'
        'BUG_REPORT_URL="https://issues.redhat.com/"\n'
        'REDHAT_SUPPORT_PRODUCT="Red Hat Enterprise Linux 9"\n'
        'REDHAT_SUPPORT_PRODUCT_VERSION="CentOS Stream"\n',
        "python3.9",
        "5.14.0-630.el9.x86_64",
        VFIO_DEP.format(ext=".xz"),
        ("grub2-mkconfig",),
    ),
}

ACCEPTED = ("ubuntu-22.04", "ubuntu-24.04", "ubuntu-26.04", "debian-12", "debian-13")
WARNED = {"ubuntu-25.10": "Ubuntu 25.10", "debian-14": "Debian GNU/Linux forky/sid"}
REFUSED = {
    "ubuntu-20.04": ("Ubuntu 20.04.6 LTS", ["Python 3.8 (3.10 or newer needed)"]),
    "centos-stream-9": (
        "CentOS Stream 9",
        [
            "not Debian or Ubuntu (ID=centos, ID_LIKE=rhel fedora)",
            "Python 3.9 (3.10 or newer needed)",
            "no GRUB (neither update-grub nor grub-mkconfig)",
        ],
    ),
}


def write_release(root: Path, name: str) -> Path:
    """Put release `name`'s files into the tree at `root` (other files of the tree stay)."""
    rel = RELEASES[name]
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/os-release").write_text(rel.os_release)
    (root / "run/systemd/system").mkdir(parents=True, exist_ok=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    link = root / "usr/bin/python3"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(rel.python, link)
    sbin = root / "usr/sbin"
    sbin.mkdir(parents=True, exist_ok=True)
    for tool in ("update-grub", "grub-mkconfig", "grub2-mkconfig"):
        (sbin / tool).unlink(missing_ok=True)
    for tool in rel.grub_tools:
        (sbin / tool).write_text("#!/bin/sh\nexit 0\n")
        (sbin / tool).chmod(0o755)
    (root / "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
    (root / "proc/sys/kernel/osrelease").write_text(rel.kernel + "\n")
    modules = root / "usr/lib/modules" / rel.kernel
    modules.mkdir(parents=True, exist_ok=True)
    builtin = name == "ubuntu-20.04"
    (modules / ("modules.builtin" if builtin else "modules.dep")).write_text(rel.vfio)
    return root
