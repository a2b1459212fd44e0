"""What a VM needs from the host: KVM, and an IOMMU for passthrough."""

from __future__ import annotations

import os

from bootstrap import platform
from doctor.checks.registry import Context, check, gpu_skip
from doctor.model import CheckResult, Status


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
    skip = gpu_skip(ctx, name)
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
