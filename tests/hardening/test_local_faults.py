"""Local faults an operator (or a stray script) leaves on a node: a FIFO where status.json belongs,
a node token that is not text, a --root tree without systemd, a directory or FIFO where the run lock
or the run log belongs. Each gives a clear message (FAIL, WARN or SKIP saying why, or an error with
what to do), exits in bounded time, and never prints a traceback or "internal error"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap.agent_status import STATUS_PATH
from bootstrap.api import ApiClient
from bootstrap.enroll import enroll
from bootstrap.host import TreeHost
from bootstrap.lock import LOCK_PATH
from bootstrap.paths import IDENTITY_DIR, LOG_PATH
from bootstrap.resources import units_dir
from hostsim import inject

MakeTree = Callable[..., Path]
# Bounded: a hang (a FIFO opened for reading or writing) fails the test instead of stalling the suite.
TIMEOUT = 60


def _cli(*argv: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = inject.env({k: v for k, v in os.environ.items() if k != "VECTORLAY_TOKEN"})
    if token is not None:
        env["VECTORLAY_TOKEN"] = token
    res = subprocess.run(
        [sys.executable, "-m", *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
    )
    out = res.stdout + res.stderr
    assert "Traceback" not in out and "internal error" not in out and "crashed" not in out, out
    return res


def _enrolled(root: Path, cp: Any) -> None:
    cp.org("acme")
    api = ApiClient(cp.url, ca_file=cp.ca_file, attempts=1)
    enroll(TreeHost(root), api, cp.token("acme"), gpu_mode="none", hardware={})
    # The agent's config, as the agents stage writes it: where its heartbeats go.
    (root / "etc/vectorlay/node-agent.yaml").write_text(f"api: {cp.url}\n")


def _doctor(root: Path) -> dict[str, Any]:
    res = _cli("doctor.cli", "--root", str(root), "--json")
    return {c["name"]: c for c in json.loads(res.stdout)["checks"]}


@pytest.mark.slow
def test_a_fifo_at_status_json_hangs_neither_the_doctor_nor_the_node_agent(
    make_tree: MakeTree, control_plane: Any
) -> None:
    root = make_tree("cpu-only")
    _enrolled(root, control_plane)
    status = root / STATUS_PATH.lstrip("/")
    status.parent.mkdir(parents=True)
    os.mkfifo(status)
    check = _doctor(root)["control_plane"]
    assert check["status"] == "WARN"
    assert check["message"] == (
        f"{STATUS_PATH} is not a status the node-agent wrote (not a regular file, not JSON, or too large)"
    )
    assert check["hint"].startswith(f"sudo rm -rf {STATUS_PATH}")
    # The agent delivers its heartbeat and replaces the FIFO with its status file.
    res = _cli("nodeagent.cli", "--root", str(root), "--once")
    assert res.returncode == 0, res.stderr
    assert status.is_file() and json.loads(status.read_text())["status"] == "active"


@pytest.mark.slow
def test_a_node_token_that_is_not_text_fails_the_doctor_and_stops_plan_and_agent_with_a_message(
    make_tree: MakeTree, control_plane: Any
) -> None:
    root = make_tree("cpu-only")
    _enrolled(root, control_plane)
    token_file = root / IDENTITY_DIR.lstrip("/") / "node-token"
    token_file.write_bytes(b"vnt_\xff\xfe\x80garbage\n")
    damaged = (
        f"{IDENTITY_DIR}/node-token is damaged: a node token is one line of printable ASCII, "
        "this file is not (its content is not shown)"
    )
    check = _doctor(root)["identity"]
    assert (check["status"], check["message"]) == ("FAIL", damaged)
    assert "re-enroll" in check["hint"]

    agent = _cli("nodeagent.cli", "--root", str(root), "--once")
    assert agent.returncode == 1
    assert agent.stderr.startswith(f"error: heartbeat not delivered: {damaged}")

    # The installer's plan treats the identity as damaged: re-enrollment (with a token) repairs it.
    args = ["--api", control_plane.url, "--ca-file", str(control_plane.ca_file)]
    plan = _cli("bootstrap.cli", "install", "--root", str(root), "--plan", "--only", "artifacts", *args)
    assert "would enroll this node" in plan.stdout, plan.stdout + plan.stderr
    fixed = _cli("bootstrap.cli", "enroll", "--root", str(root), *args, token=control_plane.token("acme"))
    assert fixed.returncode == 0, fixed.stderr
    assert _doctor(root)["identity"]["status"] == "PASS"


def test_a_tree_without_systemd_skips_agents_and_autoupdate_saying_why(make_tree: MakeTree) -> None:
    root = make_tree("cpu-only")
    units = root / "etc/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for name in ("nebula.service", "nomad.service", "node-agent.service", "node-agent-update.timer"):
        shutil.copyfile(units_dir() / name, units / name)
    # The plain doctor against a tree: commands are recorded, not run (no simulator).
    res = subprocess.run(
        [sys.executable, "-m", "doctor.cli", "--root", str(root), "--json"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    why = "not checked: a --root tree runs no command, so there is no systemd to ask "
    assert (checks["agents"]["status"], checks["agents"]["message"]) == (
        "SKIP",
        why + "whether the agents are active",
    )
    assert (checks["autoupdate"]["status"], checks["autoupdate"]["message"]) == (
        "SKIP",
        why + "whether node-agent-update.timer is enabled",
    )
    assert "exit status 0" not in res.stdout


@pytest.mark.parametrize("where", [LOCK_PATH, LOG_PATH])
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_directory_or_fifo_at_the_run_lock_or_log_is_a_clear_error(
    make_tree: MakeTree, where: str, kind: str
) -> None:
    root = make_tree("cpu-only")
    path = root / where.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    res = _cli("bootstrap.cli", "install", "--root", str(root), "--only", "detect")
    assert res.returncode == 1
    what = "take the run lock" if where == LOCK_PATH else "open the run log"
    assert res.stderr.startswith(f"error: cannot {what} {where}: "), res.stderr
    assert f"sudo rm -rf {where}" in res.stderr
