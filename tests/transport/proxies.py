"""HTTP proxies for the tests: Debian's tinyproxy (package tinyproxy-bin), run unprivileged-style in
the foreground with its own configuration file in a temp directory, and a TLS-intercepting stand-in.

The stand-in answers CONNECT as RFC 9110 section 9.3.6 says (a 2xx opens the tunnel; what follows
is the client's TLS), then does what intercepting proxies do: terminates the TLS itself with a
certificate of its own, which the node must refuse.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.transport import faults

TINYPROXY = shutil.which("tinyproxy")


@dataclass
class Tinyproxy:
    url: str
    log_path: Path

    def connects(self) -> list[str]:
        """The CONNECT targets tinyproxy logged, in order (its `LogLevel Connect` lines)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/1\.[01]", text)


def _free_port(address: str, netns: Sequence[str]) -> int:
    if netns:  # the port only has to be free in the namespace: pick one above the ephemeral range
        return 20000 + os.getpid() % 10000
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


@contextmanager
def tinyproxy(
    workdir: Path, *, listen: str = "127.0.0.1", allow: str = "127.0.0.1", netns: Sequence[str] = ()
) -> Iterator[Tinyproxy]:
    """tinyproxy in the foreground (-d) on `listen`, allowing clients from `allow`, logging every
    CONNECT; `netns` prefixes its command (`ip netns exec NS`)."""
    assert TINYPROXY is not None, "tinyproxy is not installed (apt-get install tinyproxy-bin)"
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port(listen, netns)
    log_path = workdir / "tinyproxy.log"
    conf = workdir / "tinyproxy.conf"
    # tinyproxy.conf(5): no ConnectPort line allows CONNECT to every port.
    conf.write_text(
        f"Port {port}\nListen {listen}\nTimeout 60\nMaxClients 50\nAllow {allow}\n"
        f'LogFile "{log_path}"\nLogLevel Connect\nPidFile "{workdir / "tinyproxy.pid"}"\n'
    )
    out = (workdir / "tinyproxy.out").open("wb")
    proc = subprocess.Popen([*netns, TINYPROXY, "-d", "-c", str(conf)], stdout=out, stderr=out)
    out.close()
    try:
        deadline = time.monotonic() + 10
        while "Reloading config file finished" not in (log_path.read_text() if log_path.exists() else ""):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tinyproxy did not start: {(workdir / 'tinyproxy.out').read_text()}")
            time.sleep(0.05)
        time.sleep(0.1)  # it listens right after reading its configuration
        yield Tinyproxy(f"http://{listen}:{port}", log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def intercepting(pki: faults.Pki, seen: list[bytes]) -> faults.Handler:
    """A CONNECT proxy that opens the tunnel (200) and then plays the server itself with `pki`'s
    certificate, as a TLS-inspecting proxy does."""
    ctx = pki.server_context()

    def handler(sock: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                return
            head += chunk
        seen.append(head)
        sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            with ctx.wrap_socket(sock, server_side=True) as tls:
                faults.read_request(tls)
                seen.append(b"a request reached the interceptor")
        except (ssl.SSLError, OSError):
            pass

    return handler


def refusing(status: bytes) -> faults.Handler:
    """A proxy that answers every CONNECT with `status` (e.g. 407 Proxy Authentication Required)."""

    def handler(sock: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                return
            head += chunk
        sock.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")

    return handler
