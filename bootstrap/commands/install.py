"""`vectorlay-bootstrap install`: run the stages in order and end done / reboot required / blocked.

One run at a time (an flock under /run/vectorlay/; a second run names the holder's pid and start
time, read from the kernel's /proc/locks so that taking the lock writes nothing). Everything the run
says goes to /var/log/vectorlay/bootstrap.log as well (bootstrap/commands/run_log.py). The run state
is saved after every stage (written only when it changed), so a re-run of an installed node writes
nothing but its log. The stages run in bootstrap/commands/runner.py, which also holds the exit codes
(docs/contracts.md#exit-codes).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TextIO

from bootstrap.commands.display import Display
from bootstrap.commands.doctor_port import doctor_port
from bootstrap.commands.run_log import quiet_log, run_log
from bootstrap.commands.runner import EXIT_OK, drop_stale_commands, final_screen, log, run_stages, run_verdict
from bootstrap.errors import UsageError, redact
from bootstrap.host import Host, open_host
from bootstrap.lock import run_lock
from bootstrap.provisioning import TokenReader
from bootstrap.settings import GPU_MODES, load_settings
from bootstrap.stages import registry
from bootstrap.stages.contract import Context
from bootstrap.state import load_state

READ_ONLY = frozenset({"detect"})


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
    chosen = registry.select(only)
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

    def out(text: str) -> None:
        text = redact(text, secrets())
        log.info("%s", text)
        display.line(text)

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
        out=out,
        doctor=doctor_port(),
    )
    lock = contextlib.nullcontext() if plan_only else run_lock(host)
    with lock:
        logging_ = quiet_log(log) if plan_only else run_log(host, secrets)
        with logging_ as log_path:
            started = time.monotonic()
            names = ", ".join(s.name for s in chosen)
            log.info("install run started (pid %d, stages %s)", os.getpid(), names)
            for warning in settings.warnings:
                ctx.out(f"warning: {warning}")
            ran = run_stages(ctx, chosen, display, plan_only)
            display.close()
            if only is None and not plan_only and ran and run_verdict(ran, plan_only)[1] == EXIT_OK:
                drop_stale_commands(ctx)
            # The stage reached, recorded by runs that did not fail and did more than read the host.
            if ran and not plan_only and ran[-1].error is None and {f.stage.name for f in ran} - READ_ONLY:
                state.stage = ran[-1].stage.name
                ctx.persist()
            verdict, code = run_verdict(ran, plan_only)
            for line in final_screen(ctx, chosen, ran, log_path, plan_only):
                ctx.out(line)
            log.info("install run ended: %s (exit %d, %.1fs)", verdict, code, time.monotonic() - started)
    if ran and ran[-1].error is not None:
        raise ran[-1].error
    return code
