"""Where the control plane's state lives: every SQL statement, over one pool of connections.

The pool is `Database` (controlplane.db): one connection per thread, WAL. A write runs in one
`BEGIN IMMEDIATE` transaction behind the database's writer lock (`Store.write`), which SQLite
serialises: that is what makes a provisioning token single-use under concurrency and quota checks
race-free. Durability is a property of each write, not of a second pool: a durable write (the
default: an enrollment or a renewal the node was told about must survive a power cut) commits with
`synchronous = FULL`; a heartbeat commits with `synchronous = NORMAL` (`durable=False`), which waits
for no fsync: one lost to a power cut is sent again within an interval, and WAL keeps the database
consistent either way.

The functions below take the connection of the transaction they run in; they know nothing of HTTP
or of the rules above them (controlplane.service, controlplane.heartbeat decide; this stores).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from controlplane.db import Database
from controlplane.errors import NotFound


class Store:
    """The control plane's database, read and written through this thread's connection."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def read(self) -> sqlite3.Connection:
        """This thread's connection, for reads outside a write transaction."""
        return self.db.conn()

    @contextmanager
    def write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One serialised write transaction; `durable=False` commits without waiting for an fsync."""
        conn = self.db.conn(durable=durable)
        # SQLite allows one writer; writers queue on the database's lock instead of its busy handler.
        with self.db.write_lock():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


# --- orgs, API keys, provisioning tokens -------------------------------------------------------


def org_name_taken(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM orgs WHERE name = ?", (name,)).fetchone() is not None


def insert_org(
    conn: sqlite3.Connection, org_id: str, name: str, provider: bool, node_quota: int | None, now: str
) -> None:
    conn.execute(
        "INSERT INTO orgs (id, name, is_provider, node_quota, created_at) VALUES (?, ?, ?, ?, ?)",
        (org_id, name, int(provider), node_quota, now),
    )


def find_org(conn: sqlite3.Connection, ref: str) -> sqlite3.Row:
    """The org whose ID or name is `ref`."""
    row: sqlite3.Row | None = conn.execute(
        "SELECT * FROM orgs WHERE id = ? OR name = ?", (ref, ref)
    ).fetchone()
    if row is None:
        raise NotFound(f"no org {ref!r}")
    return row


def update_org(conn: sqlite3.Connection, org_id: str, provider: bool | None, node_quota: int | None) -> None:
    if provider is not None:
        conn.execute("UPDATE orgs SET is_provider = ? WHERE id = ?", (int(provider), org_id))
    if node_quota is not None:
        conn.execute("UPDATE orgs SET node_quota = ? WHERE id = ?", (node_quota, org_id))


def insert_api_key(conn: sqlite3.Connection, key_hash: str, org_id: str, now: str) -> None:
    conn.execute(
        "INSERT INTO api_keys (key_hash, org_id, created_at) VALUES (?, ?, ?)", (key_hash, org_id, now)
    )


def org_of_api_key(conn: sqlite3.Connection, key_hash: str) -> sqlite3.Row | None:
    """The org of a key that was not revoked."""
    row: sqlite3.Row | None = conn.execute(
        "SELECT orgs.* FROM api_keys JOIN orgs ON orgs.id = api_keys.org_id"
        " WHERE key_hash = ? AND revoked_at IS NULL",
        (key_hash,),
    ).fetchone()
    return row


def insert_provisioning_token(
    conn: sqlite3.Connection, token_hash: str, org_id: str, created: str, expires: str
) -> None:
    conn.execute(
        "INSERT INTO provisioning_tokens (token_hash, org_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
        (token_hash, org_id, created, expires),
    )


def provisioning_token(conn: sqlite3.Connection, token_hash: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute(
        "SELECT * FROM provisioning_tokens WHERE token_hash = ?", (token_hash,)
    ).fetchone()
    return row


def org_is_provider(conn: sqlite3.Connection, org_id: str) -> bool | None:
    """Whether the org is an approved provider; None when there is no such org."""
    row = conn.execute("SELECT is_provider FROM orgs WHERE id = ?", (org_id,)).fetchone()
    return None if row is None else bool(row["is_provider"])


def use_provisioning_token(
    conn: sqlite3.Connection, token_hash: str, now: str, key_fp: str, node_id: str
) -> bool:
    """Mark the token used by key `key_fp` for `node_id`; False when it was used already."""
    cur = conn.execute(
        "UPDATE provisioning_tokens SET used_at = ?, used_by_key = ?, used_for_node = ?"
        " WHERE token_hash = ? AND used_at IS NULL",
        (now, key_fp, node_id, token_hash),
    )
    return cur.rowcount == 1


# --- nodes ---------------------------------------------------------------------------------------


def enrolled_units_sql(nodes: str) -> str:
    """SQL for the GPU units a node enrolled with, the cap on what it advertises. A passthrough node
    rents IOMMU groups (its rows in gpu_units); a container-mode node shares each GPU through runsc
    and enrolls no groups, so its units are the GPUs it enrolled with (hardware.gpus). Without this a
    container-mode node that the doctor finds ready would be capped at 0 and never rented."""
    return (
        f"(CASE WHEN {nodes}.gpu_mode = 'container'"
        f" THEN COALESCE(json_array_length({nodes}.hardware, '$.gpus'), 0)"
        f" ELSE (SELECT COUNT(*) FROM gpu_units g WHERE g.node_id = {nodes}.id) END)"
    )


_NODE_BY_CERT = (
    f"SELECT nodes.*, {enrolled_units_sql('nodes')} AS enrolled_units"
    " FROM nodes WHERE cert_fp = ? OR pending_cert_fp = ?"
)


def node_by_certificate(conn: sqlite3.Connection, cert_fp: str) -> sqlite3.Row | None:
    """The node whose current or pending client certificate is `cert_fp`, with the number of GPU
    units it enrolled with as `enrolled_units`."""
    row: sqlite3.Row | None = conn.execute(_NODE_BY_CERT, (cert_fp, cert_fp)).fetchone()
    return row


def node_by_token(conn: sqlite3.Connection, token_hash: str) -> sqlite3.Row | None:
    """The node whose current or pending node token hashes to `token_hash`."""
    row: sqlite3.Row | None = conn.execute(
        "SELECT * FROM nodes WHERE token_hash = ? OR pending_token_hash = ?", (token_hash, token_hash)
    ).fetchone()
    return row


def node_by_id(conn: sqlite3.Connection, node_id: str, org_id: str | None = None) -> sqlite3.Row | None:
    """The node `node_id` (of `org_id` when given)."""
    if org_id is None:
        row: sqlite3.Row | None = conn.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone()
    else:
        row = conn.execute("SELECT * FROM nodes WHERE id = ? AND org_id = ?", (node_id, org_id)).fetchone()
    return row


def promote_pending(conn: sqlite3.Connection, node_id: str) -> None:
    """The pending pair becomes the node's current one, and the previous pair stops working."""
    conn.execute(
        "UPDATE nodes SET cert_fp = pending_cert_fp, token_hash = pending_token_hash,"
        " pending_cert_fp = NULL, pending_token_hash = NULL WHERE id = ?",
        (node_id,),
    )


def set_pending(conn: sqlite3.Connection, node_id: str, cert_fp: str, token_hash: str) -> None:
    conn.execute(
        "UPDATE nodes SET pending_cert_fp = ?, pending_token_hash = ? WHERE id = ?",
        (cert_fp, token_hash, node_id),
    )


def count_nodes(conn: sqlite3.Connection, org_id: str) -> int:
    (count,) = conn.execute("SELECT COUNT(*) FROM nodes WHERE org_id = ?", (org_id,)).fetchone()
    return int(count)


def next_node_seq(conn: sqlite3.Connection) -> int:
    (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM nodes").fetchone()
    return int(seq)


def insert_node(
    conn: sqlite3.Connection,
    *,
    node_id: str,
    org_id: str,
    seq: int,
    overlay_ip: str,
    hostname: str,
    gpu_mode: str,
    hardware: dict[str, Any],
    token_hash: str,
    now: str,
) -> None:
    """A new active node; its certificate's fingerprint follows once signed (set_certificate)."""
    conn.execute(
        "INSERT INTO nodes (id, org_id, seq, overlay_ip, hostname, gpu_mode, hardware, status,"
        " cert_fp, token_hash, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 'active', '', ?, ?, ?)",
        (node_id, org_id, seq, overlay_ip, hostname, gpu_mode, json.dumps(hardware), token_hash, now, now),
    )


def set_certificate(conn: sqlite3.Connection, node_id: str, cert_fp: str) -> None:
    conn.execute("UPDATE nodes SET cert_fp = ? WHERE id = ?", (cert_fp, node_id))


def reenroll_node(
    conn: sqlite3.Connection, node_id: str, hostname: str, gpu_mode: str, hardware: dict[str, Any], now: str
) -> None:
    conn.execute(
        "UPDATE nodes SET status = 'active', hostname = ?, gpu_mode = ?, hardware = ?,"
        " enrollments = enrollments + 1, updated_at = ? WHERE id = ?",
        (hostname, gpu_mode, json.dumps(hardware), now, node_id),
    )


def touch_node(conn: sqlite3.Connection, node_id: str, now: str) -> None:
    conn.execute("UPDATE nodes SET updated_at = ? WHERE id = ?", (now, node_id))


def replace_units(conn: sqlite3.Connection, node_id: str, units: Iterable[dict[str, Any]]) -> None:
    """The node's GPU units become `units` (validated by the caller); a ready one is allocatable."""
    conn.execute("DELETE FROM gpu_units WHERE node_id = ?", (node_id,))
    for unit in units:
        conn.execute(
            "INSERT OR REPLACE INTO gpu_units (node_id, iommu_group, gpus, status, allocatable)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                node_id,
                unit["iommu_group"],
                json.dumps(unit.get("gpus") or []),
                unit["status"],
                int(unit.get("status") == "ready"),
            ),
        )


def unit_counts(conn: sqlite3.Connection, node_id: str) -> tuple[int, int]:
    """How many GPU units the node has, and how many of them are allocatable."""
    row = conn.execute(
        "SELECT COUNT(*) AS n, COALESCE(SUM(allocatable), 0) AS a FROM gpu_units WHERE node_id = ?",
        (node_id,),
    ).fetchone()
    return row["n"], row["a"]


def remove_node(conn: sqlite3.Connection, node_id: str, now: str) -> int:
    """Mark the node removed, its units unallocatable and every certificate it was given revoked;
    returns how many units were freed."""
    freed = conn.execute(
        "UPDATE gpu_units SET allocatable = 0 WHERE node_id = ? AND allocatable = 1", (node_id,)
    ).rowcount
    conn.execute("UPDATE nodes SET status = 'removed', updated_at = ? WHERE id = ?", (now, node_id))
    # Every nebula certificate the node was given goes on the overlay hosts' blocklist.
    conn.execute(
        "UPDATE node_certificates SET revoked_at = ? WHERE node_id = ? AND revoked_at IS NULL",
        (now, node_id),
    )
    return int(freed)


def org_nodes(conn: sqlite3.Connection, org_id: str) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM nodes WHERE org_id = ? ORDER BY seq", (org_id,)).fetchall()


# --- certificates issued to nodes ----------------------------------------------------------------


def record_certificates(
    conn: sqlite3.Connection, node_id: str, batch: str, issued: str, certs: Iterable[tuple[str, str, str]]
) -> None:
    """The certificates (kind, serial, not_after) issued together with client certificate `batch`."""
    for kind, serial, not_after in certs:
        conn.execute(
            "INSERT OR REPLACE INTO node_certificates"
            " (node_id, kind, serial, batch, issued_at, not_after) VALUES (?, ?, ?, ?, ?, ?)",
            (node_id, kind, serial, batch, issued, not_after),
        )


def credential_expiry(conn: sqlite3.Connection, node_id: str, cert_fp: str) -> dict[str, str | None]:
    """When each credential the node holds expires: the set issued with its client certificate
    `cert_fp` (None for a node enrolled before they were recorded)."""
    rows = conn.execute(
        "SELECT kind, not_after FROM node_certificates WHERE node_id = ? AND batch = ?",
        (node_id, cert_fp),
    ).fetchall()
    found = {r["kind"]: r["not_after"] for r in rows}
    return {kind: found.get(kind) for kind in ("node", "nebula", "nomad")}


def revoked_nebula_certificates(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """(fingerprint, not_after) of every revoked nebula certificate."""
    return conn.execute(
        "SELECT serial AS fingerprint, not_after FROM node_certificates"
        " WHERE kind = 'nebula' AND revoked_at IS NOT NULL ORDER BY serial"
    ).fetchall()


# --- heartbeats ----------------------------------------------------------------------------------


def upsert_heartbeat(
    conn: sqlite3.Connection,
    node_id: str,
    received_at: str,
    interval_s: int,
    verdict: str,
    units_ready: int,
    units_total: int,
    draining: bool,
    encoded: tuple[str, str, str, str, str | None],
) -> sqlite3.Row:
    """The node's last heartbeat becomes this one (`encoded`: resources, thresholds, agents, checks
    and the per-unit state, or None, as JSON); returns the stored row."""
    row: sqlite3.Row = conn.execute(
        "INSERT INTO node_heartbeats (node_id, received_at, interval_s, verdict, units_ready,"
        " units_total, draining, resources, thresholds, agents, checks, units, heartbeats)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)"
        " ON CONFLICT (node_id) DO UPDATE SET received_at = excluded.received_at,"
        " interval_s = excluded.interval_s, verdict = excluded.verdict,"
        " units_ready = excluded.units_ready, units_total = excluded.units_total,"
        " draining = excluded.draining, resources = excluded.resources,"
        " thresholds = excluded.thresholds, agents = excluded.agents, checks = excluded.checks,"
        " units = excluded.units,"
        " heartbeats = node_heartbeats.heartbeats + 1"
        " RETURNING *",
        (node_id, received_at, interval_s, verdict, units_ready, units_total, int(draining), *encoded),
    ).fetchone()
    return row


def nodes_with_heartbeats(conn: sqlite3.Connection, org_id: str) -> list[sqlite3.Row]:
    """The org's nodes, each with its last heartbeat (`hb` NULL when none) and its `enrolled` units
    (the count)."""
    return conn.execute(
        "SELECT n.id, n.hostname, n.status, n.cert_fp, n.gpu_mode, h.node_id AS hb, h.received_at,"
        " h.interval_s, h.verdict, h.units_ready, h.units_total, h.draining, h.resources,"
        " h.thresholds, h.agents, h.units,"
        f" {enrolled_units_sql('n')} AS enrolled"
        " FROM nodes n LEFT JOIN node_heartbeats h ON h.node_id = n.id"
        " WHERE n.org_id = ? ORDER BY n.seq",
        (org_id,),
    ).fetchall()


def unit_groups(conn: sqlite3.Connection, node_id: str) -> frozenset[str]:
    """The IOMMU groups the node enrolled with."""
    rows = conn.execute("SELECT iommu_group FROM gpu_units WHERE node_id = ?", (node_id,)).fetchall()
    return frozenset(r[0] for r in rows)


def unit_groups_of_org(conn: sqlite3.Connection, org_id: str) -> dict[str, frozenset[str]]:
    """The IOMMU groups every node of `org_id` enrolled with, by node, in one query."""
    groups: dict[str, set[str]] = {}
    for node_id, group in conn.execute(
        "SELECT g.node_id, g.iommu_group FROM gpu_units g JOIN nodes n ON n.id = g.node_id"
        " WHERE n.org_id = ?",
        (org_id,),
    ):
        groups.setdefault(node_id, set()).add(group)
    return {node_id: frozenset(g) for node_id, g in groups.items()}
