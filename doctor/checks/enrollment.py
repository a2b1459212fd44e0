"""The enrolled node: its identity, its overlay network and what the control plane last answered."""

from __future__ import annotations

import os

from bootstrap.errors import redact
from bootstrap.host import Host
from bootstrap.paths import IDENTITY_DIR, IDENTITY_LEGACY
from doctor.checks.registry import REINSTALL, Context, check
from doctor.model import CheckResult, Status


@check("identity", "Identity")
def check_identity(ctx: Context, name: str) -> CheckResult:
    from doctor.identity import check_identity as identity_check

    return identity_check(ctx.host)._replace(name=name)


@check("overlay", "Overlay")
def check_overlay(ctx: Context, name: str) -> CheckResult:
    # load_identity's own test for a node never enrolled, made before importing bootstrap.identity:
    # its classes cost such a node more start-up time than this check's whole answer.
    ident_dir = ctx.host.path(IDENTITY_DIR, follow=False)
    if (
        not ident_dir.exists()
        and not ident_dir.is_symlink()
        and not (ident_dir.parent / IDENTITY_LEGACY).is_dir()
    ):
        return CheckResult(name, Status.SKIP, "not enrolled (no overlay IP yet)")

    from bootstrap.identity import IdentityError, load_identity

    try:
        ident = load_identity(ctx.host)
    except IdentityError:
        return CheckResult(name, Status.SKIP, "no usable identity (see the identity check)")
    if ident is None:
        return CheckResult(name, Status.SKIP, "not enrolled (no overlay IP yet)")

    # Only an enrolled node has an overlay to probe: a node being set up does not pay for it.
    from bootstrap.overlay import (
        NEBULA_CONFIG,
        PING_TIMEOUT_S,
        TUN_DEVICE,
        OverlayProbeError,
        interface,
        ping_ms,
    )

    nebula_hint = "systemctl status nebula; journalctl -u nebula -n 50"
    try:
        dev = interface(ctx.host)
    except OverlayProbeError as e:
        return CheckResult(name, Status.FAIL, f"cannot read {TUN_DEVICE}: {e}", "install iproute2 (`ip`)")
    if dev is None:
        return CheckResult(
            name, Status.FAIL, f"{TUN_DEVICE} does not exist: nebula is not running", nebula_hint
        )
    if not dev.up:
        return CheckResult(
            name, Status.FAIL, f"{TUN_DEVICE} is down", f"sudo systemctl restart nebula; {nebula_hint}"
        )
    if not dev.holds(ident.overlay_ip):
        held = ", ".join(str(a.ip) for a in dev.addresses) or "no address"
        return CheckResult(
            name,
            Status.FAIL,
            f"{TUN_DEVICE} holds {held}, not the node's overlay IP {ident.overlay_ip}",
            f"{nebula_hint}; {REINSTALL} to get a certificate for {ident.overlay_ip}",
        )
    lighthouses = _nebula_lighthouses(ctx.host, NEBULA_CONFIG)
    if not lighthouses:
        return CheckResult(
            name,
            Status.WARN,
            f"{TUN_DEVICE} holds {ident.overlay_ip}, but nebula knows no lighthouse",
            REINSTALL,
        )
    # At most two lighthouses are asked, so a cut-off node costs the doctor a bounded few seconds.
    for ip, _ in lighthouses[:2]:
        rtt = ping_ms(ctx.host, ip, dev=TUN_DEVICE, timeout_s=PING_TIMEOUT_S)
        if rtt is not None:
            shown = f"{rtt:.0f}" if rtt >= 10 else f"{rtt:.1f}"
            return CheckResult(
                name,
                Status.PASS,
                f"overlay up: {TUN_DEVICE} holds {ident.overlay_ip}, lighthouse {ip} answered in {shown} ms",
            )
    ip, endpoints = lighthouses[0]
    where = ", ".join(endpoints) or "its endpoint"
    return CheckResult(
        name,
        Status.WARN,
        f"{TUN_DEVICE} holds {ident.overlay_ip}, "
        f"but lighthouse {ip} did not answer within {PING_TIMEOUT_S} s",
        f"outbound UDP to {where} must be open (nebula's port, 4242 by default); {nebula_hint}",
    )


def _nebula_lighthouses(host: Host, config: str) -> list[tuple[str, list[str]]]:
    """(overlay IP, underlay endpoints) of each lighthouse in nebula's config, in its order."""
    import yaml

    try:
        data = yaml.safe_load(host.read_text(config))
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(data, dict):
        return []
    hosts = (data.get("lighthouse") or {}).get("hosts") or []
    static = data.get("static_host_map") or {}
    return [(str(h), [str(e) for e in static.get(h) or []]) for h in hosts]


@check("control_plane", "Control plane")
def check_control_plane(ctx: Context, name: str) -> CheckResult:
    """What the control plane answered the node-agent's last heartbeat (its status.json)."""

    ident = ctx.host.path(IDENTITY_DIR)
    if not (ident.exists() or ident.is_symlink()):
        return CheckResult(name, Status.SKIP, "not enrolled: nothing to report to the control plane")

    import time

    from bootstrap.agent_status import STATUS_PATH, parse_iso, read_status

    logs = "journalctl -u node-agent -n 50 says why; sudo systemctl restart node-agent"
    status = read_status(ctx.host)
    if status is None and os.path.lexists(ctx.host.path(STATUS_PATH, follow=False)):
        return CheckResult(
            name,
            Status.WARN,
            f"{STATUS_PATH} is not a status the node-agent wrote "
            "(not a regular file, not JSON, or too large)",
            f"sudo rm -rf {STATUS_PATH} && sudo systemctl restart node-agent (it writes a new one)",
        )
    if status is None:
        return CheckResult(name, Status.WARN, f"no heartbeat yet (no {STATUS_PATH})", logs)
    # A status written by an agent before redaction, or by hand, may still hold a secret.
    error = redact(status["last_error"]) if isinstance(status.get("last_error"), str) else None
    if status.get("status") == "removed":
        return CheckResult(
            name,
            Status.FAIL,
            "the control plane removed this node: none of its GPU units are advertised",
            "re-run the install one-liner with a new token to bring it back",
        )
    try:
        at = parse_iso(str(status["heartbeat_at"]))
        interval = int(status.get("interval_s") or 240)
        advertised = int(status["advertised_units"])
    except (KeyError, TypeError, ValueError):
        why = f": {error}" if isinstance(error, str) and error else ""
        return CheckResult(name, Status.WARN, f"no heartbeat delivered yet{why}", logs)
    age = max(0, int(time.time() - at))
    if age > 3 * interval:
        why = f"; last attempt: {error}" if isinstance(error, str) and error else ""
        return CheckResult(
            name,
            Status.WARN,
            f"last heartbeat {age} s ago, more than 3 intervals ({3 * interval} s): nothing advertised{why}",
            logs,
        )
    message = f"{advertised} GPU unit(s) advertised (heartbeat {age} s ago)"
    reason = status.get("reason")
    if isinstance(reason, str) and reason:
        message += f": {redact(reason)}"
    return CheckResult(name, Status.PASS, message)
