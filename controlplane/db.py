"""SQLite storage: one connection per thread, WAL, and schema migrations kept in code.

`MIGRATIONS` is append-only: each entry moves the schema from version i to i+1 and the database
records where it is in `PRAGMA user_version`. Opening a database applies whatever is missing, inside
one transaction per step, so a crash mid-migration leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

MIGRATIONS: tuple[str, ...] = (
    # 1: orgs, their API keys, provisioning tokens, nodes and their GPU units.
    """
    CREATE TABLE orgs (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        is_provider INTEGER NOT NULL DEFAULT 0,
        node_quota  INTEGER,                     -- NULL: no limit
        created_at  TEXT NOT NULL
    );
    CREATE TABLE api_keys (
        key_hash    TEXT PRIMARY KEY,
        org_id      TEXT NOT NULL REFERENCES orgs(id),
        created_at  TEXT NOT NULL,
        revoked_at  TEXT
    );
    CREATE TABLE provisioning_tokens (
        token_hash  TEXT PRIMARY KEY,
        org_id      TEXT NOT NULL REFERENCES orgs(id),
        created_at  TEXT NOT NULL,
        expires_at  TEXT NOT NULL,
        used_at     TEXT,
        -- which key pair consumed it: a retried request from the same node is answered again
        used_by_key TEXT,
        used_for_node TEXT
    );
    CREATE TABLE nodes (
        id            TEXT PRIMARY KEY,
        org_id        TEXT NOT NULL REFERENCES orgs(id),
        seq           INTEGER NOT NULL UNIQUE,    -- drives the overlay address
        overlay_ip    TEXT NOT NULL UNIQUE,
        hostname      TEXT NOT NULL,
        gpu_mode      TEXT NOT NULL,
        hardware      TEXT NOT NULL,              -- JSON as reported at the last enrollment
        status        TEXT NOT NULL CHECK (status IN ('active', 'removed')),
        -- The credentials the node holds. A rotation is two-phase: the new pair is `pending` until
        -- the node first uses it, and the current pair keeps working until then, so a node that
        -- crashed before saving its new identity still has a working one.
        cert_fp       TEXT NOT NULL,
        token_hash    TEXT NOT NULL,
        pending_cert_fp    TEXT,
        pending_token_hash TEXT,
        enrollments   INTEGER NOT NULL DEFAULT 1,
        created_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL
    );
    CREATE INDEX nodes_org ON nodes(org_id);
    CREATE TABLE gpu_units (
        node_id     TEXT NOT NULL REFERENCES nodes(id),
        iommu_group TEXT NOT NULL,
        gpus        TEXT NOT NULL,                -- JSON list of PCI addresses
        status      TEXT NOT NULL,                -- as the node reported it
        allocatable INTEGER NOT NULL,             -- 0 once the node is removed
        PRIMARY KEY (node_id, iommu_group)
    );
    """,
    # 2: the last heartbeat of each node (node-agent): what the advertising rule decides from.
    """
    CREATE TABLE node_heartbeats (
        node_id     TEXT PRIMARY KEY REFERENCES nodes(id),
        received_at TEXT NOT NULL,                -- the control plane's clock
        interval_s  INTEGER NOT NULL,             -- the node's declared heartbeat interval
        verdict     TEXT NOT NULL CHECK (verdict IN ('PASS', 'WARN', 'FAIL')),
        units_ready INTEGER NOT NULL,             -- as the node's doctor claims
        units_total INTEGER NOT NULL,
        draining    INTEGER NOT NULL,
        resources   TEXT NOT NULL,                -- JSON: cpu_percent, memory_percent, disk_percent, ...
        thresholds  TEXT NOT NULL,                -- JSON: the load limits in force for this node
        agents      TEXT NOT NULL,                -- JSON: agent name -> version
        checks      TEXT NOT NULL,                -- JSON: the doctor's checks
        heartbeats  INTEGER NOT NULL              -- how many were received
    );
    """,
    # 3: every certificate issued to a node (enrollment, renewal), so that an operator sees when
    # each credential a node holds expires, and removing the node revokes them all: the overlay
    # hosts' `pki.blocklist` is the revoked nebula certificates that have not expired. `batch` is
    # the fingerprint of the client certificate issued with it: the set whose client certificate is
    # the node's current one is what it holds.
    """
    CREATE TABLE node_certificates (
        node_id     TEXT NOT NULL REFERENCES nodes(id),
        kind        TEXT NOT NULL CHECK (kind IN ('node', 'nebula', 'nomad')),
        serial      TEXT NOT NULL,                -- X.509 serial (hex), or the nebula fingerprint
        batch       TEXT NOT NULL,
        issued_at   TEXT NOT NULL,                -- the control plane's clock
        not_after   TEXT NOT NULL,
        revoked_at  TEXT,                         -- set when the node is removed
        PRIMARY KEY (node_id, kind, serial)
    );
    CREATE INDEX node_certificates_batch ON node_certificates(batch);
    """,
    # 4: the per-unit state of the last heartbeat (controlplane.units): JSON [[id, status, [message,
    # ...]], ...], NULL from an agent that reports no units (the node-level count rule applies).
    """
    ALTER TABLE node_heartbeats ADD COLUMN units TEXT;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION; returns the version found before."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema version {found} is newer than this control plane's ({SCHEMA_VERSION})"
        )
    for version in range(found, SCHEMA_VERSION):
        # executescript() commits first; the explicit BEGIN makes the step and the version bump one
        # transaction.
        conn.executescript(
            f"BEGIN IMMEDIATE;\n{MIGRATIONS[version]}\nPRAGMA user_version = {version + 1};\nCOMMIT;"
        )
    return found


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL: an enrollment the node was told about must survive a power cut of the control plane. A
    # heartbeat's transaction lowers it to NORMAL for itself (controlplane.store.Store.write).
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


class Database:
    """Per-thread connections to one SQLite file (sqlite3 connections must not be shared)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._thread_lock = threading.Lock()
        self._lock_fd: tuple[int, int] | None = None  # (pid, fd)
        migrate(self.conn())

    def conn(self, *, durable: bool | None = None) -> sqlite3.Connection:
        """This thread's connection; for a write, `durable` sets whether its commit waits for an
        fsync (synchronous FULL, the default of a new connection) or not (NORMAL). The setting stays
        until a write asks for the other, so a thread taking heartbeats does not switch per request."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
            self._local.durable = True
        if durable is not None and durable != self._local.durable:
            conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            self._local.durable = durable
        return conn

    def close_conn(self) -> None:
        """Close this thread's connection (before a fork: a child must not use the parent's)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """Held around every write transaction, by every process on this database (the server's
        workers, the admin CLI): SQLite lets one writer in and makes the others poll with sleeps of
        up to 100 ms, where a writer waiting here is woken the moment the lock is free."""
        with self._thread_lock:
            fd = self._lock_file()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _lock_file(self) -> int:
        # One open file per process: flock belongs to the open file, which a forked child would
        # otherwise share with its parent, and then both would hold the lock at once.
        if self._lock_fd is None or self._lock_fd[0] != os.getpid():
            path = self.path.with_name(self.path.name + "-writer.lock")
            self._lock_fd = (os.getpid(), os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        return self._lock_fd[1]
