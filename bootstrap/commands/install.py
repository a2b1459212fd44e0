"""`vectorlay-bootstrap install`: run the stages in order and end done / reboot required / blocked.

One run at a time (an flock under /run/vectorlay/; a second run names the holder's pid and start
time, read from the kernel's /proc/locks so that taking the lock writes nothing). Everything the run
says goes to /var/log/vectorlay/bootstrap.log as well, through a filter that redacts secrets. The
run state is saved after every stage (written only when it changed), so a re-run of an installed node
writes nothing but its log. Exit codes (docs/contracts.md#exit-codes): 0 done, 1 failed or blocked, 2 usage,
3 reboot required.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from bootstrap import stages
from bootstrap.commands.doctor_port import doctor_port
from bootstrap.errors import UsageError, VectorlayError, redact
from bootstrap.host import Host, open_host
from bootstrap.lock import run_lock
from bootstrap.paths import LOG_PATH
from bootstrap.plan import render
from bootstrap.provisioning import TokenReader
from bootstrap.settings import GPU_MODES, load_settings
from bootstrap.stages import Context, Facts, Outcome, Stage, StagePlan, StageResult
from bootstrap.state import load_state, save_state

if TYPE_CHECKING:
    from rich.status import Status

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REBOOT = 0, 1, 2, 3
READ_ONLY = frozenset({"detect"})

log = logging.getLogger("bootstrap.install")


class RedactSecrets(logging.Filter):
    """Rewrites every record (message, arguments and traceback text) with its secrets redacted."""

    def __init__(self, secrets: Callable[[], Iterable[str]] = tuple) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        known = [s for s in self.secrets() if s]
        record.msg = redact(record.getMessage(), known)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, known)
        return True


@contextlib.contextmanager
def run_log(host: Host, secrets: Callable[[], Iterable[str]]) -> Iterator[Path]:
    """Append this run's messages (bootstrap.* loggers) to the log file, secrets redacted."""
    path = host.path(LOG_PATH)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Non-blocking: opening a FIFO planted there for writing would wait for a reader forever.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o640)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
    except OSError as e:
        raise VectorlayError(
            f"cannot open the run log {LOG_PATH}: {e.strerror or e}",
            f"make {LOG_PATH} a plain file again (sudo rm -rf {LOG_PATH}), then re-run",
        ) from None
    stream = os.fdopen(fd, "a", encoding="utf-8")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets))
    logger = logging.getLogger("bootstrap")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
        stream.close()


@contextlib.contextmanager
def _quiet_log() -> Iterator[None]:
    """--plan writes no log: the run's own records go nowhere (not to stderr through logging's
    last-resort handler); the libraries' warnings still do."""
    handler = logging.NullHandler()
    log.addHandler(handler)
    log.propagate = False
    try:
        yield None
    finally:
        log.removeHandler(handler)
        log.propagate = True


# --- the display ------------------------------------------------------------------------------------


class Display:
    """Stage progress: a rich status line on a terminal, plain numbered lines otherwise."""

    def __init__(self, total: int, stream: TextIO | None = None, rich: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.total = total
        self.rich = self.stream.isatty() and os.environ.get("TERM") != "dumb" if rich is None else rich
        self._status: Status | None = None
        if self.rich:
            from rich.console import Console

            self.console = Console(file=self.stream, highlight=False)

    def line(self, text: str) -> None:
        if self.rich:
            self.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def start(self, index: int, stage: Stage) -> None:
        head = f"[{index}/{self.total}] {stage.name}: {stage.summary}"
        if self.rich:
            if self._status is None:
                self._status = self.console.status(head)
                self._status.start()
            else:
                self._status.update(head)
        else:
            self.line(head)

    def finish(self, stage: Stage, result: StageResult | None, error: str | None = None) -> None:
        mark = {
            Outcome.OK: ("✓", "green"),
            Outcome.SKIPPED: ("-", "yellow"),
            Outcome.PLANNED: ("~", "cyan"),
            Outcome.REBOOT: ("↻", "yellow"),
        }
        if result is None:
            symbol, colour, text = "✗", "red", error or "failed"
        else:
            symbol, colour = mark[result.outcome]
            text = result.message or result.outcome.value
        if self.rich:
            from rich.markup import escape

            self.console.print(f"[{colour}]{symbol}[/] [bold]{stage.name}[/]: {escape(text)}")
        else:
            self.line(f"{symbol} {stage.name}: {text}")

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No live status line while the run asks something on the terminal: rich redraws (and so
        erases) the line it is on several times a second, the question with it."""
        status = self._status
        if status is not None:
            status.stop()
        try:
            yield
        finally:
            if status is not None:
                status.start()


# --- the run ----------------------------------------------------------------------------------------


@dataclass
class Finished:
    stage: Stage
    result: StageResult | None
    error: VectorlayError | None = None


def _verdict(ran: list[Finished], plan_only: bool) -> tuple[str, int]:
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
    ctx: Context, chosen: list[Stage], ran: list[Finished], log_path: Path | None, plan_only: bool
) -> list[str]:
    verdict, _ = _verdict(ran, plan_only)
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
    left.extend(ctx.left)
    if left:
        lines.append("  left:")
        lines.extend(f"    {item}" for item in left)
    if ctx.report is not None:
        r = ctx.report
        units = f", {r.units_ready}/{r.units_total} GPU unit(s) ready" if r.units_total else ""
        lines.append(f"  doctor: {r.verdict.value}{units} (sudo vectorlay-node-doctor for details)")
    elif not plan_only:
        lines.append("  doctor: not run (the run stopped before verify); sudo vectorlay-node-doctor")
    if log_path is not None:
        lines.append(f"  log: {log_path}")
    return lines


IGNORE_ENV = "VECTORLAY_IGNORE_PREFLIGHT_ERRORS"


def parse_ignored_checks(text: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in text.replace(",", " ").split() if n.strip())
    if not names:
        return names
    from doctor.checks import WAIVABLE  # each check's record says whether it may be waived

    unknown = sorted(names - set(WAIVABLE))
    if unknown:
        raise UsageError(
            f"--ignore-preflight-errors: {', '.join(unknown)} cannot be ignored",
            "only " + ", ".join(WAIVABLE) + " can (for lab and test machines)",
        )
    return names


def run_install(
    root: Path,
    *,
    plan_only: bool = False,
    only: str | None = None,
    api: str | None = None,
    ca_file: Path | None = None,
    gpu_mode: str | None = None,
    host: Host | None = None,
    token_expires_at: datetime | None = None,
    token_file: Path | None = None,
    stream: TextIO | None = None,
    rich: bool | None = None,
    ignore_preflight_errors: str | None = None,
) -> int:
    ignored = parse_ignored_checks(ignore_preflight_errors or os.environ.get(IGNORE_ENV, ""))
    if gpu_mode is not None and gpu_mode not in GPU_MODES:
        raise UsageError(f"--gpu-mode {gpu_mode!r} is not a GPU mode", "use passthrough, container or none")
    if ca_file is not None and not ca_file.is_file():
        raise UsageError(f"--ca-file {ca_file}: no such file")
    if token_file is not None and str(token_file) != "-" and not token_file.is_file():
        raise UsageError(f"--token-file {token_file}: no such file")
    host = host or open_host(root)
    chosen = stages.select(only)
    settings = load_settings(host, repair=True)
    # The run's options over node.yaml's: one place (the settings) holds the API and the GPU mode asked for.
    if api:
        settings = replace(settings, api=api)
    if gpu_mode:
        settings = replace(settings, gpu_mode=gpu_mode)
    state = load_state(host)
    if token_expires_at is None and state.token_expires_at:
        with contextlib.suppress(ValueError):
            token_expires_at = datetime.fromisoformat(state.token_expires_at)
    display = Display(len(chosen), stream, rich)
    # The token read this run, redacted by value from every line and log record, also once spent.
    seen: set[str] = set()

    def secrets() -> set[str]:
        return seen

    ctx = Context(
        host=host,
        settings=settings,
        state=state,
        api=settings.api,
        ca_file=ca_file,
        token_expires_at=token_expires_at,
        # A plan never waits for a token on standard input: it shows what a real run would ask.
        tokens=TokenReader(token_file, prompt=not plan_only, remember=seen.add, around_prompt=display.paused),
        ignored_checks=ignored,
        doctor=doctor_port(),
    )

    def out(text: str) -> None:
        text = redact(text, secrets())
        log.info("%s", text)
        display.line(text)

    ctx.out = out
    lock = contextlib.nullcontext() if plan_only else run_lock(host)
    with lock:
        logging_ = _quiet_log() if plan_only else run_log(host, secrets)
        with logging_ as log_path:
            started = time.monotonic()
            names = ", ".join(s.name for s in chosen)
            log.info("install run started (pid %d, stages %s)", os.getpid(), names)
            for warning in settings.warnings:
                ctx.out(f"warning: {warning}")
            ran = _run_stages(ctx, chosen, display, plan_only)
            display.close()
            if only is None and not plan_only and ran and _verdict(ran, plan_only)[1] == EXIT_OK:
                _drop_stale_commands(ctx)
            # The stage reached, recorded by runs that did not fail and did more than read the host.
            if ran and not plan_only and ran[-1].error is None and {f.stage.name for f in ran} - READ_ONLY:
                state.stage = ran[-1].stage.name
                save_state(host, state)
            verdict, code = _verdict(ran, plan_only)
            for line in final_screen(ctx, chosen, ran, log_path, plan_only):
                ctx.out(line)
            log.info("install run ended: %s (exit %d, %.1fs)", verdict, code, time.monotonic() - started)
    if ran and ran[-1].error is not None:
        raise ran[-1].error
    return code


def _run_stages(ctx: Context, chosen: list[Stage], display: Display, plan_only: bool) -> list[Finished]:
    """Plan every stage; in a real run apply each just after its plan (the earlier stages changed the
    host it plans from). A plan run hands the later stages what each would produce."""
    ran: list[Finished] = []
    facts = Facts()
    for index, stage in enumerate(chosen, 1):
        display.start(index, stage)
        before = ctx.state.to_json()
        try:
            result, facts = step(ctx, stage, facts, plan_only)
        except VectorlayError as e:
            err = e
        except OSError as e:
            err = _os_error(ctx.host, stage, e)
        except Exception as e:  # a bug: the operator gets a message, the log the traceback
            log.exception("stage %s crashed", stage.name)
            err = InternalError(
                f"internal error in stage {stage.name}: {type(e).__name__}: {e}",
                f"re-run the same command; if it happens again, report it with {LOG_PATH}",
            )
        else:
            if not plan_only and ctx.state.to_json() != before:
                save_state(ctx.host, ctx.state)
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


def step(ctx: Context, stage: Stage, facts: Facts, plan_only: bool) -> tuple[StageResult, Facts]:
    """One stage: its plan shown (with diffs in a plan run), then, in a real run, applied."""
    module = stages.load(stage)
    sp: StagePlan = module.plan(ctx, facts)
    if sp.plan.items:
        for line in render(sp.plan, diffs=plan_only):
            ctx.out(line)
    for line in sp.tail:
        ctx.out(line)
    if plan_only:
        return sp.planned, sp.facts
    return module.apply(ctx, sp)


def _drop_stale_commands(ctx: Context) -> None:
    """After a complete, successful run every stage has planned again, and each plan runs the
    journalled commands it still wants; one still journalled is wanted by none (e.g. `systemctl start`
    of a timer that a killed run did start, so the agents stage no longer asks for it)."""
    if ctx.state.pending_commands:
        for argv in ctx.state.pending_commands:
            log.info("dropped from the command journal, no stage needs it any more: %s", " ".join(argv))
        ctx.state.pending_commands = []


def _os_error(host: Host, stage: Stage, e: OSError) -> VectorlayError:
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
