"""`vectorlay-bootstrap enroll` runs the install's enroll stage: under the run lock, with the key pair
of an enrollment in flight kept, so that it wastes no token when killed and never overlaps another run.

The crash harness is the install's (hostsim.inject): the real console script runs in a subprocess
against a tree, lists its kill points in an uninterrupted run, then is SIGKILLed at each one in turn
and re-run with the same token, as an operator would after a power cut.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap.api import ApiClient, ClientCert
from bootstrap.host import TreeHost
from bootstrap.identity import load_identity
from bootstrap.lock import LOCK_PATH
from bootstrap.provisioning import PENDING_KEY
from hostsim import inject


def _enroll(
    root: Path, cp: Any, token: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "bootstrap.cli", "enroll", "--root", str(root)]
    argv += ["--api", cp.url, "--ca-file", str(cp.ca_file)]
    full = inject.env({k: v for k, v in os.environ.items() if k != "VECTORLAY_TOKEN"})
    full["VECTORLAY_TOKEN"] = token
    full.update(env or {})
    return subprocess.run(
        argv, env=full, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False
    )


def _works(cp: Any, root: Path) -> str:
    ident = load_identity(TreeHost(root))
    assert ident is not None
    api = ApiClient(
        cp.url, ca_file=cp.ca_file, client_cert=ClientCert(ident.cert_file, ident.key_file), attempts=1
    )
    try:
        return str(api.request("GET", "/v1/node/self", bearer=ident.node_token())["node_id"])
    finally:
        api.close()


@pytest.mark.slow
def test_a_re_enrollment_killed_at_any_of_its_kill_points_completes_with_the_same_token(
    make_tree: Callable[..., Path], control_plane: Any, tmp_path: Path
) -> None:
    control_plane.org("acme")
    root = make_tree("cpu-only")
    first = _enroll(root, control_plane, control_plane.token("acme"))
    assert first.returncode == 0, first.stderr
    node = _works(control_plane, root)
    points_log = tmp_path / "points"
    listed = _enroll(
        root, control_plane, control_plane.token("acme"), {inject.FAULT_LOG_ENV: str(points_log)}
    )
    assert listed.returncode == 0, listed.stderr
    points = [line.split("\t", 1)[1] for line in points_log.read_text().splitlines()]
    # The pending key is written before the request and removed after the switch: both are points.
    assert any(p.startswith("write ") and p.endswith(".enroll-pending.key") for p in points), points
    assert points.index("enroll before-request") < points.index("enroll switched"), points
    assert len(points) >= 20

    problems = []
    for k, point in enumerate(points, 1):
        token = control_plane.token("acme")
        killed = _enroll(root, control_plane, token, {inject.FAULT_AT_ENV: str(k)})
        if killed.returncode != -9:
            problems.append(f"{k} {point}: not killed (exit {killed.returncode}) {killed.stderr[-300:]}")
            continue
        if _works(control_plane, root) != node:
            problems.append(f"{k} {point}: the identity left on disk is refused")
        # The token used and no pending key left: the kill came after the key's removal.
        used = not control_plane.admin.introspect(token)["valid"]
        finished = used and not (root / PENDING_KEY.lstrip("/")).exists()
        resumed = _enroll(root, control_plane, token)
        if finished:
            # Killed at the last sync, after the pending key's removal: the enrollment had finished,
            # so the token is used, and the re-run says so and leaves the working identity alone.
            said = resumed.stderr
            if resumed.returncode != 1 or "already used" not in said or "Traceback" in said:
                problems.append(f"{k} {point}: a finished enrollment's re-run: {resumed.stderr[-400:]}")
            elif _works(control_plane, root) != node:
                problems.append(f"{k} {point}: the finished enrollment's identity is refused")
            continue
        if resumed.returncode != 0 or not resumed.stdout.startswith(f"re-enrolled node {node} "):
            problems.append(f"{k} {point}: the same token no longer enrolls: {resumed.stderr[-400:]}")
            continue
        if _works(control_plane, root) != node or (root / PENDING_KEY.lstrip("/")).exists():
            problems.append(f"{k} {point}: after the re-run the identity is refused or a key is left")
    assert problems == []
    assert len(control_plane.admin.org_summary("acme")["nodes"]) == 1


@pytest.mark.slow
def test_an_enrollment_while_another_run_holds_the_lock_is_refused_and_changes_nothing(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    control_plane.org("acme")
    root = make_tree("cpu-only")
    assert _enroll(root, control_plane, control_plane.token("acme")).returncode == 0
    before = load_identity(TreeHost(root))
    assert before is not None
    lock = root / LOCK_PATH.lstrip("/")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an install in progress
        token = control_plane.token("acme")
        refused = _enroll(root, control_plane, token)
    finally:
        os.close(fd)
    assert refused.returncode == 1 and refused.stdout == ""
    assert f"another vectorlay-bootstrap run is in progress (pid {os.getpid()}" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert load_identity(TreeHost(root)) == before and _works(control_plane, root) == before.node_id
    # The token was not consumed: the run after the other one finished uses it.
    assert control_plane.admin.introspect(token)["valid"] is True
    again = _enroll(root, control_plane, token)
    assert again.returncode == 0, again.stderr
    assert _works(control_plane, root) == before.node_id
