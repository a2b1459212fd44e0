"""Facts about the platform that the installer acts on and the doctor explains: which kernel
arguments the IOMMU needs on each CPU vendor, what to switch on in the firmware, and which OS this
is. One definition each, so the installer's action and the doctor's hint cannot drift apart."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

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
    """passthrough | container | none: the first mode given (this run's option, then node.yaml),
    else passthrough on a box with GPUs and none without."""
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
