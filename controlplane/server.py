"""HTTPS for the control plane: cheroot (CherryPy's production WSGI server) with mTLS.

Client certificates are optional at the TLS layer, because enrollment and introspection come from
nodes that have none yet, but any certificate presented must chain to the control plane's own CA:
a certificate from another CA fails the handshake. Endpoints that need a node identity then demand
one (service.node_self).

A node resuming a TLS 1.3 session (bootstrap.api) skips the certificate exchange: the server
sealed the certificate it verified into the session ticket (encrypted and authenticated with a key
that never leaves this process), so the resumed connection carries the same verified identity and
the WSGI environ says the same as after a full handshake.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from cheroot import server as cheroot_server
from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter
from flask import Flask

from controlplane.clock import wall_now
from controlplane.pki import CertificateAuthority

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PLAIN_HTTP_MESSAGE = b"This server only speaks HTTPS on this port: use https:// URLs."
_PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    + f"Content-Length: {len(_PLAIN_HTTP_MESSAGE)}\r\n\r\n".encode()
    + _PLAIN_HTTP_MESSAGE
)


class _TLSAdapter(BuiltinSSLAdapter):
    """The TLS handshake in the worker thread that serves the connection, not in cheroot's single
    accepting thread: there every handshake waited for the one before it, whatever the cores, and a
    client stalling its handshake stalled every other connection for up to the socket timeout."""

    def wrap(self, sock: socket.socket) -> tuple[ssl.SSLSocket, dict[str, Any]]:
        return self.context.wrap_socket(sock, do_handshake_on_connect=False, server_side=True), {}

    def environ_of(self, sock: ssl.SSLSocket) -> dict[str, Any]:
        """What app.py reads, as Apache and nginx name it. cheroot's own version also parses the
        certificate into a dozen SSL_CLIENT_* variables and lists the context's ciphers, for every
        connection; nothing here reads those."""
        cipher = sock.cipher()
        env: dict[str, Any] = {
            "wsgi.url_scheme": "https",
            "HTTPS": "on",
            "SSL_PROTOCOL": cipher[1] if cipher else "",
            "SSL_CIPHER": cipher[0] if cipher else "",
            "SSL_CLIENT_VERIFY": "NONE",
        }
        # A certificate is there only if it verified: with CERT_OPTIONAL a bad one fails the handshake.
        der = sock.getpeercert(binary_form=True)
        if der:
            env["SSL_CLIENT_VERIFY"] = "SUCCESS"
            env["SSL_CLIENT_CERT"] = _pem(der)
        return env


@functools.lru_cache(maxsize=4096)
def _pem(der: bytes) -> str:
    # Cached: a node presents the same certificate every heartbeat, and the conversion (base64 and
    # textwrap) is as slow as the rest of environ_of together.
    return ssl.DER_cert_to_PEM_cert(der).strip()


class _Gateway(wsgi.Gateway_10):
    """An application's `Connection: close` closes the connection after the answer: cheroot only
    honours the client's, and otherwise keeps the connection open for the next request after
    telling the client it won't."""

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        write = super().start_response(status, headers, exc_info)
        if any(k.lower() == "connection" and v.lower() == "close" for k, v in headers):
            self.req.close_connection = True
        return write


class _TLSConnection(cheroot_server.HTTPConnection):
    """Completes the handshake (_TLSAdapter) before the first request on the connection."""

    _tls_done = False

    def communicate(self) -> bool:
        if not self._tls_done:
            sock = self.socket
            try:
                sock.do_handshake()
            except OSError as e:  # ssl.SSLError (a refused certificate...), a reset, a timeout
                if isinstance(e, ssl.SSLError) and "http request" in str(e).lower():
                    # A plain-HTTP client: tell it in plain HTTP, past the TLS layer.
                    with contextlib.suppress(OSError):
                        socket.socket.sendall(sock, _PLAIN_HTTP_ANSWER)
                # Logged as cheroot logged a failed handshake: a refused certificate shows there.
                self.server.error_log(
                    f"Client {getattr(self, 'remote_addr', '?')} lost during the TLS handshake: {e}"
                )
                return False
            adapter = self.server.ssl_adapter
            assert isinstance(adapter, _TLSAdapter)
            self.ssl_env = adapter.environ_of(sock)
            self._tls_done = True
        return bool(super().communicate())  # type: ignore[no-untyped-call]


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
    server.ConnectionClass = _TLSConnection
    server.gateway = _Gateway
    adapter = _TLSAdapter(str(cert_path), str(key_path), certificate_chain=str(state_dir / "ca.crt"))
    ctx = adapter.context
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_OPTIONAL
    # One TLS 1.3 ticket per handshake instead of OpenSSL's two: a node keeps only the last one it
    # got (bootstrap.api), and each ticket costs the server an encryption of the session, client
    # certificate included, on every heartbeat.
    ctx.num_tickets = 1
    server.ssl_adapter = adapter
    return server


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT that never listens: it holds the port
    (port 0: picks one) for the worker processes to bind theirs beside it, and takes no connection."""
    family, kind, proto, _name, addr = socket.getaddrinfo(
        host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def fork_workers(server: wsgi.Server, count: int) -> list[int]:
    """`count` more processes serving `server`'s port, forked before any thread starts; returns
    their pids (in the parent; a child serves until SIGTERM and exits there).

    Forked, not started afresh: each one holds the same TLS context, so the same session-ticket
    key, and a node resumes its session whichever process the kernel hands its connection to.
    Processes, because one Python process serves a heartbeat holding the GIL for most of it: on
    more cores than one, one process is the limit. Each worker binds its own listening socket
    (SO_REUSEPORT, which only processes of this user can join) and opens its own database
    connections; writes from all of them queue on the database's write lock (db.Database).
    """
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid:
            pids.append(pid)
            continue
        code = 0
        try:
            _die_with(parent)
            server.prepare()
            try:
                server.serve()
            finally:
                server.stop()
        except KeyboardInterrupt:  # SIGTERM (cli.serve's handler)
            pass
        except BaseException as e:
            server.error_log(f"worker process {os.getpid()} failed: {e}")
            code = 1
        finally:
            os._exit(code)
    return pids


def _die_with(parent: int) -> None:
    """SIGTERM this process when its parent dies: a worker must not outlive the server it is part of."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
