"""Stage `detect`: the inventory every later stage works from."""

from __future__ import annotations

from bootstrap.discovery import UnitStatus, discover
from bootstrap.stages import Context, Outcome, StageResult


def run(ctx: Context) -> StageResult:
    inv = discover(ctx.host, ctx.settings)
    ctx.inventory = inv
    io = inv.iommu
    iommu = f"IOMMU {'active' if io.active else 'off'}" + (f" ({io.vendor})" if io.vendor else "")
    ready = sum(1 for u in inv.units if u.status is UnitStatus.READY)
    msg = (
        f"{len(inv.gpus)} GPU(s), {len(inv.nvswitches)} NVSwitch(es), {iommu}, "
        f"{ready}/{len(inv.units)} GPU unit(s) ready"
    )
    ctx.out(f"detect: {msg}")
    return StageResult(Outcome.OK, msg)
