"""`vectorlay-bootstrap enroll`: enroll or re-enroll this node by running the install's enroll stage.

The same stage as `install --only enroll` (and the stage it needs, detect), under the same run lock
and run log: two enrollments never overlap (a second run is refused, naming the first), and the key
pair of an enrollment in flight is kept (PENDING_KEY), so a run killed after the control plane
consumed the token completes with the same token when re-run. Unlike the install, a token is always
read, and one the control plane would refuse is an error: re-enrolling is what was asked for.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from bootstrap.errors import VectorlayError, redact
from bootstrap.host import open_host
from bootstrap.lock import run_lock
from bootstrap.paths import IDENTITY_DIR
from bootstrap.provisioning import TokenReader, describe_expiry
from bootstrap.settings import load_settings
from bootstrap.stages import registry
from bootstrap.stages.contract import Context, Facts, Outcome
from bootstrap.state import load_state

log = logging.getLogger("bootstrap.enroll_command")


def run_enroll(root: Path, api_url: str | None, ca_file: Path | None, token_file: Path | None) -> None:
    from bootstrap.commands.run_log import run_log
    from bootstrap.commands.runner import os_error, persisting
    from bootstrap.enroll import token_refused

    if ca_file is not None and not ca_file.is_file():
        raise VectorlayError(
            f"--ca-file {ca_file} does not exist", "give the control plane's CA certificate (PEM)"
        )
    host = open_host(root)
    settings = load_settings(host)
    seen: set[str] = set()

    def out(text: str) -> None:
        print(redact(text, seen), file=sys.stderr, flush=True)

    def logged(text: str) -> None:
        log.info("%s", text)  # into the run log, which the stages only speak inside
        out(text)

    ctx = Context(
        host=host,
        settings=settings,
        state=load_state(host),
        api=api_url or settings.api,
        ca_file=ca_file,
        out=logged,
        tokens=TokenReader(token_file, required=True, remember=seen.add),
    )
    with run_lock(host), run_log(host, lambda: seen):
        facts = Facts()
        try:
            for stage in registry.select("enroll"):
                with persisting(ctx, plan_only=False):
                    sp = stage.plan(ctx, facts)
                    tok = sp.facts.token
                    if stage.name == "enroll" and tok is not None and tok.state == "valid":
                        logged(f"provisioning token {describe_expiry(tok.expires_at)}")
                    result, facts = stage.apply(ctx, sp)
        except VectorlayError as e:
            log.error("enroll: %s", e.message)
            raise
        except OSError as e:
            err = os_error(host, registry.BY_NAME["enroll"], e)
            log.error("enroll: %s", err.message)
            raise err from None
    if result.outcome is not Outcome.OK:
        # The stage keeps a working identity when the token cannot be used; asked to enroll, say so.
        state = facts.token.state if facts.token is not None else None
        raise token_refused(ctx.api, state if state != "valid" else "used")
    print(result.message)
    out(f"identity written to {IDENTITY_DIR}")
