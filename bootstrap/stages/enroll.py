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

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bootstrap.api import ApiError
from bootstrap.errors import VectorlayError
from bootstrap.fsutil import atomic_write, fault_point, fsync_dir
from bootstrap.identity import load_identity
from bootstrap.stages import Context, Outcome, StageResult
from bootstrap.stages._token import PENDING_KEY, client, enrolled, introspect, obtain_token


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


def _kept(ctx: Context, why: str) -> StageResult:
    _drop_pending(ctx)
    ident = load_identity(ctx.host)
    assert ident is not None
    msg = f"node {ident.node_id} (overlay IP {ident.overlay_ip}) keeps its identity: {why}"
    ctx.out(f"enroll: skipped; {msg}")
    return StageResult(Outcome.SKIPPED, msg)


def run(ctx: Context) -> StageResult:
    from bootstrap.enroll import enroll, token_refused, token_state_words
    from bootstrap.hardware import hardware_report

    host = ctx.host
    token = obtain_token(ctx)
    was_enrolled = enrolled(ctx)
    if token is None:
        if was_enrolled:
            return _kept(ctx, "no provisioning token given")
        ctx.out("enroll: would enroll this node (a real run needs a provisioning token)")
        return StageResult(Outcome.PLANNED, "needs a provisioning token")
    state = introspect(ctx, token)
    retry = state == "used" and host.exists(PENDING_KEY)
    if state != "valid" and not retry:
        if was_enrolled:
            # A token that is used or expired cannot re-enroll; the working identity stays.
            return _kept(ctx, f"the provisioning token is {token_state_words(state)}")
        raise token_refused(ctx.api, state)
    verb = "re-enroll" if was_enrolled else "enroll"
    # The passthrough gate: refuses while no GPU unit is ready.
    try:
        gpu_mode, hardware = hardware_report(host, ctx.gpu_mode or ctx.settings.gpu_mode)
    except VectorlayError as e:
        if not ctx.plan_only:
            raise
        ctx.out(f"enroll: would {verb} once passthrough works ({e.message})")
        return StageResult(Outcome.PLANNED, f"would {verb} after the reboot the gpu stage asks for")
    if ctx.plan_only:
        ctx.out(f"enroll: would {verb} this node ({gpu_mode}) with {ctx.api}")
        return StageResult(Outcome.PLANNED, f"would {verb}")

    key = _pending_key(ctx)
    api = client(ctx)
    try:
        result = enroll(
            host,
            api,
            token,
            gpu_mode=gpu_mode,
            hardware=hardware,
            key=key,
        )
    except ApiError as e:
        if retry and was_enrolled and e.status == 401:
            return _kept(ctx, "the interrupted re-enrollment's token can no longer be used")
        raise
    finally:
        api.close()
    _drop_pending(ctx)
    # Spent: nothing later in the run may present it again.
    ctx.token, ctx.token_state = None, "used"
    done = "re-enrolled" if result.reenrolled else "enrolled"
    msg = f"{done} node {result.node_id} (org {result.org_id}, overlay IP {result.overlay_ip})"
    ctx.out(f"enroll: {msg}")
    return StageResult(Outcome.OK, msg)
