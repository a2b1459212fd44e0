"""The control plane's TLS layer.

The handshake happens in the server's selector loop (controlplane.server), and a plain-HTTP
client still gets a plain-HTTP answer. TLS session resumption (clients that offer their last
session; the server keeps it with the client certificate it verified; the node's own client makes a
full handshake each time) keeps every node request
authenticated as before: as the node whose certificate made the session, with that node's token,
and a connection without a certificate is still refused on node endpoints, resumed or not."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bootstrap.api import ApiClient, ApiError, ClientCert
from controlplane import testing
from tests.controlplane.cp_nodes import Enrolled

BEAT: dict[str, Any] = {
    "doctor": {"verdict": "PASS", "checks": [], "gpu_units": {"ready": 0, "total": 0}},
    "resources": {"cpu_percent": 1.0, "memory_percent": 1.0, "disk_percent": 1.0},
    "agents": {},
    "draining": False,
    "interval_s": 60,
}


def _client(cp: testing.RunningControlPlane, node: Enrolled | None) -> ApiClient:
    cert = ClientCert(node.cert_file, node.key_file) if node is not None else None
    return ApiClient(cp.url, ca_file=cp.ca_file, client_cert=cert, attempts=1)


def _context(cp: testing.RunningControlPlane, node: Enrolled | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cp.ca_file))
    if node is not None:
        ctx.load_cert_chain(str(node.cert_file), str(node.key_file))
    return ctx


def test_the_node_client_makes_a_full_handshake_per_request_and_is_still_served(
    control_plane: testing.RunningControlPlane, tmp_path: Path
) -> None:
    """The node's client resumes no session (issue 22: resumption reached past the ssl module's
    public API and crashed on a failed handshake); each of its requests stands alone."""
    control_plane.org("acme")
    a = Enrolled(control_plane, "acme", tmp_path / "a")
    api = _client(control_plane, a)
    for _ in range(3):
        assert api.request("GET", "/v1/node/self", bearer=a.token)["node_id"] == a.answer["node_id"]
        assert api.request("POST", "/v1/node/heartbeat", json=BEAT, bearer=a.token)["status"] == "active"


def test_a_resumed_connection_is_still_the_node_whose_certificate_made_the_session(
    control_plane: testing.RunningControlPlane, tmp_path: Path
) -> None:
    control_plane.org("acme")
    a, b = Enrolled(control_plane, "acme", tmp_path / "a"), Enrolled(control_plane, "acme", tmp_path / "b")
    ctx_a, ctx_b = _context(control_plane, a), _context(control_plane, b)
    sessions: dict[str, ssl.SSLSession | None] = {"a": None, "b": None}
    resumed = 0
    for _ in range(3):
        for name, ctx, node in (("a", ctx_a, a), ("b", ctx_b, b)):
            reused, answer, sessions[name] = _raw_get(control_plane, ctx, sessions[name], node.token)
            resumed += reused
            assert answer.startswith(b"HTTP/1.1 200") and node.answer["node_id"].encode() in answer
    assert resumed >= 4
    # The session is node A's identity: B's token does not go with it.
    reused, answer, _ = _raw_get(control_plane, ctx_a, sessions["a"], b.token)
    assert reused and answer.startswith(b"HTTP/1.1 401") and b"BAD_NODE_CREDENTIALS" in answer


def test_without_a_certificate_node_endpoints_refuse_even_a_resumed_connection(
    control_plane: testing.RunningControlPlane, tmp_path: Path
) -> None:
    control_plane.org("acme")
    node = Enrolled(control_plane, "acme", tmp_path / "n")
    ctx = _context(control_plane, None)
    session = None
    resumed = 0
    for _ in range(4):
        reused, answer, session = _raw_get(control_plane, ctx, session, node.token)
        resumed += reused
        assert answer.startswith(b"HTTP/1.1 401") and b"CLIENT_CERT_REQUIRED" in answer
    assert resumed >= 3
    with pytest.raises(ApiError) as refused:
        _client(control_plane, None).request("GET", "/v1/node/self", bearer=node.token)
    assert refused.value.status == 401 and refused.value.code == "CLIENT_CERT_REQUIRED"


def _raw_get(
    cp: testing.RunningControlPlane,
    ctx: ssl.SSLContext,
    session: ssl.SSLSession | None,
    token: str,
) -> tuple[bool, bytes, ssl.SSLSession | None]:
    """One request on a new connection offering `session`, with the ssl module's public API: the
    session is read after the answer, as TLS 1.3 tickets arrive after the handshake."""
    url = urlsplit(cp.url)
    assert url.hostname is not None and url.port is not None
    with (
        socket.create_connection((url.hostname, url.port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname=url.hostname, session=session) as tls,
    ):
        tls.sendall(
            f"GET /v1/node/self HTTP/1.1\r\nHost: {url.hostname}\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        return bool(tls.session_reused), answer, tls.session


def test_a_session_is_bound_to_the_certificate_and_a_certless_context_cannot_take_it_over(
    control_plane: testing.RunningControlPlane, tmp_path: Path
) -> None:
    control_plane.org("acme")
    node = Enrolled(control_plane, "acme", tmp_path / "n")
    with_cert = ssl.create_default_context(cafile=str(control_plane.ca_file))
    with_cert.load_cert_chain(str(node.cert_file), str(node.key_file))
    reused, answer, session = _raw_get(control_plane, with_cert, None, node.token)
    assert not reused and answer.startswith(b"HTTP/1.1 200") and node.answer["node_id"].encode() in answer
    reused, answer, _ = _raw_get(control_plane, with_cert, session, node.token)
    assert reused and answer.startswith(b"HTTP/1.1 200") and node.answer["node_id"].encode() in answer
    # Another context (no certificate) is not handed the node's session by Python's ssl...
    certless = ssl.create_default_context(cafile=str(control_plane.ca_file))
    with pytest.raises(ValueError):
        _raw_get(control_plane, certless, session, node.token)
    # ...and resuming its own session still leaves it without a node identity.
    _, answer, own = _raw_get(control_plane, certless, None, node.token)
    assert answer.startswith(b"HTTP/1.1 401") and b"CLIENT_CERT_REQUIRED" in answer
    reused, answer, _ = _raw_get(control_plane, certless, own, node.token)
    assert reused and answer.startswith(b"HTTP/1.1 401") and b"CLIENT_CERT_REQUIRED" in answer


def test_plain_http_on_the_tls_port_gets_a_plain_400(control_plane: testing.RunningControlPlane) -> None:
    url = urlsplit(control_plane.url)
    assert url.hostname is not None and url.port is not None
    with socket.create_connection((url.hostname, url.port), timeout=30) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"only speaks HTTPS" in answer


def test_an_expired_client_certificate_is_refused_even_when_a_resumed_session_skips_its_dates() -> None:
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from controlplane.app import http_status
    from controlplane.errors import ControlPlaneError
    from controlplane.nodeauth import peer_fingerprint

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "box")])
    now = datetime.now(timezone.utc)

    def pem(not_after: datetime) -> str:
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=2))
            .not_valid_after(not_after)
            .sign(key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    assert len(peer_fingerprint(pem(now + timedelta(days=1)))) == 64
    with pytest.raises(ControlPlaneError) as refused:
        peer_fingerprint(pem(now - timedelta(seconds=1)))
    assert http_status(refused.value) == 401 and refused.value.code == "BAD_NODE_CREDENTIALS"
