"""HTTPS for the control plane: cheroot (CherryPy's production WSGI server) with mTLS.

Client certificates are optional at the TLS layer, because enrollment and introspection come from
nodes that have none yet, but any certificate presented must chain to the control plane's own CA:
a certificate from another CA fails the handshake. Endpoints that need a node identity then demand
one (service.node_self).

A node resuming a TLS 1.3 session (bootstrap.api) skips the certificate exchange. The server keeps
the sessions it made (OpenSSL's session cache, with the certificate it verified) and gives the node
a ticket naming one, so the resumed connection carries the same verified identity and the WSGI
environ says the same as after a full handshake. Kept, not sealed into the ticket: OpenSSL 3.0
decodes a sealed session's certificate through its slow key decoder, the largest single cost of a
heartbeat. A session lives in the process that made it, so with several worker processes
(fork_workers) the kernel hands each client address to the same one (worker_affinity).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import select
import selectors
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cheroot import connections as cheroot_connections
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
    """The TLS handshake left to _Connections, which drives it without blocking: cheroot's adapter
    does it in its single accepting thread, where every handshake waited for the one before it and a
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
    """A connection whose TLS handshake _Connections drives, without blocking, before a worker
    thread ever sees it."""

    tls_done = False
    in_worker = False  # counted in _Server's threads busy for its address
    _released = False

    def handshake_step(self) -> int | None:
        """One non-blocking step of the handshake: the selector event to wait for next (EVENT_READ or
        EVENT_WRITE), or None once it is done. OSError when it failed (logged here)."""
        sock = self.socket
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            return selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            return selectors.EVENT_WRITE
        except OSError as e:  # ssl.SSLError (a refused certificate...), a reset
            if isinstance(e, ssl.SSLError) and "http request" in str(e).lower():
                # A plain-HTTP client: tell it in plain HTTP, past the TLS layer.
                with contextlib.suppress(OSError):
                    socket.socket.send(sock, _PLAIN_HTTP_ANSWER)
            # Logged as cheroot logged a failed handshake: a refused certificate shows there.
            self.server.error_log(
                f"Client {getattr(self, 'remote_addr', '?')} lost during the TLS handshake: {e}"
            )
            raise
        adapter = self.server.ssl_adapter
        assert isinstance(adapter, _TLSAdapter)
        self.ssl_env = adapter.environ_of(sock)
        self.tls_done = True
        sock.settimeout(self.server.timeout)
        return None

    def close(self) -> None:
        """TLS's own end of the connection, a close_notify, without waiting for the client's.

        OpenSSL drops a session from its cache when the connection that made it is freed without
        having sent a close_notify, and the node could not resume it. Sending one is not enough:
        reading the client's close (an EOF, which OP_IGNORE_UNEXPECTED_EOF takes for a close_notify)
        makes OpenSSL 3.0 forget it sent its own (SSL_set_shutdown), and CPython's shutdown reads
        once after sending. So when that read found the client gone, say it again."""
        if not self._released:
            self._released = True
            server = self.server
            if isinstance(server, _Server):
                server.worker_done(self)
                server.connection_closed(getattr(self, "remote_addr", None))
        tls = getattr(self.socket, "_sslobj", None) if self.tls_done else None
        if tls is not None:
            try:
                self.socket.settimeout(0)
                tls.shutdown()
            except OSError:  # SSLWantReadError (sent, nothing to read yet), a reset: nothing read
                pass
            else:
                with contextlib.suppress(OSError):
                    tls.shutdown()
        super().close()


class _Connections(cheroot_connections.ConnectionManager):
    """cheroot's selector loop, which also takes each new connection through its TLS handshake and
    until its first request byte, so that a worker thread only ever gets a connection with a request
    to read. cheroot hands a connection to a worker right after accept(), and there the handshake
    blocked the thread for up to the socket timeout: a few hundred clients that connect and send
    nothing (or half a ClientHello) held every thread, and no node's heartbeat got through. Here they
    cost a file descriptor each until their deadline (the server's timeout from accept, closed by
    cheroot's expiry like an idle keep-alive connection)."""

    server: _Server

    def _from_server_socket(self, server_socket: socket.socket) -> Any:
        conn = super()._from_server_socket(server_socket)  # type: ignore[misc]
        if conn is None:
            return None
        if not self.server.admit(getattr(conn, "remote_addr", None)):
            conn._released = True
            with contextlib.suppress(OSError):
                conn.socket.close()
            return None
        conn.socket.settimeout(0)
        conn.last_used = time.time()  # the handshake's deadline counts from here (_expire)
        return conn

    def handshake(self, conn: _TLSConnection) -> None:
        """Advance `conn`'s handshake as far as its bytes allow; wait for more in the selector."""
        try:
            wait = conn.handshake_step()
        except OSError:
            conn.close()
            return
        if wait is not None:
            self._selector.register(conn.socket.fileno(), wait, data=conn)  # type: ignore[attr-defined]
        elif conn.socket.pending():  # a request already decrypted: the selector would not see it
            self.server.process_conn(conn)
        else:
            self.put(conn)

    @property
    def can_add_keepalive_connection(self) -> bool:
        """cheroot's limit on idle keep-alive connections, not counting those still in their
        handshake: hostile clients holding handshakes open must not turn keep-alive off for all."""
        limit: int | None = self.server.keep_alive_conn_limit
        if limit is None:
            return True
        held = self._selector.connections  # type: ignore[attr-defined]
        idle = [c for _fd, c in held if isinstance(c, _TLSConnection) and c.tls_done]
        return len(idle) < limit


class _Server(wsgi.Server):
    """cheroot's WSGI server with _Connections, a limit on the connections one client address holds
    open at once, and one on the worker threads its requests hold at once (both per process;
    worker_affinity sends an address to one process).

    A request that trickles in (a byte every few seconds, within the socket timeout each time) holds
    its worker thread for as long as its client likes. Past max_busy_per_address, an address's next
    readable connection waits, parked, until one of its own is done: a client slowing its requests
    down holds that many threads, not all of them, and its other requests queue behind its own."""

    def __init__(self, *args: Any, max_per_address: int, max_busy_per_address: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_per_address = max_per_address
        self.max_busy_per_address = max_busy_per_address
        self._open_lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._refusing: set[str] = set()
        self._busy: dict[str, int] = {}
        self._parked: dict[str, collections.deque[_TLSConnection]] = {}

    def prepare(self) -> None:
        super().prepare()
        stock = self._connections  # type: ignore[has-type]
        self._connections = _Connections(self)
        stock._selector.close()  # it only watched the listening socket, now _Connections' job

    def process_conn(self, conn: Any) -> None:
        if not isinstance(conn, _TLSConnection):
            super().process_conn(conn)
        elif not conn.tls_done:
            self._connections.handshake(conn)
        else:
            addr = getattr(conn, "remote_addr", None)
            if addr is not None:
                with self._open_lock:
                    busy = self._busy.get(addr, 0)
                    if busy >= self.max_busy_per_address:
                        self._parked.setdefault(addr, collections.deque()).append(conn)
                        return
                    self._busy[addr] = busy + 1
                conn.in_worker = True
            super().process_conn(conn)

    def put_conn(self, conn: Any) -> None:
        """A worker is done with a kept-alive connection (cheroot's worker calls this or close)."""
        if isinstance(conn, _TLSConnection):
            self.worker_done(conn)
        super().put_conn(conn)

    def worker_done(self, conn: _TLSConnection) -> None:
        """`conn` leaves its worker thread: the thread goes to its address's next parked connection,
        if any, or back to the pool."""
        if not conn.in_worker:
            return
        conn.in_worker = False
        addr = conn.remote_addr
        with self._open_lock:
            parked = self._parked.get(addr)
            following = parked.popleft() if parked else None
            if parked is not None and not parked:
                del self._parked[addr]
            if following is None:
                busy = self._busy.get(addr, 0) - 1
                if busy > 0:
                    self._busy[addr] = busy
                else:
                    self._busy.pop(addr, None)
        if following is not None:  # its address keeps the thread count it had
            following.in_worker = True
            super().process_conn(following)

    def admit(self, addr: str | None) -> bool:
        """Count a new connection from `addr`, or refuse it (False) when the address already holds
        max_per_address; the refusal is logged once until the address falls below the limit, so a
        flood of them cannot flood the log."""
        if addr is None:  # a Unix socket
            return True
        with self._open_lock:
            held = self._open.get(addr, 0)
            if held < self.max_per_address:
                self._open[addr] = held + 1
                return True
            first = addr not in self._refusing
            self._refusing.add(addr)
        if first:
            self.error_log(
                f"Client {addr} holds {held} connections, the most one address may "
                "(serve --max-connections-per-address): refusing more until some close"
            )
        return False

    def connection_closed(self, addr: str | None) -> None:
        if addr is None:
            return
        with self._open_lock:
            held = self._open.get(addr, 0) - 1
            if held > 0:
                self._open[addr] = held
            else:
                self._open.pop(addr, None)
            if held < self.max_per_address:
                self._refusing.discard(addr)


def build_server(
    app: Flask,
    host: str,
    port: int,
    ca: CertificateAuthority,
    state_dir: Path,
    threads: int = 32,
    extra_names: tuple[str, ...] = (),
    trusted: tuple[str, ...] = (),
    max_per_address: int = 64,
) -> wsgi.Server:
    cert_path, key_path = ca.write_server_cert(state_dir, host, wall_now(), extra_names)
    server = _Server(
        (host, port),
        app,
        numthreads=threads,
        server_name="vectorlay-control-plane",
        # cheroot's default listen backlog is 5: a burst of nodes overflowing it waits out a 1 s
        # SYN retransmit each.
        request_queue_size=256,
        max_per_address=max_per_address,
        max_busy_per_address=max(1, threads // 4),
    )
    server.ConnectionClass = _TLSConnection
    server.gateway = _Gateway
    adapter = _TLSAdapter(str(cert_path), str(key_path), certificate_chain=str(state_dir / "ca.crt"))
    ctx = adapter.context
    for pem in trusted:  # a new CA during a rotation: its client certificates are accepted too
        ctx.load_verify_locations(cadata=pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_OPTIONAL
    # Sessions stay in the server's cache; the TLS 1.3 ticket only names one (module docstring).
    ctx.options |= ssl.OP_NO_TICKET
    # A client closing its keep-alive connection without a close_notify (requests, curl) ends it,
    # as in OpenSSL 1.1: OpenSSL 3 calls that a fatal error, which drops the session from the cache.
    # Requests are framed by Content-Length or chunks, so a cut one is still an incomplete request.
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    # One ticket per handshake instead of OpenSSL's two: a node keeps only the last one it got
    # (bootstrap.api), and each ticket is a session the cache keeps until it expires.
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


# SO_ATTACH_REUSEPORT_CBPF (asm-generic/socket.h) and the classic BPF opcodes (linux/filter.h).
_SO_ATTACH_REUSEPORT_CBPF = 51
_SKF_NET_OFF = -0x100000  # loads relative to the IP header
_LD_B_ABS, _LD_W_ABS = 0x30, 0x20
_ALU_RSH_K, _ALU_MOD_K = 0x74, 0x94
_JMP_JEQ_K, _JMP_JA = 0x15, 0x05
_RET_A = 0x16


def _affinity_program(workers: int) -> bytes:
    """Classic BPF for a reuseport group: the index of the socket that takes a new connection, the
    client's IPv4 address (or the last 32 bits of its IPv6 one) modulo `workers`."""

    def op(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)

    return b"".join(
        (
            op(_LD_B_ABS, _SKF_NET_OFF),  # the IP version nibble
            op(_ALU_RSH_K, 4),
            op(_JMP_JEQ_K, 6, jt=0, jf=2),
            op(_LD_W_ABS, _SKF_NET_OFF + 20),  # IPv6: source address, last word
            op(_JMP_JA, 1),
            op(_LD_W_ABS, _SKF_NET_OFF + 12),  # IPv4: source address
            op(_ALU_MOD_K, workers),
            op(_RET_A),
        )
    )


def worker_affinity(sock: socket.socket, workers: int) -> None:
    """Have the kernel hand every connection from one client address to the same socket of the
    SO_REUSEPORT group `sock` is in, so to the same worker process: the one holding that node's TLS
    session (module docstring). Without it the kernel picks by a hash of both addresses and ports,
    a node's next connection came from another port, and `workers - 1` in `workers` of its
    heartbeats would miss the session and pay a full handshake. The index is the socket's place in
    the group; a group smaller than `workers` (a worker gone) falls back to the kernel's hash."""
    program = _affinity_program(workers)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HP", len(program) // 8, ctypes.addressof(buf))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)


def prepare(server: wsgi.Server, workers: int) -> None:
    """Bind and listen (cheroot's prepare), then join the worker processes' affinity."""
    server.prepare()
    if workers > 1:
        assert server.socket is not None
        worker_affinity(server.socket, workers)


def fork_workers(server: wsgi.Server, count: int) -> tuple[list[int], int]:
    """`count` more processes serving `server`'s port, forked before any thread starts; returns
    their pids and a pipe each writes a byte to once it listens, for workers_listening (in the
    parent; a child serves until SIGTERM and exits there).

    Each process keeps the TLS sessions it made, and the kernel hands a client's connections to
    the same process (worker_affinity), so a node resumes its session there. Processes, because
    one Python process serves a heartbeat holding the GIL for most of it: on more cores than one,
    one process is the limit. Each worker binds its own listening socket
    (SO_REUSEPORT, which only processes of this user can join) and opens its own database
    connections; writes from all of them queue on the database's write lock (db.Database).
    """
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    ready_r, ready_w = os.pipe()
    for _ in range(count):
        pid = os.fork()
        if pid:
            pids.append(pid)
            continue
        code = 0
        try:
            os.close(ready_r)
            _die_with(parent)
            prepare(server, count + 1)
            os.write(ready_w, b".")
            os.close(ready_w)
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
    os.close(ready_w)
    return pids, ready_r


def workers_listening(ready: int, count: int, timeout: float = 60.0) -> bool:
    """Whether all `count` workers of fork_workers listen (each wrote its byte to `ready`) within
    `timeout`: until then the port's group is short of them, and the kernel hands a node's
    connections to a process other than the one it will have later."""
    got = 0
    deadline = time.monotonic() + timeout
    try:
        while got < count:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ready], [], [], left)[0]:
                return False
            data = os.read(ready, count - got)
            if not data:  # every worker closed its end: one exited before listening
                return False
            got += len(data)
        return True
    finally:
        os.close(ready)


def _die_with(parent: int) -> None:
    """SIGTERM this process when its parent dies: a worker must not outlive the server it is part of."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
