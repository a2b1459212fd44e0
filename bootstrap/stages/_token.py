"""The provisioning token as the install run sees it: read once, introspected once, kept in memory.

Shared by the preflight stage (which reports the token's expiry) and the enroll stage (which also
runs alone with `--only enroll`). The token is never put in argv, a log line, an exception or a file.
"""

from __future__ import annotations

import os
from datetime import datetime

from bootstrap.api import ApiClient
from bootstrap.errors import VectorlayError
from bootstrap.identity import IdentityError, identity_path, load_identity
from bootstrap.stages import Context
from bootstrap.state import save_state

TOKEN_ENV = "VECTORLAY_TOKEN"
PENDING_KEY = "/etc/vectorlay/.enroll-pending.key"


def api_url(ctx: Context) -> str:
    """--api, else node.yaml's api, else the control plane this node enrolled with."""
    if ctx.api:
        return ctx.api
    try:
        ident = load_identity(ctx.host)
    except IdentityError:
        ident = None
    if ident is not None and ident.api:
        ctx.api = ident.api
        return ident.api
    raise VectorlayError(
        "no control plane URL", "pass api=https://... to the one-liner (or --api, or api: in node.yaml)"
    )


def client(ctx: Context, *, attempts: int = 5) -> ApiClient:
    return ApiClient(
        api_url(ctx), ca_file=ctx.ca_file, pinned_ca=identity_path(ctx.host) / "ca.crt", attempts=attempts
    )


def enrolled(ctx: Context) -> bool:
    """A complete identity is in place (a damaged one counts as not enrolled: enrollment repairs it)."""
    try:
        return load_identity(ctx.host) is not None
    except IdentityError:
        return False


def obtain_token(ctx: Context) -> str | None:
    """The token from --token-file, VECTORLAY_TOKEN or standard input; None on an enrolled node that
    was given none (it runs without one: nothing to enroll)."""
    if ctx.token_read:
        return ctx.token
    from bootstrap.enroll import read_token

    given = ctx.token_file is not None or bool(os.environ.get(TOKEN_ENV, "").strip())
    ctx.token_read = True
    if not given and (ctx.plan_only or enrolled(ctx)):
        ctx.token = None
        return None
    try:
        ctx.token = read_token(ctx.token_file)
    except OSError:  # no standard input to read from (a daemon, a test harness)
        raise VectorlayError(
            "no provisioning token given",
            f"set {TOKEN_ENV}=vtk_... (from the dashboard) or pass --token-file FILE",
        ) from None
    return ctx.token


def introspect(ctx: Context, token: str) -> str:
    """valid / used / expired / unknown, recording the expiry for the reboot message."""
    if ctx.token_state is not None:
        return ctx.token_state
    from bootstrap.enroll import introspect_token

    api = client(ctx, attempts=3)
    try:
        info = introspect_token(api, token)
    finally:
        api.close()
    state = "valid" if info.valid else (info.reason or "unknown")
    ctx.token_state = state
    if info.valid and info.expires_at is not None:
        ctx.token_expires_at = info.expires_at
        stamp = info.expires_at.isoformat(timespec="seconds")
        if ctx.state.token_expires_at != stamp and not ctx.plan_only:
            ctx.state.token_expires_at = stamp
            save_state(ctx.host, ctx.state)
    return state


def describe_expiry(expires_at: datetime | None) -> str:
    from bootstrap.state import format_expiry

    hhmm = format_expiry(expires_at)
    return f"valid until {hhmm}" if hhmm else "valid"
