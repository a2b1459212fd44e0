"""Per-unit health from sysfs alone: what each GPU unit's devices show now (driver, PCIe link, AER
counters, reset methods, presence against the enrollment) and the reasons it is not (fully) ready.

Everything here reads files a GPU bound to vfio-pci still has, so it sees a unit while a VM rents it,
where tools that ask the NVIDIA driver see nothing. The sysfs attributes, as the kernel documents them
(Documentation/ABI/testing/sysfs-bus-pci, sysfs-bus-pci-devices-aer):

- `current_link_speed`, `max_link_speed`: "32.0 GT/s PCIe" ("Unknown" when the link is not up);
  `current_link_width`, `max_link_width`: the lane count.
- `aer_dev_correctable`, `aer_dev_nonfatal`, `aer_dev_fatal`: one "NAME COUNT" line per error type
  (names may hold spaces), ending with TOTAL_ERR_COR / TOTAL_ERR_NONFATAL / TOTAL_ERR_FATAL. Counts
  run since boot; only AER-capable devices have the files.
- `reset_method`: the reset methods the kernel will use, space-separated; empty when it has none
  (the file exists since Linux 5.15).

A unit's reasons come from the sources in SOURCES, each a function of one unit's view; a new source
(a probe's records, say) is one more entry there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from bootstrap.discovery import Inventory, Unit, UnitStatus, is_nvswitch
from bootstrap.fsutil import atomic_write, read_regular
from bootstrap.host import Host
from bootstrap.paths import UNIT_HEALTH_STATE
from bootstrap.pci import PCI_DEVICES, group_sort_key
from doctor.model import (
    MAX_REASONS,
    Aer,
    DeviceHealth,
    Link,
    Reason,
    UnitHealth,
    unit_status,
)

if TYPE_CHECKING:
    from bootstrap.enrolled import EnrolledGpu

RESTART_BIND = "sudo systemctl restart vectorlay-vfio-bind or re-run the bootstrap"
POWER_CYCLE = "power-cycle the host (a soft reboot may not clear it)"
# PCIe generation by transfer rate, for the messages.
_GENERATIONS = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6}
_AER_FILES = (
    ("correctable", "aer_dev_correctable", "TOTAL_ERR_COR"),
    ("nonfatal", "aer_dev_nonfatal", "TOTAL_ERR_NONFATAL"),
    ("fatal", "aer_dev_fatal", "TOTAL_ERR_FATAL"),
)
_STATE_VERSION = 1
_STATE_LIMIT = 1 << 20


# --- sysfs --------------------------------------------------------------------------------------


def _read(path: str, limit: int = 4096) -> str | None:
    try:
        return read_regular(path, limit).decode(errors="replace")
    except OSError:
        return None


# The readers take the device's directory as resolved inside the host's root (bootstrap.pci does the
# same): resolving each attribute's path on its own costs a dozen lstat calls apiece.


def read_link(base: str) -> Link | None:
    names = ("current_link_speed", "current_link_width", "max_link_speed", "max_link_width")
    values = [_read(f"{base}/{n}", 64) for n in names]
    if any(v is None for v in values):
        return None
    speed, width, max_speed, max_width = (v.strip() for v in values if v is not None)
    try:
        return Link(speed.removesuffix(" PCIe"), int(width), max_speed.removesuffix(" PCIe"), int(max_width))
    except ValueError:
        return None


def parse_aer(text: str, total_key: str) -> int:
    """The count of one aer_dev_* file: its TOTAL_ line (the error messages received), else the sum."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        name, _, count = line.strip().rpartition(" ")
        if name and count.isascii() and count.isdigit():
            counts[name.strip()] = int(count)
    if total_key in counts:
        return counts[total_key]
    return sum(v for k, v in counts.items() if not k.startswith("TOTAL_"))


def read_aer(base: str) -> Aer | None:
    found: dict[str, int] = {}
    for severity, name, total in _AER_FILES:
        text = _read(f"{base}/{name}")
        if text is not None:
            found[severity] = parse_aer(text, total)
    if not found:
        return None
    return Aer(found.get("correctable", 0), found.get("nonfatal", 0), found.get("fatal", 0))


def read_reset_method(base: str) -> tuple[str, ...] | None:
    text = _read(f"{base}/reset_method", 256)
    return None if text is None else tuple(text.split())


# --- the AER baseline ----------------------------------------------------------------------------


def load_baseline(host: Host) -> dict[str, Aer] | None:
    """The counts the last recorded run saw, by address; None when there is no usable record of
    this boot (AER counters start from zero at boot, so another boot's counts say nothing)."""
    raw = _read(str(host.path(UNIT_HEALTH_STATE)), _STATE_LIMIT)
    if raw is None:
        return None
    import json  # here: only a node with a record pays for the decoder and the boot id

    from bootstrap.state import boot_id

    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if (
        not isinstance(data, dict)
        or data.get("version") != _STATE_VERSION
        or data.get("boot_id") != boot_id(host)
    ):
        return None
    devices = data.get("aer")
    if not isinstance(devices, dict):
        return None
    out: dict[str, Aer] = {}
    for address, counts in devices.items():
        if isinstance(counts, dict) and all(
            type(counts.get(k)) is int and counts[k] >= 0 for k in Aer._fields
        ):
            out[str(address)] = Aer(*(counts[k] for k in Aer._fields))
    return out


def save_baseline(host: Host, units: Iterable[UnitHealth]) -> None:
    """Record this run's counts (the node-agent's doctor run does, so growth is measured per heartbeat)."""
    import json

    from bootstrap.state import boot_id

    aer = {d.address: d.aer._asdict() for u in units for d in u.devices if d.aer is not None}
    data = {"version": _STATE_VERSION, "boot_id": boot_id(host), "aer": aer}
    body = json.dumps(data, sort_keys=True) + "\n"
    path = host.path(UNIT_HEALTH_STATE)
    try:
        if read_regular(str(path), len(body) + 1) == body.encode():
            return  # counts unchanged: every heartbeat of a healthy node would rewrite the same bytes
    except OSError:
        pass
    # Not durable: a crash that brings back the previous record only makes the next run compare
    # against older counts, which reports growth again rather than hiding it. No kill point either:
    # it is the node-agent's runtime record, as status.json, not a step of an install run.
    atomic_write(path, body, mode=0o644, durable=False, fault=False)


# --- one unit ------------------------------------------------------------------------------------


class UnitView(NamedTuple):
    """What a reason source sees of one unit."""

    host: Host
    inventory: Inventory
    mode: str  # passthrough | container
    id: str
    iommu_group: str | None
    unit: Unit | None  # as discovery found it; None for a unit whose GPUs all left the bus
    devices: tuple[DeviceHealth, ...]
    baseline: Mapping[str, Aer] | None  # None: no record of this boot (first sight)
    group_state: str | None  # a live host's VFIO answer for the group: "viable", "in use by a VM"...
    group_usable: bool


Source = Callable[[UnitView], Iterable[Reason]]


def _first_gpu(view: UnitView) -> str | None:
    gpus = [d.address for d in view.devices if d.role == "gpu"]
    return gpus[0] if gpus else (view.devices[0].address if view.devices else None)


def binding_reasons(view: UnitView) -> Iterable[Reason]:
    """What discovery says of the unit: driver, group, isolation, config space; on a live host, VFIO's
    own answer for the group."""
    inv, unit = view.inventory, view.unit
    if view.mode == "container":
        for d in view.devices:
            dev = inv.devices.get(d.address)
            if not d.present or dev is None:
                continue
            if dev.wedged:
                yield Reason("wedged", d.address, "fell off the bus (D3cold reset bug)", POWER_CYCLE)
            elif d.role == "gpu" and dev.driver != "nvidia":
                yield Reason(
                    "not_on_nvidia",
                    d.address,
                    f"on {dev.driver or 'no driver'}, not on nvidia",
                    "container mode shares only NVIDIA GPUs on the nvidia driver: "
                    "sudo modprobe nvidia (or reboot)",
                )
        return
    if unit is None:
        return
    gpu = _first_gpu(view)
    if unit.status is UnitStatus.NO_IOMMU:
        yield Reason(
            "no_group",
            gpu,
            "in no IOMMU group",
            "turn the IOMMU on: enable VT-d / AMD-Vi in BIOS/UEFI and re-run the install one-liner",
        )
    elif unit.status is UnitStatus.WEDGED:
        for a in unit.gpus:
            if inv.devices[a].wedged:
                yield Reason("wedged", a, "fell off the bus (D3cold reset bug)", POWER_CYCLE)
    elif unit.status is UnitStatus.NOT_ISOLATABLE:
        for b in unit.blockers:
            yield Reason(
                "not_isolatable",
                b,
                f"the unit's IOMMU group also holds {inv.describe(b)}",
                "move the GPU to a slot with its own IOMMU group (or enable ACS in BIOS/UEFI)",
            )
    elif unit.status is UnitStatus.NEEDS_BINDING:
        for a in unit.unbound:
            driver = inv.devices[a].driver if a in inv.devices else None
            yield Reason("not_on_vfio", a, f"on {driver or 'no driver'}, not on vfio-pci", RESTART_BIND)
    elif not view.group_usable:
        yield Reason(
            "group_unusable",
            gpu,
            f"group {unit.iommu_group} is on vfio-pci but {view.group_state}",
            RESTART_BIND,
        )


def presence_reasons(view: UnitView) -> Iterable[Reason]:
    for d in view.devices:
        if not d.present:
            yield Reason(
                "gpu_missing",
                d.address,
                "enrolled, but no longer on the PCI bus",
                "power-cycle the host; if it stays missing, reseat the card or its riser, then RMA it "
                "(removed on purpose: re-run the install one-liner with a new token)",
            )


def _rate(speed: str) -> float | None:
    """2.5 from "2.5 GT/s"; None for "Unknown" (no link) or anything else."""
    number, _, unit = speed.partition(" ")
    try:
        return float(number) if unit == "GT/s" else None
    except ValueError:
        return None


def _gen(rate: float) -> str:
    return f"Gen{_GENERATIONS[rate]}" if rate in _GENERATIONS else f"{rate:g} GT/s"


def link_reasons(view: UnitView) -> Iterable[Reason]:
    for d in view.devices:
        link = d.link
        if link is None:
            continue
        rate, max_rate = _rate(link.speed), _rate(link.max_speed)
        narrow = link.max_width > 0 and link.width < link.max_width
        slow = rate is not None and max_rate is not None and rate < max_rate
        if not (narrow or slow):
            continue
        message = f"PCIe link x{link.width} of x{link.max_width} ({link.speed} of {link.max_speed})"
        if slow and rate is not None and max_rate is not None:
            message += f": {_gen(rate)} on a {_gen(max_rate)} device"
        if narrow and slow:
            hint = (
                "reseat the card or its riser (or move it to a full-width slot), "
                "and set the slot's PCIe speed to Auto in BIOS/UEFI"
            )
        elif narrow:
            hint = "reseat the card or its riser, or move it to a full-width slot"
        else:
            hint = (
                "set the slot's PCIe link speed to Auto (or the card's Gen) in BIOS/UEFI, then reseat "
                "the card or its riser; a GPU in use may slow its link while idle"
            )
        yield Reason("link_degraded", d.address, message, hint)


def aer_reasons(view: UnitView) -> Iterable[Reason]:
    for d in view.devices:
        if d.aer is None:
            continue
        before = view.baseline.get(d.address) if view.baseline is not None else None
        if before is not None and any(now < was for now, was in zip(d.aer, before, strict=True)):
            before = Aer(0, 0, 0)  # counts went down: the device was reset or re-enumerated
        fatal = d.aer.fatal - before.fatal if before is not None else d.aer.fatal
        if fatal > 0:
            if before is None:
                what = f"{fatal} fatal PCIe AER error(s) since boot"
            else:
                what = f"{fatal} fatal PCIe AER error(s) since the last run ({d.aer.fatal} since boot)"
            yield Reason(
                "aer_fatal",
                d.address,
                what,
                f"{POWER_CYCLE}; if they come back, reseat the card or its riser, then RMA the GPU",
            )
        if before is None:
            continue
        nonfatal = d.aer.nonfatal - before.nonfatal
        if nonfatal > 0:
            yield Reason(
                "aer_nonfatal",
                d.address,
                f"{nonfatal} non-fatal PCIe AER error(s) since the last run ({d.aer.nonfatal} since boot)",
                "reseat the card or its riser and check its power cables; "
                "if the count keeps growing, RMA the GPU",
            )
        correctable = d.aer.correctable - before.correctable
        if correctable > 0:
            yield Reason(
                "aer_correctable",
                d.address,
                f"{correctable} correctable PCIe AER error(s) since the last run (the link retried them)",
                "nothing to do while they are rare; if they grow fast, reseat the card or its riser",
            )


def reset_reasons(view: UnitView) -> Iterable[Reason]:
    if view.mode != "passthrough":
        return  # only a VM handover needs the device reset; the nvidia driver resets its own
    for d in view.devices:
        # No reset_method and no reset file: the kernel found no way to reset the device; no
        # reset_method but a reset file: a kernel older than 5.15, which lists none.
        gone = d.reset_method is None and not d.resettable
        if not d.present or d.role == "function":
            continue
        if d.reset_method == ():
            yield Reason(
                "no_reset_method",
                d.address,
                "no reset method (reset_method is empty): it cannot be reset between renters",
                f"sudo sh -c 'echo default > {PCI_DEVICES}/{d.address}/reset_method'; if it stays empty, "
                "move the card to a slot of its own, or RMA it",
            )
        elif gone:
            yield Reason(
                "no_reset_method",
                d.address,
                "no reset method (the kernel found none): it cannot be reset between renters",
                "move the card to a slot of its own (behind its own bridge, for a bus reset), or RMA it",
            )


# Where a unit's reasons come from, in the order they are listed.
def probe_reasons(view: UnitView) -> Iterable[Reason]:
    """The VM-attach probe's record (doctor.vmprobe): on a live host a unit is rentable only once QEMU
    started with exactly its current devices; a failed probe keeps it out with QEMU's own error."""
    if view.mode != "passthrough" or view.unit is None or view.unit.status is not UnitStatus.READY:
        return  # not on vfio-pci, not isolatable...: the binding reasons already say why
    if view.iommu_group is None:
        return
    from doctor.vmprobe import probe_reason  # its QEMU runner's imports only when a unit is there

    found = probe_reason(view.host, view.iommu_group, [d.address for d in view.devices if d.present])
    if found is not None:
        code, message, hint = found
        yield Reason(code, None, message, hint)


SOURCES: tuple[Source, ...] = (
    binding_reasons,
    presence_reasons,
    link_reasons,
    aer_reasons,
    reset_reasons,
    probe_reasons,
)


# --- all units -----------------------------------------------------------------------------------


def _device(host: Host, inv: Inventory, address: str, gpus: Iterable[str]) -> DeviceHealth:
    dev = inv.devices.get(address)
    if address in gpus:
        role = "gpu"
    elif dev is not None and is_nvswitch(dev):
        role = "nvswitch"
    else:
        role = "function"
    if dev is None:
        return DeviceHealth(address, role, False, None)
    if role == "function":
        return DeviceHealth(address, role, True, dev.driver)
    base = str(host.path(f"{PCI_DEVICES}/{address}"))
    # The kernel shows `reset` (and, since 5.15, `reset_method`) only for a device it can reset.
    resettable = os.path.exists(f"{base}/reset")
    return DeviceHealth(
        address, role, True, dev.driver, read_link(base), read_aer(base), read_reset_method(base), resettable
    )


def _line(view: UnitView, status: str) -> str:
    """The terminal's line for a unit: what discovery says first, then the verdict of the rest."""
    inv, unit = view.inventory, view.unit
    word = {"ready": "ready", "degraded": "degraded"}.get(status, "not ready")
    if view.mode == "container":
        d = view.devices[0]
        head = f"{d.address} {inv.name(d.address)}".rstrip()
        dev = inv.devices.get(d.address)
        if dev is None:
            return f"{head}: {word} (enrolled, gone from the bus)"
        if dev.wedged:
            return f"{head}: WEDGED (fell off the bus)"
        if dev.driver != "nvidia":
            return f"{head}: on {dev.driver or 'no driver'}, not on nvidia"
        return f"{head}: on nvidia" + ("" if status == "ready" else f", {word}")
    group = f"group {view.iommu_group}" if view.iommu_group is not None else "no group"
    gpus = ", ".join(f"{d.address} {inv.name(d.address)}".rstrip() for d in view.devices if d.role == "gpu")
    head = f"{group}: {gpus}"
    if unit is None:
        return f"{head}: {word} (enrolled, gone from the bus)"
    if unit.status is UnitStatus.NEEDS_BINDING:
        drivers = sorted({inv.devices[a].driver or "no driver" for a in unit.unbound if a in inv.devices})
        return f"{head}: not on vfio-pci ({', '.join(unit.unbound)} on {', '.join(drivers)})"
    if unit.status is UnitStatus.NOT_ISOLATABLE:
        shared = "; ".join(inv.describe(b) for b in unit.blockers)
        return f"{head}: not isolatable, shares its IOMMU group with {shared}"
    if unit.status is UnitStatus.WEDGED:
        return f"{head}: WEDGED (fell off the bus)"
    if unit.status is UnitStatus.NO_IOMMU:
        return f"{head}: no IOMMU group"
    if not view.group_usable:
        return f"{head}: on vfio-pci but {view.group_state}"
    return f"{head}: {word}" + (f" ({view.group_state})" if view.group_state else "")


def build_units(
    host: Host,
    inv: Inventory,
    mode: str,
    enrolled: list[EnrolledGpu] | None,
    baseline: Mapping[str, Aer] | None,
    sources: Iterable[Source] = SOURCES,
) -> list[UnitHealth]:
    """Every unit for rent in this mode, with its devices read from sysfs and its reasons."""
    sources = tuple(sources)
    # (id, group, discovered unit, device addresses, GPU addresses)
    rows: list[tuple[str, str | None, Unit | None, list[str], list[str]]] = []
    if mode == "passthrough":
        for u in inv.units:
            members = [a for a in u.devices if a in inv.devices and not inv.devices[a].is_bridge]
            uid = u.iommu_group if u.iommu_group is not None else u.gpus[0]
            rows.append((uid, u.iommu_group, u, members or list(u.gpus), list(u.gpus)))
    elif mode == "container":
        rows = [(d.address, None, None, [d.address], [d.address]) for d in inv.gpus]
    else:
        return []
    present = {d.address for d in inv.gpus}
    for g in enrolled or ():
        if g.address in present or g.address in inv.devices:
            continue
        uid = g.address if mode == "container" or g.iommu_group is None else g.iommu_group
        group = None if mode == "container" else g.iommu_group
        row = next((r for r in rows if r[0] == uid), None)
        if row is not None and row[2] is not None:
            # The group now holds a unit that is on the bus: the kernel numbers groups at boot, so
            # after a reboot without the card the next devices took its number. Not that unit's fault.
            uid, group = g.address, None
            row = next((r for r in rows if r[0] == uid), None)
        if row is None:
            row = (uid, group, None, [], [])
            rows.append(row)
        row[3].append(g.address)
        row[4].append(g.address)

    if mode == "passthrough":
        # A unit of GPUs gone from the bus takes its enrolled group's place in the list.
        rows.sort(key=lambda r: group_sort_key(r[1]))
    out = []
    for uid, group, unit, addresses, gpus in rows:
        devices = tuple(_device(host, inv, a, gpus) for a in addresses)
        state, usable = None, True
        if unit is not None and unit.status is UnitStatus.READY and host.is_live:
            from doctor.probes import probe_vfio_group

            probe = probe_vfio_group(f"/dev/vfio/{unit.iommu_group}")
            state, usable = probe.state, probe.usable
        view = UnitView(host, inv, mode, uid, group, unit, devices, baseline, state, usable)
        reasons = tuple(r for source in sources for r in source(view))[:MAX_REASONS]
        status = unit_status(reasons)
        out.append(UnitHealth(uid, group, status, devices, reasons, _line(view, status)))
    return out
