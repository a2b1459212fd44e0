"""`serve --workers N`: several server processes on one port (SO_REUSEPORT), forked from one.

The kernel hands every connection from one client address to the same process (server.worker_affinity,
a BPF program on the port's group), the one holding that node's TLS session, so the node resumes it
and still authenticates as itself there; each keeps the control plane's clock offset; they write
through the database's one write lock; and none outlives the server."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sqlite3
import ssl
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from bootstrap.api import ApiClient, ClientCert
from controlplane import testing
from controlplane.artifacts import ManifestSerial
from controlplane.clock import Clock, from_iso
from controlplane.server import worker_affinity, workers_listening
from tests.controlplane.cp_nodes import Enrolled, heartbeat_request
from tests.controlplane.test_cp_tls import BEAT


def _workers(cp: testing.RunningControlPlane) -> list[int]:
    pid = cp.proc.pid
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def _opened(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def _taker(cp: testing.RunningControlPlane, conn: socket.socket) -> int:
    """The pid of the server process holding the other end of `conn` (its accepted socket)."""
    ip, port = conn.getsockname()[:2]
    want = f"{socket.htonl(int.from_bytes(socket.inet_aton(ip), 'big')):08X}:{port:04X}"
    for _ in range(100):  # the server's accept may trail the client's connect
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[2] == want and fields[9] != "0":
                inode = f"socket:[{fields[9]}]"
                for pid in [cp.proc.pid, *_workers(cp)]:
                    if any(os.readlink(fd) == inode for fd in Path(f"/proc/{pid}/fd").iterdir()):
                        return pid
        time.sleep(0.05)
    raise AssertionError(f"no server process holds the connection from {ip}:{port}")


def _beat(
    ctx: ssl.SSLContext,
    cp: testing.RunningControlPlane,
    source: str,
    node: Enrolled,
    sessions: dict[str, ssl.SSLSession],
) -> tuple[int, bool]:
    """One heartbeat of `node` from the address `source`, on a new connection offering the node's
    last TLS session: (the server process that took it, whether it resumed the session)."""
    host, port = cp.url.removeprefix("https://").rsplit(":", 1)
    body = json.dumps(BEAT).encode()
    request = heartbeat_request(host, port, node.token, body)
    raw = socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0))
    with ctx.wrap_socket(raw, server_hostname=host, session=sessions.get(source)) as tls:
        pid = _taker(cp, tls)
        tls.sendall(request)
        answer = b""
        while chunk := tls.recv(65536):  # the server closes after the answer
            answer += chunk
        resumed = bool(tls.session_reused)
        if tls.session is not None:  # read after the answer: TLS 1.3 tickets come with it
            sessions[source] = tls.session
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"status":"active"' in answer, answer[:300]
    return pid, resumed


@pytest.mark.slow
def test_workers_take_each_node_in_one_process_where_it_resumes_and_keep_the_clock_offset(
    tmp_path: Path,
) -> None:
    offset = 3600
    cp = testing.start(
        tmp_path / "cp", args=("--workers", "2"), env={"VECTORLAY_CP_CLOCK_OFFSET": str(offset)}
    )
    try:
        (worker,) = _workers(cp)
        cp.admin.clock = Clock(offset)  # tokens minted on the server's clock, as its admin CLI would
        cp.org("acme")
        nodes = [Enrolled(cp, "acme", tmp_path / f"n{i}") for i in range(4)]
        # Each node from an address of its own, as real nodes are: 127.0.0.2 to 127.0.0.5.
        sources = [f"127.0.0.{2 + i}" for i in range(len(nodes))]
        apis = [
            ApiClient(cp.url, ca_file=cp.ca_file, client_cert=ClientCert(n.cert_file, n.key_file))
            for n in nodes
        ]
        ctxs = [api._context() for api in apis]  # each node's context: its certificate
        sessions: dict[str, ssl.SSLSession] = {}
        takers: dict[str, set[int]] = {src: set() for src in sources}
        resumed = dict.fromkeys(sources, 0)
        for _ in range(10):
            for ctx, src, node in zip(ctxs, sources, nodes, strict=True):
                pid, again = _beat(ctx, cp, src, node, sessions)
                takers[src].add(pid)
                resumed[src] += again
        for api in apis:
            api.close()
        # One process per address, the address modulo the two workers: 2 and 4 in one, 3 and 5 in
        # the other. Every connection after each node's first resumed its session there.
        assert all(len(pids) == 1 for pids in takers.values()), takers
        assert takers[sources[0]] == takers[sources[2]] != takers[sources[1]] == takers[sources[3]]
        assert set().union(*takers.values()) == {cp.proc.pid, worker}
        assert resumed == dict.fromkeys(sources, 9)
        assert _opened(worker, cp.db_path) and _opened(cp.proc.pid, cp.db_path)
        db = sqlite3.connect(cp.db_path)
        rows = db.execute("SELECT node_id, received_at, heartbeats FROM node_heartbeats").fetchall()
        db.close()
        assert sorted(r[0] for r in rows) == sorted(n.answer["node_id"] for n in nodes)
        shifted = datetime.now(timezone.utc) + timedelta(seconds=offset)
        for _node_id, received_at, count in rows:
            assert count == 10
            assert abs((from_iso(received_at) - shifted).total_seconds()) < 120
    finally:
        testing.stop(cp)
    assert _gone(worker)


def _accepting(listeners: list[socket.socket], source: tuple[str, int], family: int) -> int:
    """Which of `listeners` the kernel hands a connection from `source` to."""
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.bind(source)
        client.connect(listeners[0].getsockname()[:2])
        ready, _, _ = select.select(listeners, [], [], 10)
        assert len(ready) == 1, ready
        conn, _ = ready[0].accept()
        conn.close()
        return listeners.index(ready[0])


def _group(family: int, host: str, size: int) -> list[socket.socket]:
    listeners: list[socket.socket] = []
    for _ in range(size):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, listeners[0].getsockname()[1] if listeners else 0))
        sock.listen(16)
        worker_affinity(sock, size)
        listeners.append(sock)
    return listeners


def test_worker_affinity_hands_one_client_address_to_one_socket_of_the_group() -> None:
    listeners = _group(socket.AF_INET, "127.0.0.1", 3)
    try:
        for last in range(2, 14):
            source = f"127.0.0.{last}"
            taken = {_accepting(listeners, (source, 0), socket.AF_INET) for _ in range(6)}
            # The address as a 32-bit number, modulo the group's size: the socket's place in it.
            assert taken == {(0x7F000000 + last) % 3}, (source, taken)
    finally:
        for sock in listeners:
            sock.close()


def test_worker_affinity_reads_the_low_word_of_an_ipv6_client_address() -> None:
    if not socket.has_ipv6 or not Path("/proc/net/if_inet6").read_text().strip():
        raise AssertionError("this test needs IPv6 on loopback (::1)")
    listeners = _group(socket.AF_INET6, "::1", 3)
    try:
        # ::1 ends in 1: the second socket, every time (reading IPv4's offset would give the first).
        assert {_accepting(listeners, ("::1", 0), socket.AF_INET6) for _ in range(6)} == {1}
    finally:
        for sock in listeners:
            sock.close()


def test_a_worker_does_not_outlive_a_killed_server(tmp_path: Path) -> None:
    cp = testing.start(tmp_path / "cp", args=("--workers", "3"))
    try:
        workers = _workers(cp)
        assert len(workers) == 2
        os.kill(cp.proc.pid, signal.SIGKILL)
        cp.proc.wait()
        assert all(_gone(w) for w in workers)
    finally:
        testing.stop(cp)


def test_workers_number_the_artifact_set_from_one_serial_file(tmp_path: Path) -> None:
    # Two workers' serials on one state dir; the first sees the set change twice, the second
    # sees only the last set: it must not hand out a serial lower than one a node already has.
    a, b = ManifestSerial(tmp_path), ManifestSerial(tmp_path)
    assert a.for_digest("d1") == b.for_digest("d1") == 1
    assert a.for_digest("d2") == 2
    assert a.for_digest("d3") == 3
    assert b.for_digest("d3") == 3
    assert b.for_digest("d2") == 4  # a set seen before is a change all the same
    assert a.for_digest("d2") == 4 and a.for_digest("d2") == 4
    assert ManifestSerial(tmp_path).for_digest("d2") == 4


def test_serving_waits_for_every_worker_and_not_for_one_that_died() -> None:
    r, w = os.pipe()
    os.write(w, b"..")
    assert workers_listening(r, 2, timeout=5)
    os.close(w)
    # One worker listened and the other exited before it did: its end of the pipe closed unwritten.
    r, w = os.pipe()
    os.write(w, b".")
    os.close(w)
    assert not workers_listening(r, 2, timeout=5)
    # A worker that neither listens nor exits: given up on at the timeout.
    r, w = os.pipe()
    try:
        assert not workers_listening(r, 1, timeout=0.2)
    finally:
        os.close(w)
