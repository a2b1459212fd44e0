"""Stage `preflight`: can this box become a node, and can it reach the control plane?

Root, the OS, CPU virtualization, memory and disk (the doctor's own check functions, so the
installer and the doctor never disagree), outbound HTTPS to the API, and the provisioning token's
validity and expiry, asked without consuming it. A box that is already enrolled may run without a
token: it keeps its identity and the enroll stage is skipped.
"""

from __future__ import annotations

import os
from dataclasses import replace

from bootstrap import platform
from bootstrap.api import ApiError
from bootstrap.enroll import token_refused, token_state_words
from bootstrap.errors import VectorlayError
from bootstrap.host import Host
from bootstrap.provisioning import PENDING_KEY, describe_expiry
from bootstrap.stages.contract import Context, Facts, Outcome, StagePlan, StageResult
from bootstrap.stages.control_plane import api_url, client, enrolled, introspect, keep_expiry, token_of


def check_os(host: Host) -> platform.OsSupport:
    """A supported release, or another Debian/Ubuntu with what the node needs; else refused."""
    support = platform.os_support(host)
    if support.refused:
        raise VectorlayError(*support.error())
    return support


def reach_api(ctx: Context) -> None:
    """Outbound HTTPS to the control plane, with TLS verified: any answer of the API itself will do."""
    api = client(ctx, attempts=3)
    try:
        api.request("GET", "/v1/artifacts/manifest")
    except ApiError as e:
        # A 4xx is the API answering (e.g. no artifacts published yet): reachable. A 2xx that is not
        # JSON (an HTML page) or no answer at all is not.
        if e.status is None or not 400 <= e.status < 500:
            raise
    finally:
        api.close()


def plan(ctx: Context, facts: Facts) -> StagePlan[None]:
    """Every check runs here: preflight only reads the host and asks the control plane."""
    from doctor.model import Status

    host = ctx.host
    if host.is_live and os.geteuid() != 0:
        raise VectorlayError("the installer must run as root", "re-run it with sudo")
    support = check_os(host)
    ctx.out(f"preflight: {support.found}")
    if not support.supported:
        ctx.out(f"  WARN: {support.warning()}")
        ctx.summary.left.append(support.warning())

    doctor = ctx.need_doctor()
    report = doctor.run_checks(host, ctx.settings, only=doctor.preflight_checks)
    for r in report.results:
        ctx.out(f"  {r.name}: {r.message} [{r.status.value}]")
        if r.status is Status.WARN:
            ctx.summary.left.append(f"{r.name}: {r.message} ({r.hint})")
    failed = [r for r in report.results if r.status is Status.FAIL]
    for r in [r for r in failed if r.name in ctx.ignored_checks]:
        ctx.out(f"  {r.name}: FAIL ignored on request (--ignore-preflight-errors)")
        ctx.summary.left.append(f"{r.name}: {r.message} (failed; ignored on request)")
    failed = [r for r in failed if r.name not in ctx.ignored_checks]
    if failed:
        raise VectorlayError(
            "this box cannot be a node yet: " + "; ".join(f"{r.name}: {r.message}" for r in failed),
            failed[0].hint,
        )

    api = api_url(ctx)
    token = token_of(ctx, facts)
    if not token.given:
        reach_api(ctx)
        # A real run reads a token (or stops) unless the node is enrolled: only a plan gets here.
        if not enrolled(ctx):
            msg = "no provisioning token given (a real run needs one)"
        else:
            msg = "already enrolled and no token given: the node keeps its identity"
        ctx.out(f"  control plane {api} reachable; {msg}")
        return StagePlan(replace(facts, token=token), StageResult(Outcome.OK, msg))

    token = introspect(ctx, token)
    state = token.state
    if state == "not_a_provider":
        # Before the gpu stage rewrites GRUB and asks for a reboot: no token of this org will
        # enroll until the org is approved.
        raise token_refused(api, state)
    if state == "valid":
        msg = f"provisioning token {describe_expiry(token.expires_at or ctx.token_expires_at)}"
    elif state == "used" and host.exists(PENDING_KEY):
        msg = "provisioning token already used by this node's interrupted enrollment: retrying it"
    elif enrolled(ctx):
        msg = f"the provisioning token is {token_state_words(state)}; the node keeps its identity"
    else:
        raise token_refused(api, state)
    ctx.out(f"  control plane {api} reachable; {msg}")
    return StagePlan(replace(facts, token=token), StageResult(Outcome.OK, msg))


def apply(ctx: Context, sp: StagePlan[None]) -> tuple[StageResult, Facts]:
    if sp.facts.token is not None:
        keep_expiry(ctx, sp.facts.token)
    return sp.planned, sp.facts
