"""Clients that hold the control plane's connections without making requests do not stop it serving
the nodes' heartbeats (controlplane.server: handshakes and the wait for a request's first byte in
the selector, not in a worker thread; a limit on the connections one address holds).

The server here runs 4 worker threads, so that a few hostile connections would be enough to hold
all of them the way cheroot hands out connections; the figures under load are the benchmark's
(benchmarks/test_bench_heartbeat.py)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bootstrap.api import ApiClient, ClientCert
from controlplane import testing
from tests.controlplane.cp_nodes import Enrolled
from tests.controlplane.hostile import holding
from tests.controlplane.test_cp_tls import BEAT

THREADS = 4


def _address(cp: testing.RunningControlPlane) -> tuple[str, int]:
    url = urlsplit(cp.url)
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port


def _beats(cp: testing.RunningControlPlane, node: Enrolled, count: int) -> list[Any]:
    api = ApiClient(
        cp.url, ca_file=cp.ca_file, client_cert=ClientCert(node.cert_file, node.key_file), attempts=1
    )
    try:
        answers = []
        for _ in range(count):
            # The node's client makes a new connection (and a full handshake) for each request.
            answers.append(api.request("POST", "/v1/node/heartbeat", json=BEAT, bearer=node.token))
        return answers
    finally:
        api.close()


@pytest.fixture
def small_cp(start_control_plane: Any) -> testing.RunningControlPlane:
    cp: testing.RunningControlPlane = start_control_plane(args=("--threads", str(THREADS)))
    return cp


def test_heartbeats_succeed_while_idle_and_half_handshake_clients_outnumber_the_worker_threads(
    small_cp: testing.RunningControlPlane, tmp_path: Path
) -> None:
    small_cp.org("acme")
    node = Enrolled(small_cp, "acme", tmp_path / "n")
    host, port = _address(small_cp)
    with holding(host, port, idle=100, half_hello=64) as hostile:
        time.sleep(0.5)  # let the server accept them all before the node's turn
        answers = _beats(small_cp, node, 5)
        # Still held, not refused: the server coped with them, it did not just drop them.
        assert hostile.held() == 164 and hostile.reopened == 0
    assert [a["status"] for a in answers] == ["active"] * 5


def test_clients_that_finish_the_handshake_and_then_send_nothing_hold_no_worker_thread(
    small_cp: testing.RunningControlPlane, tmp_path: Path
) -> None:
    small_cp.org("acme")
    node = Enrolled(small_cp, "acme", tmp_path / "n")
    host, port = _address(small_cp)
    ctx = ssl.create_default_context(cafile=str(small_cp.ca_file))
    silent = []
    try:
        for i in range(THREADS * 4):
            raw = socket.create_connection((host, port), timeout=30, source_address=(f"127.1.2.{i + 1}", 0))
            silent.append(ctx.wrap_socket(raw, server_hostname=host))
        answers = _beats(small_cp, node, 3)
    finally:
        for s in silent:
            s.close()
    assert [a["status"] for a in answers] == ["active"] * 3


def test_clients_that_trickle_their_requests_hold_a_quarter_of_the_threads_not_all(
    small_cp: testing.RunningControlPlane, tmp_path: Path
) -> None:
    """Slowloris: each request's headers arrive a line at a time, each line within the server's
    socket timeout, for as long as the client likes. From one address, they hold THREADS // 4 of the
    worker threads (one here); the rest wait for those, and the nodes' heartbeats go through."""
    small_cp.org("acme")
    node = Enrolled(small_cp, "acme", tmp_path / "n")
    host, port = _address(small_cp)
    ctx = ssl.create_default_context(cafile=str(small_cp.ca_file))
    slow: list[ssl.SSLSocket] = []
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.3):
            for s in slow:
                with contextlib.suppress(OSError):
                    s.sendall(b"X-Slow: 1\r\n")

    dripper = threading.Thread(target=trickle, daemon=True)
    try:
        for _ in range(THREADS * 3):
            raw = socket.create_connection((host, port), timeout=30, source_address=("127.1.5.1", 0))
            tls = ctx.wrap_socket(raw, server_hostname=host)
            tls.sendall(f"POST /v1/node/heartbeat HTTP/1.1\r\nHost: {host}\r\n".encode())
            slow.append(tls)
        dripper.start()
        time.sleep(0.5)  # every slow request is with the server before the node's
        answers = _beats(small_cp, node, 3)
    finally:
        stop.set()
        if dripper.is_alive():
            dripper.join()
        for s in slow:
            s.close()
    assert [a["status"] for a in answers] == ["active"] * 3


def _https_status(cp: testing.RunningControlPlane, source: str) -> bytes:
    """The status line of GET / from `source`, or b"" when the server closed the connection first."""
    host, port = _address(cp)
    ctx = ssl.create_default_context(cafile=str(cp.ca_file))
    with socket.create_connection((host, port), timeout=30, source_address=(source, 0)) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                return tls.recv(4096).split(b"\r\n", 1)[0]
        except (ssl.SSLError, ConnectionError):
            return b""


def test_one_address_holds_at_most_its_limit_of_connections_and_others_are_still_served(
    start_control_plane: Any, tmp_path: Path
) -> None:
    cp: testing.RunningControlPlane = start_control_plane(args=("--max-connections-per-address", "3"))
    cp.org("acme")
    node = Enrolled(cp, "acme", tmp_path / "n")
    host, port = _address(cp)
    held = [
        socket.create_connection((host, port), timeout=30, source_address=("127.1.3.1", 0)) for _ in range(3)
    ]
    try:
        assert _https_status(cp, "127.1.3.1") == b""  # the 4th: closed at accept
        assert _https_status(cp, "127.1.3.2").startswith(b"HTTP/1.1 ")  # another address: served
        assert [a["status"] for a in _beats(cp, node, 2)] == ["active"] * 2
        held.pop().close()
        # Served again once one of its connections is gone (the server sees the close soon after).
        for _ in range(50):
            if (status := _https_status(cp, "127.1.3.1")).startswith(b"HTTP/1.1 "):
                break
            time.sleep(0.1)
        assert status.startswith(b"HTTP/1.1 "), status
    finally:
        for s in held:
            s.close()
    log = cp.log()
    # Said once, not once per refused connection.
    assert log.count("Client 127.1.3.1 holds 3 connections") == 1, log[-2000:]
