"""Servers on loopback that misbehave as a broken network or a hostile control plane does (issue 22,
classes 2 to 4): they fail the TLS handshake in each way a real peer can, redirect, drip, or send
more than any answer should be. Each runs in a thread of the test process and counts what reached it.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from controlplane.pki import CertificateAuthority

# A fatal TLS alert record: content type 21, TLS 1.2 record version, length 2, level 2 (fatal),
# description 40 (handshake_failure) - RFC 8446 section 6.
HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"
PLAIN_HTTP_400 = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\nConnection: close\r\n\r\nBad Request"


@dataclass
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx


def make_pki(where: Path) -> Pki:
    """A CA and a server certificate for 127.0.0.1 and localhost, as the control plane makes them."""
    where.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    ca = CertificateAuthority.load_or_create(where, now)
    cert, key = ca.write_server_cert(where, "127.0.0.1", now)
    return Pki(where / "ca.crt", cert, key)


Handler = Callable[[socket.socket], None]


@dataclass
class Server:
    port: int
    connections: int = 0
    received: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@contextmanager
def serving(handler: Handler) -> Iterator[Server]:
    """Accept connections on 127.0.0.1 and hand each to `handler` in a thread of its own."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)  # so that the accept loop sees `stop`
    server = Server(listener.getsockname()[1])
    stop = threading.Event()

    def one(conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(30)
                handler(conn)
            except OSError:
                pass  # the client gave up first: what these servers are for

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server.connections += 1
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def read_request(sock: socket.socket) -> bytes:
    """One HTTP request: its header block and the body its Content-Length announces."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


# --- handshake faults: the server never completes TLS ------------------------------------------


def close_in_handshake(sock: socket.socket) -> None:
    sock.recv(65536)  # the ClientHello


def reset_in_handshake(sock: socket.socket) -> None:
    sock.recv(65536)
    # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def alert_in_handshake(sock: socket.socket) -> None:
    sock.recv(65536)
    sock.sendall(HANDSHAKE_FAILURE_ALERT)


def plain_http(sock: socket.socket) -> None:
    sock.recv(65536)
    sock.sendall(PLAIN_HTTP_400)


def tls11_only(pki: Pki) -> Handler:
    ctx = pki.server_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated is what this server is
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses TLS 1.1 at its default level

    def handler(sock: socket.socket) -> None:
        with ctx.wrap_socket(sock, server_side=True):
            pass

    return handler


def silent(sock: socket.socket) -> None:
    """Accepts and never says a word (an idle peer, a black-holing middlebox)."""
    time.sleep(30)


HANDSHAKE_FAULTS: dict[str, Callable[[Pki], Handler]] = {
    "closed during the handshake": lambda pki: close_in_handshake,
    "reset during the handshake": lambda pki: reset_in_handshake,
    "a TLS alert": lambda pki: alert_in_handshake,
    "a plain-HTTP answer": lambda pki: plain_http,
    "a server offering only TLS 1.1": tls11_only,
}


# --- answer faults: TLS works, the answer is hostile --------------------------------------------


def over_tls(
    pki: Pki, answer: Callable[[ssl.SSLSocket, bytes, Server], None], server_of: list[Server]
) -> Handler:
    """Complete the handshake, read the request, record it, then `answer`."""
    ctx = pki.server_context()

    def handler(sock: socket.socket) -> None:
        with ctx.wrap_socket(sock, server_side=True) as tls:
            request = read_request(tls)
            server_of[0].received.append(request)
            answer(tls, request, server_of[0])

    return handler


@contextmanager
def tls_server(pki: Pki, answer: Callable[[ssl.SSLSocket, bytes, Server], None]) -> Iterator[Server]:
    holder: list[Server] = []
    with serving(over_tls(pki, answer, holder)) as server:
        holder.append(server)
        yield server


def redirect(status: int, location: str) -> Callable[[ssl.SSLSocket, bytes, Server], None]:
    def answer(tls: ssl.SSLSocket, request: bytes, server: Server) -> None:
        tls.sendall(
            f"HTTP/1.1 {status} Moved\r\nLocation: {location}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )

    return answer


def drip(head: bytes, every: float) -> Callable[[ssl.SSLSocket, bytes, Server], None]:
    """Send `head`, then one byte every `every` seconds for as long as the client listens."""

    def answer(tls: ssl.SSLSocket, request: bytes, server: Server) -> None:
        tls.sendall(head)
        while True:
            time.sleep(every)
            tls.sendall(b"x")

    return answer


CHUNK = b"\0" * (1 << 16)


def huge(total: int, *, announce: bool) -> Callable[[ssl.SSLSocket, bytes, Server], None]:
    """A 200 answer of `total` bytes, its length announced, or sent chunked with none."""

    def answer(tls: ssl.SSLSocket, request: bytes, server: Server) -> None:
        if announce:
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nContent-Type: application/json\r\n\r\n"
            tls.sendall(head.encode())
            frame = CHUNK
        else:
            tls.sendall(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
            )
            frame = f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n"
        sent = 0
        while sent < total:
            tls.sendall(frame)
            sent += len(CHUNK)

    return answer


def record_plain(sock: socket.socket, server_of: list[Server]) -> None:
    """A plain-HTTP listener that keeps whatever a client sends it."""
    sock.settimeout(2)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        pass
    server_of[0].received.append(data)


@contextmanager
def plain_recorder() -> Iterator[Server]:
    holder: list[Server] = []
    with serving(lambda sock: record_plain(sock, holder)) as server:
        holder.append(server)
        yield server
