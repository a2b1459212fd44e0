"""`serve --workers N`: several server processes on one port (SO_REUSEPORT), forked from one.

They share the TLS context, so a node resumes its session whichever process takes its connection,
and still authenticates as itself there; each keeps the control plane's clock offset; they write
through the database's one write lock; and none outlives the server."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bootstrap.api import ApiClient, ClientCert
from controlplane import testing
from controlplane.artifacts import ManifestSerial
from controlplane.clock import Clock, from_iso
from tests.controlplane.cp_nodes import Enrolled
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


def test_workers_share_the_port_and_the_ticket_key_and_keep_the_clock_offset(tmp_path: Path) -> None:
    offset = 3600
    cp = testing.start(
        tmp_path / "cp", args=("--workers", "2"), env={"VECTORLAY_CP_CLOCK_OFFSET": str(offset)}
    )
    try:
        (worker,) = _workers(cp)
        cp.admin.clock = Clock(offset)  # tokens minted on the server's clock, as its admin CLI would
        cp.org("acme")
        nodes = [Enrolled(cp, "acme", tmp_path / f"n{i}") for i in range(4)]
        apis = [
            ApiClient(cp.url, ca_file=cp.ca_file, client_cert=ClientCert(n.cert_file, n.key_file))
            for n in nodes
        ]
        try:
            for _ in range(10):
                for node, api in zip(nodes, apis, strict=True):
                    api.session().close()  # a new connection for every heartbeat, as a node's
                    answer = api.request("POST", "/v1/node/heartbeat", json=BEAT, bearer=node.token)
                    assert answer["status"] == "active"
            # Every connection after each node's first resumed its session, whichever process
            # took it; 40 connections spread over two by the kernel's hash leave none untouched.
            assert [api.resumed_connections for api in apis] == [9] * 4
        finally:
            for api in apis:
                api.close()
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
