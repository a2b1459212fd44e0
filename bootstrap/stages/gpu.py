"""Stage `gpu` (passthrough): IOMMU on the kernel command line, vfio modules, the boot-time bind
service and udev rule, initramfs and GRUB regenerated, then the reboot gate.

The node is never enrolled while its GPUs cannot be passed through: when the running kernel does not
yet have the IOMMU on or the GPUs on vfio-pci, the run stops with "reboot required" (exit 3) and
records the boot id, so the run after the reboot can tell "not rebooted yet" from "the firmware has
the IOMMU switched off".
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone

from bootstrap import grub, platform, vfio
from bootstrap.discovery import Inventory, UnitStatus, discover
from bootstrap.errors import VectorlayError
from bootstrap.host import Host
from bootstrap.paths import SYSTEMD_UNITS
from bootstrap.plan import Change, Command, FileChange, Removal, Symlink, compute
from bootstrap.plan import apply as plan_apply
from bootstrap.resources import units_dir
from bootstrap.stages.contract import Context, Facts, Outcome, StagePlan, StageResult
from bootstrap.stages.control_plane import expiry
from bootstrap.state import boot_id, reboot_message
from bootstrap.templating import render as render_template

MODULES_LOAD = "/etc/modules-load.d/vectorlay-vfio.conf"
MODPROBE = "/etc/modprobe.d/vectorlay-vfio.conf"
UDEV_RULE = "/etc/udev/rules.d/99-vectorlay-vfio.rules"
INITRAMFS_HOOK = "/etc/initramfs-tools/hooks/vectorlay-vfio"
UNIT_NAME = "vectorlay-vfio-bind.service"
UNIT = f"{SYSTEMD_UNITS}/{UNIT_NAME}"
UNIT_WANTS = f"{SYSTEMD_UNITS}/multi-user.target.wants/{UNIT_NAME}"
INITRAMFS_INPUTS = (MODULES_LOAD, MODPROBE, UDEV_RULE, INITRAMFS_HOOK)


def cpu_vendor(inv: Inventory) -> str | None:
    return inv.cpu.vendor or inv.iommu.vendor


def wanted_args(host: Host, inv: Inventory) -> list[str]:
    return grub.iommu_args(cpu_vendor(inv), vfio_pci_builtin=vfio.vfio_pci_builtin(host))


def desired(host: Host, inv: Inventory, notes: list[str]) -> list[Change]:
    """The whole passthrough configuration as a list of changes. Raises when the host is blocked
    (a boot loader the installer cannot configure), before anything is written."""
    args = wanted_args(host, inv)
    changes: list[Change] = []
    loader = grub.detect_loader(host)
    if loader.kind == "grub" and loader.update is not None:
        changes += grub.plan_changes(host, loader, args)
    else:
        running = set(inv.iommu.cmdline.split())
        if not all(a in running for a in args):
            raise grub.blocked_message(loader, [a for a in args if a not in running])
        notes.append(f"kernel command line already carries {' '.join(args)} ({loader.kind}); left alone")

    builtin = vfio.builtin_modules(host)
    modules = [m for m in vfio.VFIO_MODULES if m not in builtin]
    if modules:
        changes.append(
            FileChange(MODULES_LOAD, render_template("modules-load-vfio.conf.j2", modules=modules).encode())
        )
    else:
        changes.append(Removal(MODULES_LOAD, reason="vfio is built into the kernel"))
    if "vfio_pci" in builtin:
        notes.append("vfio-pci is built into the kernel: its D3cold option goes on the kernel command line")
    changes.append(
        FileChange(
            MODPROBE,
            render_template(
                "modprobe-vfio.conf.j2",
                softdep_before=[] if "vfio_pci" in builtin else list(vfio.HOST_DRIVERS),
                vfio_pci_builtin="vfio_pci" in builtin,
            ).encode(),
        )
    )
    changes.append(
        FileChange(
            UDEV_RULE, render_template("99-vectorlay-vfio.rules.j2", devices=_rule_devices(inv)).encode()
        )
    )
    debian = platform.os_release(host).debian_family
    if debian:
        changes.append(
            FileChange(
                INITRAMFS_HOOK, render_template("initramfs-hook-vfio.sh.j2", modules=modules).encode(), 0o755
            )
        )
    changes.append(FileChange(UNIT, (units_dir() / UNIT_NAME).read_bytes()))
    changes.append(Symlink(UNIT_WANTS, UNIT))
    changes.append(Command(("systemctl", "daemon-reload"), after=(UNIT, UNIT_WANTS)))
    changes.append(Command(("udevadm", "control", "--reload"), after=(UDEV_RULE,)))
    if debian:
        changes.append(Command(("update-initramfs", "-u"), after=INITRAMFS_INPUTS))
    else:
        notes.append("not a Debian/Ubuntu host: the initramfs is not regenerated")
    pending = [
        a for u in inv.units + inv.nvswitch_units if u.status is UnitStatus.NEEDS_BINDING for a in u.unbound
    ]
    if inv.iommu.active and pending:
        changes.append(
            Command(
                ("systemctl", "restart", UNIT_NAME),
                force=True,
                reason=f"bind {len(pending)} function(s) to vfio-pci now",
                timeout=330.0,
                # A bind that does not take at runtime is what the reboot gate is for.
                check=False,
            )
        )
    return changes


def _rule_devices(inv: Inventory) -> list[dict[str, str]]:
    return [{"address": a} for a in vfio.reserved_addresses(inv)]


def owned_changes(host: Host) -> list[Change]:
    """What `uninstall` undoes: every file this stage writes, then the commands that pick it up."""
    changes: list[Change] = [
        Removal(grub.DROPIN),
        Removal(MODULES_LOAD),
        Removal(MODPROBE),
        Removal(UDEV_RULE),
        Removal(INITRAMFS_HOOK),
        Removal(UNIT_WANTS),
        Removal(UNIT),
    ]
    loader = grub.detect_loader(host)
    if loader.kind == "grub" and loader.update is not None:
        changes.append(Command(loader.update, after=(grub.DROPIN,)))
    changes.append(Command(("systemctl", "daemon-reload"), after=(UNIT, UNIT_WANTS)))
    changes.append(Command(("udevadm", "control", "--reload"), after=(UDEV_RULE,)))
    if platform.os_release(host).debian_family:
        changes.append(Command(("update-initramfs", "-u"), after=INITRAMFS_INPUTS))
    return changes


def _warnings(inv: Inventory) -> list[str]:
    out = []
    _targets, skipped = vfio.select(inv)
    for s in skipped:
        if s.reason.startswith("no IOMMU group"):
            continue
        out.append(s.reason)
    for d in inv.gpus:
        if d.boot_vga and d.driver != "vfio-pci":
            out.append(
                f"{d.address} drives the local console (boot_vga=1): once it is on vfio-pci the console "
                "goes dark; manage this box over SSH, serial or IPMI"
            )
    return out


def plan(ctx: Context, facts: Facts) -> StagePlan[_Passthrough]:
    host = ctx.host
    inv = facts.inventory or discover(host, ctx.settings)
    facts = replace(facts, inventory=inv)
    mode = platform.gpu_mode(ctx.settings.gpu_mode, has_gpus=bool(inv.gpus))
    if mode == "container":
        return StagePlan(facts, container_mode(ctx, inv))
    if mode == "none" or not (inv.gpus or inv.nvswitches):
        why = "no GPU found" if not inv.gpus else "GPU mode none"
        ctx.out(f"gpu: {why}; passthrough not configured")
        return StagePlan(facts, StageResult(Outcome.OK, why))

    notes: list[str] = []
    changes = compute(host, desired(host, inv, notes), ctx.state)
    ctx.out(f"gpu: passthrough for {len(inv.gpus)} GPU(s), {len(inv.nvswitches)} NVSwitch(es)")
    tail = (*(f"  warning: {w}" for w in _warnings(inv)), *(f"  note: {n}" for n in notes))
    return StagePlan(facts, StageResult(Outcome.PLANNED), changes, tail, carry=_Passthrough())


@dataclass(frozen=True)
class _Passthrough:
    """The plan configures passthrough: apply regenerates, rediscovers and runs the gate."""


def apply(ctx: Context, sp: StagePlan[_Passthrough]) -> tuple[StageResult, Facts]:
    if sp.carry is None:
        return sp.planned, sp.facts
    host, inv = ctx.host, sp.facts.inventory
    assert inv is not None
    plan_apply(host, sp.plan, log=lambda m: ctx.out(f"  {m}"), state=ctx.state, persist=ctx.persist)
    loader = grub.detect_loader(host)
    if loader.kind == "grub" and loader.update is not None:
        grub.verify_generated(host, loader, wanted_args(host, inv))
    after = discover(host, ctx.settings) if sp.plan.changes else inv
    facts = replace(sp.facts, inventory=after)
    return gate(ctx, after, expiry(ctx, facts)), facts


CONTAINER_NEEDS = (
    # (what, host paths any of which shows it is there, how to get it)
    (
        "the NVIDIA kernel driver (nvidia module loaded)",
        ("/sys/module/nvidia",),
        "install the NVIDIA driver (e.g. sudo ubuntu-drivers install) and reboot",
    ),
    ("Docker (dockerd)", ("/usr/bin/dockerd", "/usr/sbin/dockerd"), "sudo apt-get install docker.io"),
    (
        "the NVIDIA Container Toolkit (nvidia-container-runtime-hook)",
        ("/usr/bin/nvidia-container-runtime-hook", "/usr/bin/nvidia-ctk"),
        "install nvidia-container-toolkit from NVIDIA's repository",
    ),
)


def container_mode(ctx: Context, inv: Inventory) -> StageResult:
    """Container-GPU mode: GPUs stay on the host driver and are shared through gVisor's nvproxy. No
    IOMMU or VFIO change is made; the host must have what nvproxy stands on."""
    missing = [
        (what, how) for what, paths, how in CONTAINER_NEEDS if not any(ctx.host.exists(p) for p in paths)
    ]
    if missing:
        raise VectorlayError(
            "container-GPU mode (gpu=1) needs "
            + " and ".join(w for w, _ in missing)
            + ", which this host lacks",
            "; ".join(h for _, h in missing) + "; then re-run",
        )
    held = [g.address for g in inv.gpus if g.driver != "nvidia"]
    if held:
        raise VectorlayError(
            f"container-GPU mode needs every GPU on the nvidia driver; not on it: {', '.join(held)}",
            "a GPU on vfio-pci is configured for passthrough: run 'vectorlay-bootstrap uninstall' and "
            "reboot first, or keep passthrough mode",
        )
    ctx.out(f"gpu: container mode: {len(inv.gpus)} GPU(s) stay on the nvidia driver, shared through nvproxy")
    return StageResult(Outcome.OK, "container mode")


def _isolatable(inv: Inventory) -> list[str]:
    return [
        a
        for u in inv.units + inv.nvswitch_units
        if u.status in (UnitStatus.NEEDS_BINDING, UnitStatus.NO_IOMMU)
        for a in (u.unbound or u.devices)
    ]


def gate(ctx: Context, inv: Inventory, expires_at: datetime | None) -> StageResult:
    """Reboot required, blocked, or passthrough ready. What it records in the run state (the boot that
    asked for a reboot) the runner persists when the stage ends."""
    host, state = ctx.host, ctx.state
    not_bound = _isolatable(inv)
    if inv.iommu.active and not not_bound:
        ready = sum(1 for u in inv.units if u.status is UnitStatus.READY)
        if state.reboot_requested_boot_id is not None:
            state.reboot_requested_boot_id = None
            state.reboot_requested_at = None
        msg = f"{ready}/{len(inv.units)} GPU unit(s) ready for passthrough"
        ctx.out(f"gpu: {msg}")
        return StageResult(Outcome.OK, msg)

    now_boot = boot_id(host)
    asked_at = state.reboot_requested_boot_id
    if asked_at is not None and now_boot is not None and asked_at != now_boot:
        vendor = cpu_vendor(inv)
        if not inv.iommu.active:
            running = set(inv.iommu.cmdline.split())
            missing = [a for a in grub.iommu_args(vendor) if a not in running and a.startswith("intel_iommu")]
            if missing:
                raise VectorlayError(
                    f"the host rebooted but the kernel was started without {' '.join(missing)}, although "
                    f"{grub.DROPIN} asks for it",
                    "run update-grub, check the 'linux' lines in /boot/grub/grub.cfg and the boot entry "
                    "the firmware starts, then reboot and re-run",
                )
            raise VectorlayError(
                "the host rebooted but the IOMMU is still off: the firmware has it disabled",
                f"{platform.firmware_iommu_hint(vendor)}, then reboot and re-run",
            )
        raise VectorlayError(
            f"after a reboot, {len(not_bound)} function(s) are still not on vfio-pci: {', '.join(not_bound)}",
            f"sudo systemctl restart {UNIT_NAME}; see journalctl -u {UNIT_NAME}; then re-run",
        )

    if asked_at != now_boot or state.reboot_requested_at is None:
        # Asked again in the same boot: the first time stands (and the state file stays untouched).
        state.reboot_requested_boot_id = now_boot
        state.reboot_requested_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    msg = reboot_message(expires_at)
    if not inv.iommu.active and inv.iommu.firmware_table is None:
        hint = platform.firmware_iommu_hint(cpu_vendor(inv))
        msg += f"; the firmware reports no IOMMU either: {hint} while you reboot"
    return StageResult(Outcome.REBOOT, msg)
