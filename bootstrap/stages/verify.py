"""Stage `verify`: the doctor's checks on the node as this run left it; their verdict is the run's.

In passthrough mode the units not yet proven by the VM-attach probe (bootstrap.vmprobe) are probed
first: a unit QEMU cannot start with is not ready, and the verdict must say so.

The checks run for the GPU mode this run installed (`--gpu-mode` included), not the one the
settings held when the run started: on a first run those are still empty, and the doctor would
judge a container-mode node by passthrough's IOMMU groups.

Before them (after the probes), the node reports to the control plane once (what
`vectorlay-node-agent --once` does): the running agent's next heartbeat may be minutes away, and a
node this run re-enrolled must not be shown what the control plane said of its previous identity
(removed, say).
"""

from __future__ import annotations

from dataclasses import replace

from bootstrap import vmprobe
from bootstrap.errors import VectorlayError
from bootstrap.paths import IDENTITY_DIR
from bootstrap.stages.contract import Context, Facts, Outcome, StagePlan, StageResult
from bootstrap.stages.control_plane import gpu_mode_of


def plan(ctx: Context, facts: Facts) -> StagePlan[None]:
    ctx.need_doctor()
    return StagePlan(facts, StageResult(Outcome.PLANNED, "the doctor's checks run after a real install"))


def apply(ctx: Context, sp: StagePlan[None]) -> tuple[StageResult, Facts]:
    from doctor.model import Status

    doctor = ctx.need_doctor()
    mode = gpu_mode_of(ctx, sp.facts)
    if mode == "passthrough":
        _probe_units(ctx)
    # After the probes: a report before them would tell the control plane every unit is not probed
    # yet, and it would advertise none of them until the agent's next heartbeat, minutes later.
    if ctx.host.path(IDENTITY_DIR).exists():
        ctx.out(f"node-agent: {doctor.report_now(ctx.host)}")
    report = doctor.run_checks(ctx.host, replace(ctx.settings, gpu_mode=mode))
    ctx.summary.report = report
    for line in doctor.render_text(report).rstrip("\n").splitlines():
        ctx.out(f"  {line}" if line else "")
    units = f"; {report.units_ready}/{report.units_total} GPU unit(s) ready" if report.units_total else ""
    verdict = f"doctor: {report.verdict.value}{units}"
    failed = [r for r in report.results if r.status is Status.FAIL and r.name not in ctx.ignored_checks]
    if failed:
        raise VectorlayError(
            f"{verdict}: " + "; ".join(f"{r.name}: {r.message}" for r in failed),
            failed[0].hint,
        )
    for r in report.results:
        if r.status is Status.WARN:
            ctx.summary.left.append(f"{r.name}: {r.message} ({r.hint})")
    if any(r.status is Status.FAIL for r in report.results):
        verdict += " (failed checks ignored on request: " + ", ".join(sorted(ctx.ignored_checks)) + ")"
    return StageResult(Outcome.OK, verdict), sp.facts


def _probe_units(ctx: Context) -> None:
    """The VM-attach probe of every unit not yet proven with its current devices, so that the
    doctor's verdict below already counts only units a VM can start with. Units rented at the
    moment are skipped untouched."""
    vmprobe.probe_unproven(ctx.host, ctx.settings, ctx.out)
