"""Nodes told to use `--public-url https://NAME` check the server certificate against NAME."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from controlplane import testing as cptesting

pytestmark = pytest.mark.slow


def _server_names(state_dir: Path) -> list[str]:
    # server.crt holds the leaf followed by the CA; the leaf comes first.
    leaf = x509.load_pem_x509_certificates((state_dir / "server.crt").read_bytes())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in san]


def test_the_server_certificate_names_the_public_urls_host_too(tmp_path: Path) -> None:
    with cptesting.running(tmp_path, args=("--public-url", "https://cp.nodes.example:9443")) as cp:
        names = _server_names(cp.state_dir)
        assert names == ["localhost", "127.0.0.1", "cp.nodes.example"]
        # A TLS client verifying against that name accepts the certificate the server presents.
        ctx = ssl.create_default_context(cafile=str(cp.ca_file))
        port = int(cp.url.rsplit(":", 1)[1])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="cp.nodes.example") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_without_a_public_url_the_certificate_names_only_the_listen_address(tmp_path: Path) -> None:
    with cptesting.running(tmp_path) as cp:
        assert _server_names(cp.state_dir) == ["localhost", "127.0.0.1"]
