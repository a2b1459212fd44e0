"""The runner: plan every stage, in a real run apply each just after its plan, and say how the run
ended. Only the runner knows whether the run is a plan; a stage plans and applies the same way.
Exit codes (docs/contracts.md#exit-codes): 0 done, 1 failed or blocked, 2 usage, 3 reboot required.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bootstrap.commands.display import Display
from bootstrap.errors import VectorlayError, redact
from bootstrap.host import Host
from bootstrap.paths import LOG_PATH
from bootstrap.plan import render
from bootstrap.stages.contract import Context, Facts, Outcome, StageResult
from bootstrap.stages.registry import AnyStage

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REBOOT = 0, 1, 2, 3

# The install's logger, whose records the run log keeps (and a plan run silences).
log = logging.getLogger("bootstrap.install")


@dataclass
class Finished:
    stage: AnyStage
    result: StageResult | None
    error: VectorlayError | None = None


def run_verdict(ran: list[Finished], plan_only: bool) -> tuple[str, int]:
    last = ran[-1] if ran else None
    if last is not None and last.error is not None:
        return "BLOCKED" if not isinstance(last.error, InternalError) else "FAILED", EXIT_FAILED
    if last is not None and last.result is not None and last.result.outcome is Outcome.REBOOT:
        return "REBOOT REQUIRED", EXIT_REBOOT
    if plan_only:
        return "PLAN ONLY: nothing was changed", EXIT_OK
    return "DONE", EXIT_OK


class InternalError(VectorlayError):
    """A bug, not an operator error: the traceback is in the log."""


def final_screen(
    ctx: Context, chosen: list[AnyStage], ran: list[Finished], log_path: Path | None, plan_only: bool
) -> list[str]:
    verdict, _ = run_verdict(ran, plan_only)
    lines = ["", f"vectorlay-node: {verdict}"]
    done = [f for f in ran if f.result is not None]
    if done:
        lines.append("  done:")
        width = max(len(f.stage.name) for f in done)
        for f in done:
            assert f.result is not None
            what = f.result.message or f.result.outcome.value
            if f.result.outcome is Outcome.REBOOT:
                what = "configured; takes effect after a reboot"
            lines.append(f"    {f.stage.name:<{width}}  {what}")
    not_run = [s.name for s in chosen if s.name not in {f.stage.name for f in ran}]
    left: list[str] = []
    last = ran[-1] if ran else None
    if last is not None and last.error is not None:
        left.append(f"{last.stage.name}: {last.error.message}")
        if last.error.hint:
            left.append(f"  fix: {last.error.hint}")
    elif last is not None and last.result is not None and last.result.outcome is Outcome.REBOOT:
        left.append(last.result.message)
    if not_run:
        left.append("not run yet: " + ", ".join(not_run))
    left.extend(ctx.summary.left)
    if left:
        lines.append("  left:")
        lines.extend(f"    {item}" for item in left)
    if ctx.summary.report is not None:
        r = ctx.summary.report
        units = f", {r.units_ready}/{r.units_total} GPU unit(s) ready" if r.units_total else ""
        lines.append(f"  doctor: {r.verdict.value}{units} (sudo vectorlay-node-doctor for details)")
    elif not plan_only:
        lines.append("  doctor: not run (the run stopped before verify); sudo vectorlay-node-doctor")
    if log_path is not None:
        lines.append(f"  log: {log_path}")
    return lines


@contextlib.contextmanager
def persisting(ctx: Context, plan_only: bool) -> Iterator[None]:
    """Around one stage: the run state it changed is written when it ends, also when it stopped
    (a token's expiry, which the reboot message of the next run names). A plan writes nothing; an
    unchanged state is not written."""
    before = ctx.state.to_json()
    try:
        yield
    finally:
        if not plan_only and ctx.state.to_json() != before:
            ctx.persist()


def run_stages(ctx: Context, chosen: list[AnyStage], display: Display, plan_only: bool) -> list[Finished]:
    """Plan every stage; in a real run apply each just after its plan (the earlier stages changed the
    host it plans from). A plan run hands the later stages what each would produce."""
    ran: list[Finished] = []
    facts = Facts()
    for index, stage in enumerate(chosen, 1):
        display.start(index, stage)
        try:
            with persisting(ctx, plan_only):
                result, facts = step(ctx, stage, facts, plan_only)
        except VectorlayError as e:
            err = e
        except OSError as e:
            err = os_error(ctx.host, stage, e)
        except Exception as e:  # a bug: the operator gets a message, the log the traceback
            log.exception("stage %s crashed", stage.name)
            err = InternalError(
                f"internal error in stage {stage.name}: {type(e).__name__}: {e}",
                f"re-run the same command; if it happens again, report it with {LOG_PATH}",
            )
        else:
            display.finish(stage, result)
            ran.append(Finished(stage, result))
            if result.outcome is Outcome.REBOOT:
                break
            continue
        log.error("stage %s: %s", stage.name, err.message)
        display.finish(stage, None, redact(err.message))
        ran.append(Finished(stage, None, err))
        break
    return ran


def step(ctx: Context, stage: AnyStage, facts: Facts, plan_only: bool) -> tuple[StageResult, Facts]:
    """One stage: its plan shown (with diffs in a plan run), then, in a real run, applied."""
    sp = stage.plan(ctx, facts)
    if sp.plan.items:
        for line in render(sp.plan, diffs=plan_only):
            ctx.out(line)
    for line in sp.tail:
        ctx.out(line)
    if plan_only:
        return sp.planned, sp.facts
    return stage.apply(ctx, sp)


def drop_stale_commands(ctx: Context) -> None:
    """After a complete, successful run every stage has planned again, and each plan runs the
    journalled commands it still wants; one still journalled is wanted by none (e.g. `systemctl start`
    of a timer that a killed run did start, so the agents stage no longer asks for it)."""
    if ctx.state.pending_commands:
        for argv in ctx.state.pending_commands:
            log.info("dropped from the command journal, no stage needs it any more: %s", " ".join(argv))
        ctx.state.pending_commands = []


def os_error(host: Host, stage: AnyStage, e: OSError) -> VectorlayError:
    where = ""
    if e.filename:
        name = str(e.filename)
        with contextlib.suppress(ValueError):
            name = host.to_host(Path(name))  # the path as the operator knows it, also in a tree
        where = f" ({name})"
    if e.errno == errno.ENOSPC:
        return VectorlayError(
            f"disk full: no space left on device while the {stage.name} stage was writing{where}",
            "free some space (df -h /etc /var /opt), then re-run the same command: every file is either "
            "complete or untouched, and the run picks up where it stopped",
        )
    return VectorlayError(
        f"the {stage.name} stage could not write or read{where}: {e.strerror or e}",
        "check the path and its permissions, then re-run the same command",
    )
