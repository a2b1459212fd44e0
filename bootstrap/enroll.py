"""Enrollment: a one-time provisioning token exchanged for the node's durable mTLS identity.

Three key pairs are generated here and only their public halves leave the box: the node's X.509 key
(as a CSR), its nebula X25519 key (the control plane signs it into a nebula certificate for the
node's overlay IP) and its Nomad TLS key (a CSR; the certificate names `client.<region>.nomad`).
A node that already has an identity presents it (client certificate over mTLS, node token as
bearer), so the control plane keeps its node ID and overlay IP, rotates its token and consumes no quota.
The provisioning token is held in memory only: never logged, never written, never in argv.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bootstrap import answers, credentials, nebula
from bootstrap.api import ApiClient, ApiError, ClientCert, not_a_provider
from bootstrap.errors import VectorlayError
from bootstrap.host import Host
from bootstrap.identity import (
    Identity,
    IdentityError,
    NewIdentity,
    OverlayFiles,
    enroll_point,
    identity_path,
    load_identity,
    read_node_token,
    write_identity,
)
from bootstrap.manifest import public_key_from_text
from bootstrap.paths import IDENTITY_DIR

log = logging.getLogger(__name__)

TOKEN_ENV = "VECTORLAY_TOKEN"
TOKEN_RE = re.compile(r"vtk_[A-Za-z0-9_-]{16,256}")
# Fault points before the identity writer's own (identity.WRITE_POINTS), also named `enroll <point>`.
ENROLL_POINTS = ("before-request", "response-received")


@dataclass(frozen=True)
class TokenInfo:
    valid: bool
    expires_at: datetime | None
    reason: str | None = None  # "used", "expired", "unknown", "not_a_provider" when not valid


@dataclass(frozen=True)
class EnrollResult:
    node_id: str
    org_id: str
    overlay_ip: str
    reenrolled: bool
    identity: Identity


def read_token(
    token_file: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    stdin: TextIO | None = None,
) -> str:
    """The provisioning token from --token-file, else VECTORLAY_TOKEN, else standard input."""
    env = os.environ if env is None else env
    stdin = sys.stdin if stdin is None else stdin
    if token_file is not None and str(token_file) != "-":
        try:
            raw = token_file.read_text()
        except OSError as e:
            raise VectorlayError(
                f"cannot read the token file {token_file}: {e.strerror}",
                "check the path given to --token-file",
            ) from None
        source = str(token_file)
    elif token_file is None and env.get(TOKEN_ENV, "").strip():
        raw, source = env[TOKEN_ENV], TOKEN_ENV
    elif stdin.isatty():
        prompt = "Provisioning token (vtk_..., from the dashboard; it is not shown as you type): "
        raw, source = getpass.getpass(prompt), "the terminal"
    else:
        raw, source = stdin.readline(), "standard input"
    token = raw.strip()
    if not token:
        raise VectorlayError(
            "no provisioning token given",
            f"set {TOKEN_ENV}, pass --token-file FILE, or pipe the token on standard input",
        )
    if not TOKEN_RE.fullmatch(token):
        # The value itself is never echoed: a mangled token is still mostly a secret.
        raise VectorlayError(
            f"the provisioning token from {source} is not a vectorlay token (expected vtk_ and 16+ letters)",
            "copy the whole token from the dashboard (Providers -> Add node)",
        )
    return token


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def token_state_words(reason: str | None) -> str:
    """How an unusable token is described: 'already used', 'expired' or 'not known'."""
    words = {
        "used": "already used",
        "expired": "expired",
        "not_a_provider": "of an org that isn't an approved provider",
    }
    return words.get(reason or "", "not known")


def token_refused(api_url: str | None, reason: str | None) -> VectorlayError:
    """The documentation's 401 (or 403 NOT_A_PROVIDER) for a token introspection says the control
    plane would refuse."""
    if reason == "not_a_provider":
        return not_a_provider(api_url)
    why = token_state_words(reason)
    return VectorlayError(
        f"{api_url}: 401 bad, missing or expired token (the provisioning token is {why})",
        "ask for a new one in the dashboard",
    )


def introspect_token(api: ApiClient, token: str) -> TokenInfo:
    """Ask whether the token would be accepted, and until when, without consuming it."""
    body = api.request("POST", "/v1/provisioning-tokens/introspect", json={"token": token})
    try:
        valid, expires_at, reason = answers.introspection(body)
    except answers.AnswerError as e:
        raise VectorlayError(
            f"{api.base_url}: unexpected introspection answer: {e}", "is --api the control plane?"
        ) from None
    return TokenInfo(valid, _parse_time(expires_at), reason)


def _stored_credentials(host: Host) -> tuple[Identity | None, ClientCert | None, str | None]:
    """What this node can prove about itself: the complete identity, or what survives of it."""
    try:
        current = load_identity(host)
    except IdentityError as e:
        log.warning("the existing identity is damaged (%s); presenting what is left of it", e.message)
        path = identity_path(host)
        cert = ClientCert(path / "node.crt", path / "node.key")
        token = None
        with contextlib.suppress(IdentityError):
            token = read_node_token(path)
        usable = cert.cert_file.is_file() and cert.key_file.is_file()
        return None, cert if usable else None, token
    if current is None:
        return None, None, None
    return current, ClientCert(current.cert_file, current.key_file), current.node_token()


def _credentials_for(host: Host, api: ApiClient) -> tuple[Identity | None, ClientCert | None, str | None]:
    current, cert, token = _stored_credentials(host)
    if current is not None and current.api and current.api.rstrip("/") != api.base_url:
        # Credentials of another control plane would only fail its TLS handshake here.
        log.warning(
            "the existing identity belongs to %s, not %s: enrolling as a new node", current.api, api.base_url
        )
        return None, None, None
    return current, cert, token


def _make_csr(
    hostname: str, key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "node")]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class _OverlayKeys:
    nebula_private_pem: bytes
    nebula_public_pem: bytes
    nomad_key: ec.EllipticCurvePrivateKey
    nomad_csr_pem: str

    @classmethod
    def generate(cls) -> _OverlayKeys:
        private, public = nebula.generate_keypair()
        # The control plane sets the Nomad names; the CSR only carries the key.
        nomad_key, nomad_csr = _make_csr("nomad-client")
        return cls(private, public, nomad_key, nomad_csr)


def _unusable(url: str, why: str) -> VectorlayError:
    return VectorlayError(f"{url} returned an unusable enrollment: {why}", "re-run; report if it persists")


def _check_overlay(body: dict[str, Any], keys: _OverlayKeys, url: str, now: datetime) -> OverlayFiles:
    """The nebula and Nomad certificates must be for this node's keys, its overlay IP, and chain to
    the CAs that came with them: nebula takes the node's overlay IP from its certificate, and a Nomad
    certificate without the client name is refused by every server that checks names."""
    neb, nomad = body.get("nebula"), body.get("nomad")
    if (
        not isinstance(neb, dict)
        or not isinstance(neb.get("certificate"), str)
        or not isinstance(neb.get("ca"), str)
    ):
        raise _unusable(url, "no nebula certificate")
    try:
        cert = credentials.verified_nebula(neb["certificate"], neb["ca"], now)
    except nebula.NebulaCertError as e:
        raise _unusable(url, f"nebula certificate: {e}") from None
    if cert.public_key != nebula.parse_public_key_pem(keys.nebula_public_pem):
        raise _unusable(url, "the nebula certificate is not for this node's key")
    if credentials.overlay_ips(cert) != [body["overlay_ip"]]:
        shown = ", ".join(str(i) for i in cert.ips[:4]) or "no IP"
        raise _unusable(url, f"the nebula certificate is for {shown}, not {body['overlay_ip']}")
    # nebula routes the certificate's network into its tun: it must be the overlay, never a /0.
    network = cert.ips[0].network
    try:
        answers.overlay_network(str(network), "the nebula certificate's network")
    except answers.AnswerError as e:
        raise _unusable(url, str(e)) from None
    if neb.get("overlay_cidr") is not None and str(network) != neb["overlay_cidr"]:
        raise _unusable(
            url, f"the nebula certificate's network {network} is not the overlay {neb['overlay_cidr']}"
        )
    if not isinstance(nomad, dict) or not isinstance(nomad.get("region"), str):
        raise _unusable(url, "no Nomad settings")
    nomad_cert = credentials.chained(
        str(nomad.get("certificate_pem")).encode(), str(nomad.get("ca_pem")).encode()
    )
    if nomad_cert is None:
        raise _unusable(url, "the Nomad certificate is missing or not signed by its CA")
    if not credentials.same_key(nomad_cert.public_key(), keys.nomad_key.public_key()):
        raise _unusable(url, "the Nomad certificate is not for this node's Nomad key")
    dns, _addrs = credentials.alt_names(nomad_cert)
    wanted = f"client.{nomad['region']}.nomad"
    if wanted not in dns:
        raise _unusable(url, f"the Nomad certificate does not name {wanted}")
    return OverlayFiles(
        nebula_key_pem=keys.nebula_private_pem,
        nebula_cert_pem=neb["certificate"].encode(),
        nebula_ca_pem=neb["ca"].encode(),
        nomad_key_pem=keys.nomad_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        nomad_cert_pem=nomad["certificate_pem"].encode(),
        nomad_ca_pem=nomad["ca_pem"].encode(),
    )


def _check_response(body: Any, key: ec.EllipticCurvePrivateKey, url: str) -> dict[str, Any]:
    """The enrollment answer is only saved if it is a usable identity for *this* key."""

    def bad(why: str) -> VectorlayError:
        return _unusable(url, why)

    try:
        answer = answers.enrollment(body)
    except answers.AnswerError as e:
        raise bad(str(e)) from None
    for i, text in enumerate(answer.get("manifest_keys") or []):
        try:
            public_key_from_text(text)
        except VectorlayError:
            raise bad(f"manifest_keys[{i}] is not an Ed25519 public key") from None
    try:
        cert = x509.load_pem_x509_certificate(answer["certificate_pem"].encode())
        # During a CA rotation ca_pem is a bundle: the old CA and the new.
        x509.load_pem_x509_certificates(answer["ca_pem"].encode())
    except ValueError:
        raise bad("certificate_pem or ca_pem is not PEM") from None
    if not credentials.same_key(cert.public_key(), key.public_key()):
        raise bad("the certificate is not for this node's key")
    if credentials.issuer_in(cert, body["ca_pem"].encode()) is None:
        raise bad("the certificate is not signed by ca_pem")
    if credentials.common_name(cert) != answer["node_id"]:
        raise bad("the certificate does not name the node ID")
    return answer


def enroll(
    host: Host,
    api: ApiClient,
    token: str,
    *,
    gpu_mode: str,
    hardware: dict[str, Any],
    hostname: str | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> EnrollResult:
    """Enroll (or re-enroll) this node and switch its identity to the one the control plane issued.

    It passes the fault points ENROLL_POINTS and identity.WRITE_POINTS (tests kill the run there).
    On any error before the switch the existing identity is left exactly as it was. `key`: the key
    pair to enroll (one kept from an interrupted attempt lets the control plane recognise the retry
    of a token it already consumed); a fresh one by default.
    """
    hook = enroll_point
    current, cert, node_token = _credentials_for(host, api)
    hostname = hostname or _hostname(host)
    key, csr_pem = _make_csr(hostname, key)
    overlay_keys = _OverlayKeys.generate()
    client = api.with_client_cert(cert)
    body = {
        "token": token,
        "csr_pem": csr_pem,
        "nebula_public_key": overlay_keys.nebula_public_pem.decode(),
        "nomad_csr_pem": overlay_keys.nomad_csr_pem,
        "hostname": hostname,
        "hardware": hardware,
        "gpu_mode": gpu_mode,
    }
    hook("before-request")
    try:
        answer = client.request("POST", "/v1/nodes/enroll", json=body, bearer=node_token)
    except ApiError as e:
        if e.code == "BAD_NODE_CREDENTIALS":
            raise VectorlayError(
                f"the control plane no longer accepts this node's identity ({e.message})",
                f"to enroll as a new node, move {IDENTITY_DIR} away and re-run with a new token",
            ) from None
        raise
    finally:
        client.close()
    hook("response-received")
    answer = _check_response(answer, key, client.base_url)
    overlay = _check_overlay(answer, overlay_keys, client.base_url, datetime.now(timezone.utc))

    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    node = {
        "node_id": answer["node_id"],
        "org_id": answer["org_id"],
        "overlay_ip": answer["overlay_ip"],
        "api": api.base_url,
    }
    enrollment = {
        **node,
        "gpu_mode": gpu_mode,
        "hostname": hostname,
        # The certificates live in their own files; enrollment.json keeps the settings around them.
        "nebula": {k: v for k, v in answer["nebula"].items() if k not in ("certificate", "ca")},
        "nomad": {k: v for k, v in answer["nomad"].items() if k not in ("certificate_pem", "ca_pem")},
        # Public keys only: what the artifacts stage verifies the signed manifest against.
        "manifest_keys": list(answer.get("manifest_keys") or []),
    }
    identity = write_identity(
        host,
        NewIdentity(
            key_pem=key_pem,
            cert_pem=answer["certificate_pem"].encode(),
            ca_pem=answer["ca_pem"].encode(),
            node_token=answer["node_token"],
            node=node,
            enrollment=enrollment,
            overlay=overlay,
        ),
    )
    reenrolled = answer.get("reenrolled", current is not None)
    _confirm(api, identity)
    log.info(
        "%s node %s (overlay IP %s)",
        "re-enrolled" if reenrolled else "enrolled",
        identity.node_id,
        identity.overlay_ip,
    )
    return EnrollResult(identity.node_id, identity.org_id, identity.overlay_ip, reenrolled, identity)


def _confirm(api: ApiClient, identity: Identity) -> None:
    """First use of the new credentials, which retires the previous ones on the control plane.

    Until this succeeds both pairs work, so a failure here costs nothing: the next use of the new
    identity (by the agents or the next enrollment) completes the rotation.
    """
    client = ApiClient(
        api.base_url,
        ca_file=api.ca_file,
        pinned_ca=identity.ca_file,
        client_cert=ClientCert(identity.cert_file, identity.key_file),
        timeout=api.timeout,
        attempts=2,
        backoff=api.backoff,
        sleep=api.sleep,
        proxy=api.proxy,
    )
    try:
        client.request("GET", "/v1/node/self", bearer=identity.node_token())
    except VectorlayError as e:
        log.warning("the new identity was saved but not yet confirmed with the control plane: %s", e.message)
    finally:
        client.close()


def _hostname(host: Host) -> str:
    name = host.read_text("/etc/hostname", default="").strip()
    if not name and host.is_live:
        name = socket.gethostname()
    return name or "node"


# The renewal's own fault points before the identity writer's (identity.WRITE_POINTS), also named
# `enroll <point>`: the crash tests kill a renewal at each of them.
RENEW_POINTS = ("renew-before-request", "renew-response-received")
RENEW_PATH = "/v1/node/renew"


def renew(host: Host, api: ApiClient) -> Identity:
    """Renew this node's credentials over its current mTLS identity, for keys made here anew.

    The node keeps its ID and overlay IP; the answer is checked as an enrollment's is and written as
    one new generation of the identity directory (bootstrap.identity's atomic switch). On any error
    before the switch the working identity is left exactly as it was, and the control plane keeps
    accepting it: the new pair is only `pending` there until its first use (`_confirm`).
    """
    hook = enroll_point
    current = load_identity(host)
    if current is None:
        raise VectorlayError("this node is not enrolled yet", "run the install one-liner")
    enrollment = current.enrollment()
    key, csr_pem = _make_csr(current.node_id)
    overlay_keys = _OverlayKeys.generate()
    client = api.with_client_cert(ClientCert(current.cert_file, current.key_file))
    body = {
        "csr_pem": csr_pem,
        "nebula_public_key": overlay_keys.nebula_public_pem.decode(),
        "nomad_csr_pem": overlay_keys.nomad_csr_pem,
    }
    hook("renew-before-request")
    try:
        answer = client.request("POST", RENEW_PATH, json=body, bearer=current.node_token())
    finally:
        client.close()
    hook("renew-response-received")
    answer = _check_response(answer, key, client.base_url)
    if (answer["node_id"], answer["org_id"], answer["overlay_ip"]) != (
        current.node_id,
        current.org_id,
        current.overlay_ip,
    ):
        raise _unusable(client.base_url, "the renewed credentials are for another node or overlay IP")
    overlay = _check_overlay(answer, overlay_keys, client.base_url, datetime.now(timezone.utc))
    node = {
        "node_id": current.node_id,
        "org_id": current.org_id,
        "overlay_ip": current.overlay_ip,
        "api": current.api or api.base_url,
    }
    identity = write_identity(
        host,
        NewIdentity(
            key_pem=key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            cert_pem=answer["certificate_pem"].encode(),
            ca_pem=answer["ca_pem"].encode(),
            node_token=answer["node_token"],
            node=node,
            enrollment=enrollment,
            overlay=overlay,
        ),
    )
    _confirm(api, identity)
    log.info("renewed the credentials of node %s (overlay IP %s)", identity.node_id, identity.overlay_ip)
    return identity
