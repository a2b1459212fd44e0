"""Nomad's TLS naming rules, held with the node's real files over real sockets.

Nomad's rules (hashicorp/nomad): with `verify_server_hostname` a client dials servers with the server
name `server.<region>.nomad` (helper/tlsutil/config.go) and verifies it against the CA; a server
accepts RPC only from a certificate whose common name or DNS names hold `client.<region>.nomad` or
`server.<region>.nomad` (nomad/auth/auth.go, validateCertificateForNames). The client's HTTP API
serves the client's own certificate. Python's ssl (OpenSSL) plays both ends here: it checks the
chain, the serverAuth/clientAuth usages and the server name as Go's crypto/tls does.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bootstrap.host import Host, TreeHost
from bootstrap.identity import Identity, load_identity
from controlplane.clock import wall_now
from controlplane.pki import CertificateAuthority
from hostsim import build_host, load_topology

from .helpers import parse_hcl, render_nomad_config

HTTPS_SERVER = Path(__file__).with_name("https_server.py")
SERVER_OVERLAY_IP = "100.64.0.1"
CURL = ("curl", "--silent", "--show-error", "--fail")


@dataclass
class NomadNode:
    """An enrolled node: its identity, the Nomad config the agents stage renders, the control plane."""

    host: Host
    ident: Identity
    config: dict[str, Any]
    cp: Any

    @property
    def region(self) -> str:
        region: str = self.config["region"]
        return region

    @property
    def server_name(self) -> str:
        """The name the node's Nomad dials servers with (verify_server_hostname)."""
        return f"server.{self.region}.nomad"

    def tls_file(self, key: str) -> Path:
        """A file the config's tls block names, under the node's root."""
        return self.host.path(self.config["tls"][0][key])


# --- Certificates -----------------------------------------------------------------------------------


def _write_pair(directory: Path, name: str, key_pem: bytes, cert_pem: bytes) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert.write_bytes(cert_pem)
    return cert, key


def _key_and_csr(cn: str) -> tuple[bytes, str]:
    """A P-256 key and a CSR for it, as the node makes them for Nomad."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def _client_pair(
    ca: CertificateAuthority, directory: Path, *, region: str, overlay_ip: str, node_id: str = "node_x"
) -> tuple[Path, Path]:
    key_pem, csr = _key_and_csr(node_id)
    cert = ca.sign_nomad_client_csr(
        csr, node_id=node_id, region=region, overlay_ip=overlay_ip, now=wall_now()
    )
    return _write_pair(directory, "client", key_pem, cert.public_bytes(serialization.Encoding.PEM))


def _make_nomad_files(ident: Identity, cp: Any, region: str) -> None:
    """nomad.key (0600), nomad.crt, nomad-ca.crt in the identity dir, as the enrollment leaves them:
    a key made on the node, signed through a CSR by the control plane's CA."""
    ca = CertificateAuthority.load_or_create(cp.state_dir, wall_now())
    key_pem, csr = _key_and_csr(ident.node_id)
    cert = ca.sign_nomad_client_csr(
        csr, node_id=ident.node_id, region=region, overlay_ip=ident.overlay_ip, now=wall_now()
    )
    _write_pair(ident.path, "nomad", key_pem, cert.public_bytes(serialization.Encoding.PEM))
    (ident.path / "nomad-ca.crt").write_bytes(cp.ca_file.read_bytes())


@pytest.fixture(scope="module")
def nomad_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NomadNode]:
    """One node enrolled through the real CLI against a real control plane, shared by this module's
    tests (none of them changes it)."""
    from controlplane import testing

    base = tmp_path_factory.mktemp("nomad-node")
    cp = testing.start(base / "control-plane")
    try:
        cp.org("acme", provider=True)
        root = build_host(base / "root", load_topology("cpu-only"))
        res = cp.enroll(root, "acme")
        assert res.returncode == 0, res.stderr
        host = TreeHost(root)
        ident = load_identity(host)
        assert ident is not None
        config = parse_hcl(render_nomad_config(host, ident, "container"))
        if not (ident.path / "nomad.crt").exists():
            # Until the enrollment answer carries the Nomad certificate: the same files, made here
            # the way the node and the control plane make them.
            _make_nomad_files(ident, cp, config["region"])
        yield NomadNode(host, ident, config, cp)
    finally:
        testing.stop(cp)


@pytest.fixture(scope="module")
def server_identity(nomad_node: NomadNode, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Nomad server's files, from `vectorlay-control-plane nomad-server-cert` on the control
    plane's state dir."""
    out = tmp_path_factory.mktemp("nomad-server")
    args = ["--state-dir", str(nomad_node.cp.state_dir), "--region", nomad_node.region]
    args += ["--overlay-ip", SERVER_OVERLAY_IP, "--out", str(out)]
    res = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "nomad-server-cert", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return out


# --- TLS on a real socket ---------------------------------------------------------------------------


def _names(cert_der: bytes) -> list[str]:
    """What Nomad's validateCertificateForNames compares: the common name and the DNS names."""
    cert = x509.load_der_x509_certificate(cert_der)
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += san.get_values_for_type(x509.DNSName)
    return names


@contextlib.contextmanager
def tls_server(ctx: ssl.SSLContext, verdict: Callable[[bytes | None], bytes]) -> Iterator[int]:
    """Serve TLS on 127.0.0.1 (any free port) in a thread; each connection gets `verdict(peer cert)`."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def _serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(10)
            try:
                with ctx.wrap_socket(raw, server_side=True) as conn:
                    conn.sendall(verdict(conn.getpeercert(binary_form=True)))
            except (ssl.SSLError, OSError):
                pass  # the client refused this server: what several tests expect

    thread = threading.Thread(target=_serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def _dial(port: int, ctx: ssl.SSLContext, server_name: str) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as conn,
    ):
        data = b""
        while chunk := conn.recv(64):
            data += chunk
        return data


def _server_ctx(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _node_rpc_ctx(node: NomadNode, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """The node dialing a server as its Nomad config says: the config's CA, its certificate and
    key (or the given ones), the server's name checked because verify_server_hostname is on."""
    tls = node.config["tls"][0]
    assert tls["rpc"] is True and tls["verify_server_hostname"] is True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    ctx.load_verify_locations(node.tls_file("ca_file"))
    ctx.load_cert_chain(cert or node.tls_file("cert_file"), key or node.tls_file("key_file"))
    return ctx


def _hello(peer: bytes | None) -> bytes:
    return b"hello"


# (a) the node accepts only server.<region>.nomad from its CA ---------------------------------------


@pytest.mark.slow
def test_the_node_accepts_a_nomad_server_of_its_region_from_the_control_planes_ca(
    nomad_node: NomadNode, server_identity: Path
) -> None:
    ctx = _server_ctx(server_identity / "server.crt", server_identity / "server.key")
    with tls_server(ctx, _hello) as port:
        assert _dial(port, _node_rpc_ctx(nomad_node), nomad_node.server_name) == b"hello"


def _impostors(node: NomadNode, tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """Certificates a server must not get away with, each with its key."""
    ca = CertificateAuthority.load_or_create(node.cp.state_dir, wall_now())
    foreign = CertificateAuthority.load_or_create(tmp_path / "foreign-ca", wall_now())
    d, ip, now = tmp_path / "impostors", SERVER_OVERLAY_IP, wall_now()
    return {
        # The control plane's own HTTPS certificate: same CA, but not a Nomad server.
        "control plane API": (node.cp.state_dir / "server.crt", node.cp.state_dir / "server.key"),
        "another region": _write_pair(
            d, "other", *ca.issue_nomad_server_cert(region="otherregion", overlay_ip=ip, now=now)
        ),
        # A node posing as a server with its own Nomad certificate.
        "a client": (node.tls_file("cert_file"), node.tls_file("key_file")),
        "another CA": _write_pair(
            d, "foreign", *foreign.issue_nomad_server_cert(region=node.region, overlay_ip=ip, now=now)
        ),
    }


@pytest.mark.parametrize("impostor", ["control plane API", "another region", "a client", "another CA"])
def test_the_node_refuses_a_server_certificate_that_is_not_server_of_its_region_from_its_ca(
    nomad_node: NomadNode, tmp_path: Path, impostor: str
) -> None:
    cert, key = _impostors(nomad_node, tmp_path)[impostor]
    with tls_server(_server_ctx(cert, key), _hello) as port, pytest.raises(ssl.SSLCertVerificationError) as e:
        _dial(port, _node_rpc_ctx(nomad_node), nomad_node.server_name)
    expected = "unable to get local issuer" if impostor == "another CA" else "Hostname mismatch"
    assert expected in str(e.value)


# (b) a server that requires client.<region>.nomad ---------------------------------------------------


def _rpc_server_ctx(server_identity: Path) -> ssl.SSLContext:
    """A Nomad server's RPC listener: its certificate, and a client certificate of its CA required."""
    d = server_identity
    return _server_ctx(d / "server.crt", d / "server.key", client_ca=d / "ca.crt")


def _nomad_server_rpc(region: str) -> Callable[[bytes | None], bytes]:
    """A Nomad server's RPC check after the TLS handshake (auth.go's validClientCertNames)."""
    valid = {f"client.{region}.nomad", f"server.{region}.nomad"}

    def _verdict(peer: bytes | None) -> bytes:
        assert peer is not None  # CERT_REQUIRED: no handshake without one
        return b"accepted" if valid & set(_names(peer)) else b"refused"

    return _verdict


def test_a_server_requiring_client_of_the_region_accepts_the_nodes_nomad_certificate(
    nomad_node: NomadNode, server_identity: Path
) -> None:
    with tls_server(_rpc_server_ctx(server_identity), _nomad_server_rpc(nomad_node.region)) as port:
        assert _dial(port, _node_rpc_ctx(nomad_node), nomad_node.server_name) == b"accepted"


def test_the_same_server_refuses_the_nodes_api_certificate_and_a_client_of_another_region(
    nomad_node: NomadNode, server_identity: Path, tmp_path: Path
) -> None:
    ca = CertificateAuthority.load_or_create(nomad_node.cp.state_dir, wall_now())
    clients = {
        # node.crt (the control plane API's client certificate) names only node_... and a SPIFFE URI.
        "node.crt": (nomad_node.ident.cert_file, nomad_node.ident.key_file),
        "client.otherregion.nomad": _client_pair(
            ca, tmp_path / "other", region="otherregion", overlay_ip="100.64.0.50"
        ),
    }
    with tls_server(_rpc_server_ctx(server_identity), _nomad_server_rpc(nomad_node.region)) as port:
        for name, (cert, key) in clients.items():
            # The handshake passes (one CA signs them all); the name rule is what refuses.
            assert _dial(port, _node_rpc_ctx(nomad_node, cert, key), nomad_node.server_name) == b"refused", (
                name
            )


# (c) curl and the client's HTTP API, at 127.0.0.1 and at the overlay IP ----------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of this test's own, its loopback up; removed afterwards."""
    name = f"vl-nomad-{secrets.token_hex(4)}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=30)


@contextlib.contextmanager
def https_api(netns: str, cert: Path, key: Path, addresses: list[str]) -> Iterator[int]:
    """tests/nomad/https_server.py in `netns`, on `addresses`, presenting `cert`: its port."""
    server = [sys.executable, str(HTTPS_SERVER), "--cert", str(cert), "--key", str(key), *addresses]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, *server], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            proc.kill()
            raise AssertionError(f"https server did not start: {line!r} {proc.communicate()[1]}")
        yield int(line)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def _curl(netns: str, ca: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *CURL, "--cacert", str(ca), url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _api_addresses(node: NomadNode, netns: str) -> list[str]:
    """The addresses the config binds the HTTP API to; the overlay IP goes on the namespace's
    loopback (on a node, nebula's tun device holds it)."""
    addresses: list[str] = node.config["addresses"][0]["http"].split()
    assert addresses == ["127.0.0.1", node.ident.overlay_ip]
    _ip("-n", netns, "addr", "add", f"{node.ident.overlay_ip}/32", "dev", "lo")
    return addresses


def test_curl_accepts_the_nodes_http_api_at_loopback_and_at_the_overlay_ip(
    nomad_node: NomadNode, netns: str
) -> None:
    assert nomad_node.config["tls"][0]["http"] is True
    addresses = _api_addresses(nomad_node, netns)
    cert, key = nomad_node.tls_file("cert_file"), nomad_node.tls_file("key_file")
    with https_api(netns, cert, key, addresses) as port:
        for addr in addresses:
            res = _curl(netns, nomad_node.tls_file("ca_file"), f"https://{addr}:{port}/")
            assert (res.returncode, res.stdout, res.stderr) == (0, "ok\n", ""), addr


def test_curl_refuses_the_api_certificate_the_node_had_before_and_one_from_a_foreign_ca(
    nomad_node: NomadNode, netns: str, tmp_path: Path
) -> None:
    addresses = _api_addresses(nomad_node, netns)
    ca = nomad_node.tls_file("ca_file")
    # node.crt: clientAuth only and no IP names, what the HTTP API served before.
    with https_api(netns, nomad_node.ident.cert_file, nomad_node.ident.key_file, addresses) as port:
        res = _curl(netns, ca, f"https://127.0.0.1:{port}/")
        assert res.returncode == 60 and "unsuitable certificate purpose" in res.stderr, res.stderr
    # The right names and usages, from a CA the node does not trust.
    foreign = CertificateAuthority.load_or_create(tmp_path / "foreign-ca", wall_now())
    cert, key = _client_pair(
        foreign, tmp_path / "foreign", region=nomad_node.region, overlay_ip=nomad_node.ident.overlay_ip
    )
    with https_api(netns, cert, key, addresses) as port:
        res = _curl(netns, ca, f"https://{nomad_node.ident.overlay_ip}:{port}/")
        assert res.returncode == 60 and "unable to get local issuer certificate" in res.stderr, res.stderr
