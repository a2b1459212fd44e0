"""HTTPS for the control plane: cheroot (CherryPy's production WSGI server) with mTLS.

Client certificates are optional at the TLS layer, because enrollment and introspection come from
nodes that have none yet, but any certificate presented must chain to the control plane's own CA:
a certificate from another CA fails the handshake. Endpoints that need a node identity then demand
one (service.node_self).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter
from flask import Flask

from controlplane.clock import wall_now
from controlplane.pki import CertificateAuthority


def build_server(
    app: Flask,
    host: str,
    port: int,
    ca: CertificateAuthority,
    state_dir: Path,
    threads: int = 32,
    extra_names: tuple[str, ...] = (),
) -> wsgi.Server:
    cert_path, key_path = ca.write_server_cert(state_dir, host, wall_now(), extra_names)
    server = wsgi.Server(
        (host, port),
        app,
        numthreads=threads,
        server_name="vectorlay-control-plane",
        # cheroot's default listen backlog is 5: a burst of nodes overflowing it waits out a 1 s
        # SYN retransmit each.
        request_queue_size=256,
    )
    adapter = BuiltinSSLAdapter(str(cert_path), str(key_path), certificate_chain=str(state_dir / "ca.crt"))
    ctx = adapter.context
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_OPTIONAL
    server.ssl_adapter = adapter
    return server
