"""Run a real control plane on loopback for tests and demos: a fresh port, database and state dir.

The server is the real `vectorlay-control-plane serve` in a child process (HTTPS, mTLS, SQLite);
admin work (orgs, tokens, keys) goes straight to the same database file, as the admin CLI does.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.clock import Clock
from controlplane.db import Database
from controlplane.service import ControlPlane


@dataclass
class RunningControlPlane:
    url: str
    ca_file: Path
    db_path: Path
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    admin: ControlPlane = field(repr=False)

    def org(self, name: str, *, provider: bool = True, node_quota: int | None = None) -> str:
        return str(self.admin.create_org(name, provider=provider, node_quota=node_quota)["id"])

    def token(self, org: str) -> str:
        return str(self.admin.create_provisioning_token(org)["token"])

    def api_key(self, org: str) -> str:
        return self.admin.create_api_key(org)

    def cli(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`vectorlay-control-plane ARGS --db DB`, the admin CLI on this server's database."""
        return subprocess.run(
            [sys.executable, "-m", "controlplane.cli", *args, "--db", str(self.db_path)],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=60,
            check=False,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def enroll(self, root: Path, org: str, *, gpu_mode: str = "none") -> subprocess.CompletedProcess[str]:
        """Enroll the node tree `root` with a fresh token of `org`, through the real CLI."""
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "bootstrap.cli",
                "enroll",
                "--root",
                str(root),
                "--api",
                self.url,
                "--ca-file",
                str(self.ca_file),
            ],
            env={**os.environ, "VECTORLAY_TOKEN": self.token(org), "VECTORLAY_GPU_MODE": gpu_mode},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def start(
    workdir: Path,
    *,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    timeout: float = 30.0,
    prefix: tuple[str, ...] = (),
) -> RunningControlPlane:
    """`prefix` goes before the server's command line (e.g. `ip netns exec NS` for a namespace)."""
    workdir.mkdir(parents=True, exist_ok=True)
    db_path, state_dir, log_path = workdir / "cp.sqlite", workdir / "state", workdir / "cp.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-m",
            "controlplane.cli",
            "serve",
            "--db",
            str(db_path),
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(state_dir),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        env={**os.environ, **(env or {})},
    )
    log.close()
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        if time.monotonic() > deadline or not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            proc.kill()
            raise RuntimeError(f"control plane did not start: {log_path.read_text(errors='replace')}")
        chunk = proc.stdout.read1(4096)  # type: ignore[attr-defined]
        if not chunk:
            proc.wait()
            raise RuntimeError(f"control plane exited: {log_path.read_text(errors='replace')}")
        line += chunk
    sel.close()
    url = line.decode().split()[1]
    admin = ControlPlane(Database(db_path), None, Clock())
    return RunningControlPlane(url, state_dir / "ca.crt", db_path, state_dir, log_path, proc, admin)


def stop(cp: RunningControlPlane) -> None:
    cp.proc.terminate()
    try:
        cp.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        cp.proc.kill()
        cp.proc.wait()
    if cp.proc.stdout is not None:
        cp.proc.stdout.close()


@contextlib.contextmanager
def running(workdir: Path, **kwargs: object) -> Iterator[RunningControlPlane]:
    cp = start(workdir, **kwargs)  # type: ignore[arg-type]
    try:
        yield cp
    finally:
        stop(cp)
