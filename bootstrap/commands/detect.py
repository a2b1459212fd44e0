"""`vectorlay-bootstrap detect`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bootstrap.discovery import Inventory, UnitStatus, discover
from bootstrap.host import open_host
from bootstrap.settings import load_settings

_STATUS_STYLE = {
    UnitStatus.READY: "green",
    UnitStatus.NEEDS_BINDING: "yellow",
    UnitStatus.NOT_ISOLATABLE: "red",
    UnitStatus.WEDGED: "bold red",
    UnitStatus.NO_IOMMU: "red",
}


def run_detect(root: Path, json_out: bool) -> None:
    host = open_host(root)
    inv = discover(host, load_settings(host))
    if json_out:
        json.dump(inv.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render_inventory(inv)


def render_inventory(inv: Inventory) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output gets a width that fits a row per device instead of rich's 80-column default.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    io = inv.iommu
    if io.active:
        console.print(f"IOMMU: [green]active[/] ({io.vendor or 'unknown'}, {io.groups} groups)")
    elif io.firmware_table:
        console.print(f"IOMMU: [red]off[/] ({io.firmware_table} table present; not enabled by the kernel)")
    else:
        console.print("IOMMU: [red]off[/] (no DMAR/IVRS table: disabled in BIOS/UEFI or absent)")

    if not inv.gpus and not inv.nvswitches:
        console.print("GPUs: 0 (CPU-only node)")
        return

    table = Table(title=f"{len(inv.gpus)} GPU(s), {len(inv.nvswitches)} NVSwitch(es)")
    for col in ("Address", "Kind", "ID", "Name", "Driver", "Group", "State"):
        table.add_column(col)
    for kind, devs in (("GPU", inv.gpus), ("NVSwitch", inv.nvswitches)):
        for d in devs:
            state = "[bold red]WEDGED[/]" if d.wedged else (d.power_state or "")
            table.add_row(
                d.address,
                kind,
                f"{d.vendor_id}:{d.device_id}",
                inv.name(d.address),
                d.driver or "-",
                d.iommu_group or "-",
                state,
            )
    console.print(table)

    units = Table(title="GPU units (IOMMU groups)")
    for col in ("Group", "Status", "GPUs", "Devices", "Note"):
        units.add_column(col)
    for u in inv.units + inv.nvswitch_units:
        note = ""
        if u.blockers:
            note = "shares its group with " + ", ".join(inv.describe(b) for b in u.blockers)
        elif u.unbound:
            note = f"{len(u.unbound)} function(s) not on vfio-pci"
        style = _STATUS_STYLE[u.status]
        units.add_row(
            u.iommu_group or "-",
            f"[{style}]{u.status.value}[/]",
            "\n".join(u.gpus),
            str(len(u.devices)),
            note,
        )
    console.print(units)
    ready = sum(1 for u in inv.units if u.status is UnitStatus.READY)
    console.print(f"{ready}/{len(inv.units)} GPU unit(s) ready to rent")
