"""`vectorlay-bootstrap install`: run the stages, plan first, and end done / reboot required / blocked."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from bootstrap import stages
from bootstrap.errors import UsageError, VectorlayError
from bootstrap.host import Host
from bootstrap.settings import GPU_MODES, load_settings
from bootstrap.stages import Context, Outcome
from bootstrap.state import load_state

LOCK_PATH = "/run/vectorlay/bootstrap.lock"
EXIT_OK, EXIT_REBOOT = 0, 3


@contextlib.contextmanager
def run_lock(host: Host) -> Iterator[None]:
    """One run at a time: a second run fails at once instead of racing the first."""
    path = host.path(LOCK_PATH)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VectorlayError(
                "another vectorlay-bootstrap run is in progress", f"wait for it to finish ({LOCK_PATH})"
            ) from None
        yield
    finally:
        os.close(fd)


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
) -> int:
    if gpu_mode is not None and gpu_mode not in GPU_MODES:
        raise UsageError(f"--gpu-mode {gpu_mode!r} is not a GPU mode", "use passthrough, container or none")
    if ca_file is not None and not ca_file.is_file():
        raise UsageError(f"--ca-file {ca_file}: no such file")
    host = host or Host(root)
    chosen, skipped = stages.select(only)
    settings = load_settings(host)
    if api:
        settings = replace(settings, api=api)
    state = load_state(host)
    if token_expires_at is None and state.token_expires_at:
        with contextlib.suppress(ValueError):
            token_expires_at = datetime.fromisoformat(state.token_expires_at)
    ctx = Context(
        host=host,
        settings=settings,
        state=state,
        plan_only=plan_only,
        gpu_mode=gpu_mode,
        api=settings.api,
        ca_file=ca_file,
        token_expires_at=token_expires_at,
    )
    if skipped:
        ctx.out("skipped (not implemented yet): " + ", ".join(s.name for s in skipped))
    lock = contextlib.nullcontext() if plan_only else run_lock(host)
    with lock:
        for stage in chosen:
            result = stages.load(stage).run(ctx)
            if result.outcome is Outcome.REBOOT:
                ctx.out(f"reboot required: {result.message}")
                return EXIT_REBOOT
    if plan_only:
        ctx.out("plan only: nothing was changed")
    else:
        ctx.out("done: " + ", ".join(s.name for s in chosen))
    return EXIT_OK
