"""Stage `enroll`: the provisioning token exchanged for the node's durable identity.

First enrollment, or re-enrollment of a node that has an identity (same node ID and overlay IP, a
rotated node token). Skipped, with a note, on an enrolled node run without a usable token. The node
is never enrolled while its GPUs cannot be passed through (the same gate as `vectorlay-bootstrap
enroll`).

Crash safety: the key pair is saved (0600) before the request and removed after the identity switch.
A run killed after the control plane consumed the token but before the identity was written retries
with the same key, which the control plane recognises as a retry of the same enrollment; a fresh key
would be refused ("token already used") and the enrollment lost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bootstrap.api import ApiError
from bootstrap.errors import VectorlayError
from bootstrap.fsutil import atomic_write, fault_point, fsync_dir
from bootstrap.identity import load_identity
from bootstrap.plan import Enroll, compute
from bootstrap.provisioning import PENDING_KEY
from bootstrap.stages.contract import Context, Facts, Outcome, StagePlan, StageResult
from bootstrap.stages.control_plane import api_url, client, enrolled, introspect, keep_expiry, token_of


def _pending_key(ctx: Context) -> ec.EllipticCurvePrivateKey:
    path = ctx.host.path(PENDING_KEY)
    with contextlib.suppress(OSError, ValueError, TypeError):
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(path, pem, mode=0o600)
    return key


def _drop_pending(ctx: Context) -> None:
    path = ctx.host.path(PENDING_KEY)
    if path.exists():
        fault_point(f"remove {path}")
        path.unlink()
        fsync_dir(path.parent)


@dataclass(frozen=True)
class _Kept:
    """The node keeps its identity: apply drops a pending key and says why."""

    why: str


@dataclass(frozen=True)
class _Exchange:
    """The token is exchanged: apply enrolls with this GPU mode and hardware report."""

    gpu_mode: str
    hardware: Mapping[str, object]
    retry: bool
    reenroll: bool


# What apply carries out: keep the identity, or exchange the token (None: the plan is blocked).
Carry = _Kept | _Exchange


def _kept(ctx: Context, facts: Facts, why: str) -> StagePlan[Carry]:
    ident = load_identity(ctx.host)
    assert ident is not None
    api = ctx.api or ident.api or "the control plane"
    msg = f"node {ident.node_id} (overlay IP {ident.overlay_ip}) keeps its identity: {why}"
    changes = compute(ctx.host, [Enroll(api, ctx.settings.gpu_mode or "-", needed=False)])
    kept = StageResult(Outcome.SKIPPED, msg)
    return StagePlan(replace(facts, identity=ident), kept, changes, carry=_Kept(msg))


def plan(ctx: Context, facts: Facts) -> StagePlan[Carry]:
    from bootstrap.enroll import token_refused, token_state_words
    from bootstrap.hardware import hardware_report

    host = ctx.host
    token = token_of(ctx, facts)
    facts = replace(facts, token=token)
    was_enrolled = enrolled(ctx)
    if not token.given:
        if was_enrolled:
            return _kept(ctx, facts, "no provisioning token given")
        # A real run reads a token or stops: only a plan run gets here.
        api = ctx.api or "the control plane"
        ctx.out("enroll: would enroll this node (a real run needs a provisioning token)")
        mode = ctx.settings.gpu_mode or "-"
        wanted = Enroll(api, mode, reason="first enrollment; needs a provisioning token")
        changes = compute(host, [wanted])
        return StagePlan(
            replace(facts, would_enroll=True),
            StageResult(Outcome.PLANNED, "needs a provisioning token"),
            changes,
            blocked=VectorlayError("no provisioning token given"),
        )
    token = introspect(ctx, token)
    facts = replace(facts, token=token)
    state = token.state
    retry = state == "used" and host.exists(PENDING_KEY)
    if state != "valid" and not retry:
        if was_enrolled:
            # A token that is used or expired cannot re-enroll; the working identity stays.
            return _kept(ctx, facts, f"the provisioning token is {token_state_words(state)}")
        raise token_refused(ctx.api, state)
    verb = "re-enroll" if was_enrolled else "enroll"
    kind = "re-enrollment" if was_enrolled else "first enrollment"
    current = load_identity(host) if was_enrolled else None
    facts = replace(facts, identity=current, would_enroll=True)
    api = api_url(ctx)
    # The passthrough gate: refuses while no GPU unit is ready.
    try:
        gpu_mode, hardware = hardware_report(host, ctx.settings.gpu_mode)
    except VectorlayError as e:
        # No output of its own: a real run stops with the error, a plan shows it as the note.
        mode = ctx.settings.gpu_mode or "passthrough"
        held = Enroll(api, mode, was_enrolled, reason=f"{kind}, once passthrough works: {e.message}")
        changes = compute(host, [held])
        planned = StageResult(Outcome.PLANNED, f"would {verb} after the reboot the gpu stage asks for")
        return StagePlan(facts, planned, changes, blocked=e)
    changes = compute(host, [Enroll(api, gpu_mode, was_enrolled, reason=kind)])
    carry = _Exchange(gpu_mode, hardware, retry, was_enrolled)
    return StagePlan(facts, StageResult(Outcome.PLANNED, f"would {verb}"), changes, carry=carry)


def apply(ctx: Context, sp: StagePlan[Carry]) -> tuple[StageResult, Facts]:
    from bootstrap.enroll import enroll
    from bootstrap.enrolled import gpus_of_report, write_enrolled

    host, facts = ctx.host, sp.facts
    if facts.token is not None:
        keep_expiry(ctx, facts.token)
    if sp.blocked is not None:
        raise sp.blocked
    if isinstance(sp.carry, _Kept):
        _drop_pending(ctx)
        ctx.out(f"enroll: skipped; {sp.carry.why}")
        return sp.planned, facts
    ex = sp.carry
    assert ex is not None and facts.token is not None and facts.token.secret is not None
    key = _pending_key(ctx)
    api = client(ctx)
    try:
        result = enroll(
            host,
            api,
            facts.token.secret,
            gpu_mode=ex.gpu_mode,
            hardware=dict(ex.hardware),
            key=key,
        )
    except ApiError as e:
        if ex.retry and ex.reenroll and e.status == 401:
            _drop_pending(ctx)
            ident = load_identity(host)
            assert ident is not None
            why = "the interrupted re-enrollment's token can no longer be used"
            msg = f"node {ident.node_id} (overlay IP {ident.overlay_ip}) keeps its identity: {why}"
            ctx.out(f"enroll: skipped; {msg}")
            return StageResult(Outcome.SKIPPED, msg), replace(facts, identity=ident, would_enroll=False)
        raise
    finally:
        api.close()
    # What the doctor later holds the bus against (a GPU gone since is `gpu_missing`).
    write_enrolled(host, ex.gpu_mode, gpus_of_report(ex.hardware))
    _drop_pending(ctx)
    done = "re-enrolled" if result.reenrolled else "enrolled"
    msg = f"{done} node {result.node_id} (org {result.org_id}, overlay IP {result.overlay_ip})"
    ctx.out(f"enroll: {msg}")
    # Spent: nothing later in the run may present it again.
    after = replace(facts, token=facts.token.spent(), identity=load_identity(host), would_enroll=False)
    return StageResult(Outcome.OK, msg), after
