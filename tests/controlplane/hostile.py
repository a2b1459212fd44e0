"""Clients that hold the control plane's connections open without ever making a request: TCP
connections that send nothing, and TLS handshakes stopped halfway through the ClientHello. Each
comes from an address of its own on loopback (127.1.0.0/16), as a botnet's would. A thread keeps
their number up: one the server closes (its handshake deadline) is opened again at once."""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress


def client_hello(server_name: str) -> bytes:
    """The ClientHello Python's ssl sends to `server_name`: the first flight of a real handshake."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", "not a TLS handshake record"
    return hello


class _Holder:
    def __init__(self, host: str, port: int, idle: int, half_hello: int, first_source: int) -> None:
        self.addr = (host, port)
        self.half = client_hello(host)[:100]  # record header and part of the hello: never complete
        self.sel = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.reopened = 0
        self.slots = [(first_source + i, i >= idle) for i in range(idle + half_hello)]
        for slot in self.slots:
            self.open(slot)

    def open(self, slot: tuple[int, bool]) -> None:
        source, half = slot
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((socket.inet_ntoa((0x7F010000 + source).to_bytes(4, "big")), 0))
        sock.connect(self.addr)
        if half:
            sock.sendall(self.half)
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, slot)

    def held(self) -> int:
        return len(self.sel.get_map())

    def run(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.sel.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if data:  # the server answered something (an alert): keep holding
                    continue
                self.sel.unregister(sock)
                sock.close()
                if not self.stop.is_set():
                    self.open(key.data)
                    self.reopened += 1

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()


@contextmanager
def holding(host: str, port: int, *, idle: int, half_hello: int, first_source: int = 1) -> Iterator[_Holder]:
    """`idle` silent TCP connections and `half_hello` half-sent ClientHellos held open on (host,
    port) while the block runs, from 127.1.0.<first_source> on."""
    holder = _Holder(host, port, idle, half_hello, first_source)
    thread = threading.Thread(target=holder.run, daemon=True)
    thread.start()
    try:
        yield holder
    finally:
        holder.stop.set()
        thread.join(timeout=10)
        holder.close()
