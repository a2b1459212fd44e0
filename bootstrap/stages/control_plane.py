"""What preflight and enroll share: the control plane and the provisioning token."""

from __future__ import annotations

from datetime import datetime

from bootstrap.api import ApiClient, Proxy, proxy_from_env
from bootstrap.errors import VectorlayError
from bootstrap.identity import IdentityError, identity_path, load_identity
from bootstrap.provisioning import ProvisioningToken
from bootstrap.stages.contract import Context, Facts


def api_url(ctx: Context) -> str:
    """--api, else node.yaml's api, else the control plane this node enrolled with."""
    if ctx.api:
        return ctx.api
    try:
        ident = load_identity(ctx.host)
    except IdentityError:
        ident = None
    if ident is not None and ident.api:
        return ident.api
    raise VectorlayError(
        "no control plane URL", "pass api=https://... to the one-liner (or --api, or api: in node.yaml)"
    )


def proxy(ctx: Context) -> Proxy | None:
    """The proxy of this run: the environment's https_proxy, else node.yaml's proxy (install.sh's proxy=)."""
    return proxy_from_env(fallback=ctx.settings.proxy)


def client(ctx: Context, *, attempts: int = 5) -> ApiClient:
    return ApiClient(
        api_url(ctx),
        ca_file=ctx.ca_file,
        pinned_ca=identity_path(ctx.host) / "ca.crt",
        attempts=attempts,
        proxy=proxy(ctx),
    )


def enrolled(ctx: Context) -> bool:
    """A complete identity is in place (a damaged one counts as not enrolled: enrollment repairs it)."""
    try:
        return load_identity(ctx.host) is not None
    except IdentityError:
        return False


def token_of(ctx: Context, facts: Facts) -> ProvisioningToken:
    """The token as the earlier stages left it, else read now (once per run)."""
    if facts.token is not None:
        return facts.token
    return ctx.tokens.read(enrolled=enrolled(ctx))


def introspect(ctx: Context, token: ProvisioningToken) -> ProvisioningToken:
    """The token with its state (valid / used / expired / unknown) and expiry, asked without
    consuming it; asked once per run."""
    if token.state is not None or token.secret is None:
        return token
    from bootstrap.enroll import introspect_token

    api = client(ctx, attempts=3)
    try:
        info = introspect_token(api, token.secret)
    finally:
        api.close()
    state = "valid" if info.valid else (info.reason or "unknown")
    return token.introspected(state, info.expires_at if info.valid else None)


def keep_expiry(ctx: Context, token: ProvisioningToken) -> None:
    """Record a valid token's expiry in the run state, kept also when the stage then stops (the
    runner persists the state after every stage): the reboot message of the run after a reboot
    names it."""
    if token.state == "valid" and token.expires_at is not None:
        stamp = token.expires_at.isoformat(timespec="seconds")
        if ctx.state.token_expires_at != stamp:
            ctx.state.token_expires_at = stamp


def expiry(ctx: Context, facts: Facts) -> datetime | None:
    tok = facts.token
    if tok is not None and tok.expires_at is not None:
        return tok.expires_at
    return ctx.token_expires_at
