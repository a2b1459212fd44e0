"""Stage `detect`: the inventory every later stage works from."""

from __future__ import annotations

from dataclasses import replace

from bootstrap.discovery import UnitStatus, discover
from bootstrap.stages.contract import Context, Facts, Outcome, StagePlan, StageResult
from bootstrap.stages.control_plane import gpu_mode_of


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
    after = replace(facts, inventory=inv)
    # Resolved here, once: every later stage acts on this run's GPU mode (gpu_mode_of).
    after = replace(after, gpu_mode=gpu_mode_of(ctx, after))
    return StagePlan(after, StageResult(Outcome.OK, msg))


def apply(_ctx: Context, sp: StagePlan[None]) -> tuple[StageResult, Facts]:
    return sp.planned, sp.facts
