"""The control plane's SQLite schema migrations and its admin CLI."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from controlplane import db as cpdb
from controlplane.clock import Clock
from controlplane.db import SCHEMA_VERSION, Database, connect, migrate
from controlplane.service import ControlPlane
from controlplane.store import Store


def _tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


def test_a_new_database_is_migrated_to_the_latest_schema_version_once(tmp_path: Path) -> None:
    path = tmp_path / "cp.sqlite"
    Database(path)
    conn = connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert migrate(conn) == SCHEMA_VERSION  # nothing left to do
    assert {"orgs", "api_keys", "provisioning_tokens", "nodes", "gpu_units"} <= _tables(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failing_migration_leaves_the_previous_version_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cp.sqlite"
    Database(path)
    broken = "CREATE TABLE half_done (x INTEGER); THIS IS NOT SQL;"
    monkeypatch.setattr(cpdb, "MIGRATIONS", (*cpdb.MIGRATIONS, broken))
    monkeypatch.setattr(cpdb, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    conn = connect(path)
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn)
    conn.rollback()
    conn.close()
    assert connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert "half_done" not in _tables(path)


def test_a_database_from_a_newer_control_plane_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cp.sqlite"
    conn = connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    with pytest.raises(RuntimeError, match="newer than this control plane"):
        migrate(conn)


def test_tokens_and_keys_are_stored_only_as_hashes(tmp_path: Path) -> None:
    path = tmp_path / "cp.sqlite"
    cp = ControlPlane(Database(path), None, Clock())
    cp.create_org("acme", provider=True, node_quota=None)
    token = cp.create_provisioning_token("acme")["token"]
    key = cp.create_api_key("acme")
    conn = connect(path)
    rows = [tuple(r) for t in ("provisioning_tokens", "api_keys") for r in conn.execute(f"SELECT * FROM {t}")]
    dump = json.dumps(rows)
    assert token not in dump and key not in dump
    assert hashlib.sha256(token.encode()).hexdigest() in dump
    assert hashlib.sha256(key.encode()).hexdigest() in dump


@pytest.mark.slow
def test_the_admin_cli_creates_orgs_tokens_and_api_keys(control_plane: Any) -> None:
    made = control_plane.cli("org", "create", "acme", "--provider", "--node-quota", "2")
    assert made.returncode == 0, made.stderr
    org = json.loads(made.stdout)
    assert org["name"] == "acme" and org["provider"] is True and org["node_quota"] == 2
    assert org["id"].startswith("org_")

    dup = control_plane.cli("org", "create", "acme")
    assert dup.returncode == 1 and "already exists" in dup.stderr and "Traceback" not in dup.stderr

    tok = control_plane.cli("token", "create", "--org", "acme")
    assert tok.returncode == 0, tok.stderr
    assert re.fullmatch(r"vtk_[A-Za-z0-9_-]{43}\n", tok.stdout)
    assert re.search(r"expires at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", tok.stderr)
    assert control_plane.admin.introspect(tok.stdout.strip())["valid"] is True

    key = control_plane.cli("apikey", "create", "--org", org["id"])
    assert key.returncode == 0 and re.fullmatch(r"vlk_[A-Za-z0-9_-]{43}\n", key.stdout)

    missing = control_plane.cli("token", "create", "--org", "nobody")
    assert missing.returncode == 1 and "no org 'nobody'" in missing.stderr

    upd = control_plane.cli("org", "update", "acme", "--no-provider")
    assert upd.returncode == 0 and json.loads(upd.stdout)["provider"] is False


@pytest.mark.slow
def test_serve_on_a_port_in_use_fails_with_a_message_not_a_traceback(
    control_plane: Any, tmp_path: Path
) -> None:
    import subprocess
    import sys

    port = control_plane.url.rsplit(":", 1)[1]
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "controlplane.cli", "serve", "--db", str(tmp_path / "db.sqlite")),
            *("--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "state")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def test_one_pool_a_heartbeats_write_skips_the_fsync_an_enrollments_waits_for(tmp_path: Path) -> None:
    # SQLite's PRAGMA synchronous: 2 is FULL (the WAL is synced at each commit), 1 NORMAL.
    store = Store(Database(tmp_path / "cp.sqlite"))
    level = "PRAGMA synchronous"
    with store.write() as conn:
        assert conn.execute(level).fetchone()[0] == 2
    with store.write(durable=False) as fast:
        assert fast is conn and fast.execute(level).fetchone()[0] == 1
    assert store.read().execute(level).fetchone()[0] == 1  # a read leaves it as the last write set it
    with store.write() as conn:
        assert conn.execute(level).fetchone()[0] == 2
    with pytest.raises(RuntimeError), store.write(durable=False) as conn:
        conn.execute("INSERT INTO orgs (id, name, created_at) VALUES ('o', 'n', 't')")
        raise RuntimeError("rolled back")
    assert store.read().execute("SELECT COUNT(*) FROM orgs").fetchone()[0] == 0
