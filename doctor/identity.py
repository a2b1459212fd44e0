"""The node's durable identity under /etc/vectorlay/identity/ (docs/contracts.md#identity-directory).

`cryptography` is imported only here and only when the node is enrolled: it costs more start-up time
than the rest of the doctor together.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TYPE_CHECKING

from bootstrap.host import Host
from bootstrap.paths import IDENTITY_DIR
from doctor.model import CheckResult, Status

if TYPE_CHECKING:
    from bootstrap.renewal import Credential

REENROLL = "re-run the install one-liner to re-enroll (the node keeps its ID and overlay IP)"
RENEW_NOW = (
    "the node-agent renews them (sudo systemctl status node-agent); "
    "renew now: sudo vectorlay-node-agent --once --renew"
)


def _expected_owner(host: Host) -> int:
    return host.root_uid


# Secrets must be 0600 and root's; the rest must be present. node.json and the directory's own mode
# are judged by bootstrap.identity.load_identity, the same reader the installer uses.
Part = Callable[[Host, dt.datetime], "CheckResult | None"]


def check_identity(host: Host, now: dt.datetime | None = None) -> CheckResult:
    """Each part returns a FAIL or WARN, or None when all is well; the first FAIL wins, then the
    first WARN, else the node certificate's PASS (further credentials add a part to PARTS)."""
    name = "identity"
    if not host.path(IDENTITY_DIR).is_dir():
        if host.path(IDENTITY_DIR, follow=False).is_symlink():
            return CheckResult(name, Status.FAIL, f"{IDENTITY_DIR} points at a missing directory", REENROLL)
        return CheckResult(name, Status.SKIP, "not enrolled (no /etc/vectorlay/identity/)")
    at = now or dt.datetime.now(dt.timezone.utc)
    warned: CheckResult | None = None
    for part in PARTS:
        try:
            result = part(host, at)
        except PermissionError:
            denied = f"cannot read {IDENTITY_DIR}: permission denied"
            return CheckResult(name, Status.FAIL, denied, "run the doctor with sudo")
        if result is None:
            continue
        if result.status is Status.FAIL:
            return result
        if result.status is Status.WARN and warned is None:
            warned = result
    return warned or _certificate_pass(host, at)


def _files(host: Host, now: dt.datetime) -> CheckResult | None:
    from bootstrap.identity import missing_files, secret_modes

    directory = host.path(IDENTITY_DIR)
    missing = [f"{IDENTITY_DIR}/{f}" for f in missing_files(directory)]
    if missing:
        return CheckResult(
            "identity", Status.FAIL, f"identity incomplete: {', '.join(missing)} missing", REENROLL
        )
    owner = _expected_owner(host)
    for f, mode, uid in secret_modes(directory):
        p = f"{IDENTITY_DIR}/{f}"
        if mode != 0o600 or uid != owner:
            return CheckResult(
                "identity",
                Status.FAIL,
                f"{p} is mode {mode:04o} owned by uid {uid}; it must be 0600 and owned by root",
                f"sudo chown root:root {p} && sudo chmod 600 {p}",
            )
    if not host.read_text(f"{IDENTITY_DIR}/node-token", default="").strip():
        return CheckResult("identity", Status.FAIL, f"{IDENTITY_DIR}/node-token is empty", REENROLL)
    return None


def _layout(host: Host, now: dt.datetime) -> CheckResult | None:
    """The directory's mode and node.json, judged as the installer judges them."""
    from bootstrap.identity import IdentityError, load_identity

    try:
        load_identity(host)
    except IdentityError as e:
        return CheckResult("identity", Status.FAIL, e.message, e.hint or REENROLL)
    return None


def _node_certificate(host: Host, now: dt.datetime) -> CheckResult | None:
    name = "identity"
    crt_p, key_p, ca_p = (f"{IDENTITY_DIR}/{f}" for f in ("node.crt", "node.key", "ca.crt"))
    crt_pem, key_pem, ca_pem = (host.path(p).read_bytes() for p in (crt_p, key_p, ca_p))

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from bootstrap import credentials

    try:
        cert = x509.load_pem_x509_certificate(crt_pem)
    except ValueError as e:
        return CheckResult(name, Status.FAIL, f"{crt_p} is not a PEM certificate: {e}", REENROLL)
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError as e:
        return CheckResult(name, Status.FAIL, f"{ca_p} is not a PEM certificate: {e}", REENROLL)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        return CheckResult(name, Status.FAIL, f"{key_p} is not an unencrypted PEM private key: {e}", REENROLL)

    if not credentials.same_key(key.public_key(), cert.public_key()):
        return CheckResult(name, Status.FAIL, f"{key_p} does not match {crt_p}", REENROLL)
    if credentials.issuer_in(cert, ca_pem) is None:
        return CheckResult(name, Status.FAIL, f"{crt_p} was not issued by the CA in {ca_p}", REENROLL)

    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < not_before:
        return CheckResult(
            name,
            Status.FAIL,
            f"node certificate is not valid before {not_before:%Y-%m-%d %H:%M} UTC",
            "the system clock is wrong: enable time sync (sudo timedatectl set-ntp true)",
        )
    if now >= not_after:
        return CheckResult(
            name, Status.FAIL, f"node certificate expired on {not_after:%Y-%m-%d %H:%M} UTC", REENROLL
        )
    return None


def _span(delta: dt.timedelta) -> str:
    """'19 days', '1 day', '5 hours': how far off a renewal is, or how long overdue."""
    if delta >= dt.timedelta(days=1):
        return f"{delta.days} day{'s' if delta.days != 1 else ''}"
    hours = max(0, int(delta.total_seconds() // 3600))
    return f"{hours} hour{'s' if hours != 1 else ''}"


def _schedule(host: Host) -> tuple[dt.datetime, list[Credential], tuple[str, ...]]:
    """When the node-agent renews the credentials (all together: the earliest two-thirds point),
    the credentials, and one line per credential saying until when it is valid."""
    from bootstrap.renewal import next_renewal, read_credentials

    creds = read_credentials(host.path(IDENTITY_DIR))
    due = next_renewal(creds)
    lines = tuple(
        f"{c.kind} certificate valid until {c.not_after:%Y-%m-%d %H:%M} UTC, renews {due:%Y-%m-%d}"
        for c in creds
    )
    return due, creds, lines


def _renewal(host: Host, now: dt.datetime) -> CheckResult | None:
    """WARN once the renewal time is past and the credentials are still the old ones: a node-agent
    that is stopped, or a control plane that keeps refusing, is found before anything expires."""
    from bootstrap.renewal import CredentialError

    try:
        due, creds, lines = _schedule(host)
    except CredentialError as e:
        return CheckResult("identity", Status.FAIL, str(e), REENROLL)
    if now < due:
        return None
    first = min(creds, key=lambda c: c.not_after)
    return CheckResult(
        "identity",
        Status.WARN,
        f"credential renewal overdue by {_span(now - due)}: the {first.kind} certificate expires in "
        f"{_span(first.not_after - now)}, on {first.not_after:%Y-%m-%d} UTC",
        RENEW_NOW,
        lines,
    )


def _certificate_pass(host: Host, now: dt.datetime) -> CheckResult:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(host.path(f"{IDENTITY_DIR}/node.crt").read_bytes())
    subject = cert.subject.rfc4514_string()
    due, _creds, lines = _schedule(host)
    return CheckResult(
        "identity",
        Status.PASS,
        f"node certificate valid until {cert.not_valid_after_utc:%Y-%m-%d} UTC, renews in {_span(due - now)}",
        None,
        (subject, *lines, *_issuers(host)),
    )


def _issuers(host: Host) -> tuple[str, ...]:
    """Which CA each certificate chains to, by name and fingerprint: during a CA rotation the node's
    trust files hold the old and the new CA, and this says which one its certificates come from."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from bootstrap import credentials, nebula

    d = host.path(IDENTITY_DIR)
    out = []
    for kind, crt, ca_file in (("node", "node.crt", "ca.crt"), ("nomad", "nomad.crt", "nomad-ca.crt")):
        try:
            cert = x509.load_pem_x509_certificate((d / crt).read_bytes())
            ca = credentials.issuer_in(cert, (d / ca_file).read_bytes())
        except (OSError, ValueError):
            ca = None
        if ca is not None:
            fp = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()
            out.append(f"{kind} certificate issued by {ca.subject.rfc4514_string()} (sha256 {fp[:16]})")
    try:
        neb = nebula.parse_certificate_pem((d / "nebula.crt").read_bytes())
        neb_ca = credentials.nebula_issuer(neb, (d / "nebula-ca.crt").read_bytes())
        out.append(f"nebula certificate issued by {neb_ca.name} (fingerprint {neb_ca.fingerprint[:16]})")
    except (OSError, ValueError):
        pass
    return tuple(out)


def _enrolled_names(host: Host) -> tuple[str | None, str | None, str | None]:
    """node.json's overlay IP, the Nomad region and the overlay network the enrollment named."""
    import json

    def read(file: str) -> dict[str, object]:
        try:
            data = json.loads(host.path(f"{IDENTITY_DIR}/{file}").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    ip = read("node.json").get("overlay_ip")
    nomad = read("enrollment.json").get("nomad")
    region = nomad.get("region") if isinstance(nomad, dict) else None
    neb = read("enrollment.json").get("nebula")
    cidr = neb.get("overlay_cidr") if isinstance(neb, dict) else None
    return (
        (ip if isinstance(ip, str) else None),
        (region if isinstance(region, str) else None),
        (cidr if isinstance(cidr, str) else None),
    )


def check_overlay_identity(
    host: Host, overlay_ip: str, region: str | None, now: dt.datetime, overlay: str | None = None
) -> CheckResult | None:
    """What is wrong with the nebula and Nomad credentials, or None when both are usable.

    nebula takes the node's overlay address from its certificate, so a certificate for another IP
    (or signed by another CA) puts the node somewhere else on the overlay or off it; Nomad servers
    refuse a client certificate that does not name `client.<region>.nomad`.
    """
    from bootstrap import credentials, nebula

    name = "identity"
    paths = {f: f"{IDENTITY_DIR}/{f}" for f in ("nebula.crt", "nebula-ca.crt", "nomad.crt", "nomad-ca.crt")}
    missing = [p for p in paths.values() if not host.path(p).is_file()]
    if missing:
        return CheckResult(name, Status.FAIL, f"identity incomplete: {', '.join(missing)} missing", REENROLL)
    try:
        cert = credentials.verified_nebula(
            host.path(paths["nebula.crt"]).read_bytes(), host.path(paths["nebula-ca.crt"]).read_bytes(), now
        )
    except nebula.NebulaCertError as e:
        return CheckResult(name, Status.FAIL, f"{paths['nebula.crt']}: {e}", REENROLL)
    except OSError as e:
        return CheckResult(name, Status.FAIL, f"cannot read the nebula certificate: {e.strerror}", REENROLL)
    ips = credentials.overlay_ips(cert)
    if ips != [overlay_ip]:
        return CheckResult(
            name,
            Status.FAIL,
            f"{paths['nebula.crt']} is for {', '.join(ips) or 'no IP'}, but node.json says {overlay_ip}",
            REENROLL,
        )
    # nebula routes the certificate's whole network into its tun: a /0 or loopback would take the
    # host's own traffic, an address outside the enrolled overlay is unreachable by its hosts.
    from bootstrap.answers import AnswerError, overlay_network

    network = cert.ips[0].network
    try:
        overlay_network(str(network), f"the network of {paths['nebula.crt']}")
        if overlay is not None and str(network) != overlay:
            raise AnswerError(
                f"{paths['nebula.crt']} is for the network {network}, not the overlay {overlay}"
            )
    except AnswerError as e:
        return CheckResult(name, Status.FAIL, str(e), REENROLL)

    try:
        nomad = credentials.chained(
            host.path(paths["nomad.crt"]).read_bytes(), host.path(paths["nomad-ca.crt"]).read_bytes()
        )
    except OSError:
        nomad = None
    if nomad is None:
        return CheckResult(
            name,
            Status.FAIL,
            f"{paths['nomad.crt']} is not a certificate issued by {paths['nomad-ca.crt']}",
            REENROLL,
        )
    dns, addrs = credentials.alt_names(nomad)
    wanted = f"client.{region}.nomad" if region else None
    if wanted and wanted not in dns:
        return CheckResult(
            name,
            Status.FAIL,
            f"{paths['nomad.crt']} does not name {wanted}: Nomad servers refuse it",
            REENROLL,
        )
    if not {"127.0.0.1", overlay_ip} <= addrs:
        return CheckResult(
            name,
            Status.FAIL,
            f"{paths['nomad.crt']} does not name 127.0.0.1 and {overlay_ip}: "
            "Nomad's HTTP API cannot serve it",
            REENROLL,
        )
    return None


def _overlay(host: Host, now: dt.datetime) -> CheckResult | None:
    overlay_ip, region, overlay = _enrolled_names(host)
    if overlay_ip is None:
        return CheckResult("identity", Status.FAIL, f"{IDENTITY_DIR}/node.json names no overlay IP", REENROLL)
    return check_overlay_identity(host, overlay_ip, region, now, overlay)


PARTS: tuple[Part, ...] = (_files, _layout, _node_certificate, _overlay, _renewal)
