"""Re-running the one-liner on an installed node changes nothing: no file written (no mtime moves),
no command that changes anything run. The one thing that grows is the run's own log."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostsim import inject
from hostsim.snapshot import snapshot
from tests.install.helpers import FAST, install, installed_demo_node

pytestmark = pytest.mark.slow

LOG = "var/log/vectorlay/bootstrap.log"


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[Any, Path, str]]:
    base = Path(tempfile.mkdtemp(prefix="vln", dir="/tmp"))  # short: agents' socket paths
    try:
        with installed_demo_node(base) as installed:
            yield installed
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("with_token", [True, False], ids=["same one-liner, spent token", "no token"])
def test_a_rerun_on_the_installed_demo_node_writes_nothing_and_runs_nothing_that_changes(
    node: tuple[Any, Path, str], tmp_path: Path, with_token: bool
) -> None:
    cp, root, token = node
    # /run holds the agents' sockets (a tmpfs on a real box); the run lock in it is checked apart.
    before = snapshot(root, skip=(LOG, "run"))
    lock = root / "run/vectorlay/bootstrap.lock"
    lock_before = lock.stat().st_mtime_ns
    log_before = (root / LOG).stat().st_size
    points = tmp_path / "points"
    res = install(
        root, cp=cp, token=token if with_token else None, env={**FAST, inject.FAULT_LOG_ENV: str(points)}
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert "vectorlay-node: DONE" in res.stdout
    assert "doctor: PASS, 8/8 GPU unit(s) ready" in res.stdout
    # Every write, link switch, removal, directory sync and changing command is a fault point: none.
    assert not points.exists() or points.read_text() == ""
    assert snapshot(root, skip=(LOG, "run")) == before
    assert lock.stat().st_mtime_ns == lock_before
    assert (root / LOG).stat().st_size > log_before
