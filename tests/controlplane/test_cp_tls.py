"""The control plane's TLS layer: the handshake happens in the worker serving the connection
(controlplane.server), and a plain-HTTP client still gets a plain-HTTP answer."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from controlplane import testing


def test_plain_http_on_the_tls_port_gets_a_plain_400(control_plane: testing.RunningControlPlane) -> None:
    url = urlsplit(control_plane.url)
    assert url.hostname is not None and url.port is not None
    with socket.create_connection((url.hostname, url.port), timeout=30) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"only speaks HTTPS" in answer
