"""Stage `detect`: the inventory every later stage works from."""

from __future__ import annotations

from dataclasses import replace

from bootstrap.discovery import UnitStatus, discover
from bootstrap.stages.contract import Context, Facts, Outcome, StagePlan, StageResult


def plan(ctx: Context, facts: Facts) -> StagePlan[None]:
    inv = discover(ctx.host, ctx.settings)
    io = inv.iommu
    iommu = f"IOMMU {'active' if io.active else 'off'}" + (f" ({io.vendor})" if io.vendor else "")
    ready = sum(1 for u in inv.units if u.status is UnitStatus.READY)
    msg = (
        f"{len(inv.gpus)} GPU(s), {len(inv.nvswitches)} NVSwitch(es), {iommu}, "
        f"{ready}/{len(inv.units)} GPU unit(s) ready"
    )
    ctx.out(f"detect: {msg}")
    return StagePlan(replace(facts, inventory=inv), StageResult(Outcome.OK, msg))


def apply(_ctx: Context, sp: StagePlan[None]) -> tuple[StageResult, Facts]:
    return sp.planned, sp.facts
