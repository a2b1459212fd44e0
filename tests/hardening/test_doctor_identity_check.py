"""The doctor's identity check fails, with its fix, on everything the installer would refuse: the
directory open to others, node.json damaged, the node token missing, empty or readable by others."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest

from bootstrap.host import Host
from doctor.identity import check_identity
from doctor.model import Status
from tests.doctor.test_doctor_identity import enroll

ID = "/etc/vectorlay/identity"
REENROLL = "re-enroll the node with a new token (vectorlay-bootstrap enroll)"


@pytest.fixture
def host(make_host: Callable[..., Host]) -> Host:
    return make_host("cpu-only")


def test_the_baseline_identity_passes(host: Host) -> None:
    enroll(host)
    assert check_identity(host).status is Status.PASS


def test_an_identity_directory_open_to_others_fails_with_the_chmod_fix(host: Host) -> None:
    os.chmod(enroll(host), 0o755)
    result = check_identity(host)
    assert (result.status, result.message) == (Status.FAIL, f"{ID} is open to others (mode 0755)")
    assert result.hint == f"chmod 700 {ID}"
    # ... and through the real CLI: exit 1, the FAIL in the JSON.
    res = subprocess.run(
        [sys.executable, "-m", "doctor.cli", "--root", str(host.root), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    check = next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "identity")
    assert (check["status"], check["hint"]) == ("FAIL", f"chmod 700 {ID}")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", f"{ID}/node.json is unreadable"),
        ("[1, 2]", f"{ID}/node.json must hold a JSON object"),
        ('{"node_id": 7, "org_id": "o", "overlay_ip": "10.42.0.7"}', "node_id is missing or not a string"),
        (
            '{"node_id": "n", "org_id": {"a": 1}, "overlay_ip": "10.42.0.7"}',
            "org_id is missing or not a string",
        ),
        ('{"node_id": "n", "org_id": "o"}', "overlay_ip is missing or not a string"),
        ('{"node_id": "n", "org_id": "o", "overlay_ip": "10.42.0.7; rm -rf /"}', "is not an IP address"),
        ("", f"{ID}/node.json is unreadable"),
        ("[" * 100_000, f"{ID}/node.json is unreadable"),
    ],
    ids=["not-json", "list", "number-id", "object-org", "no-ip", "bad-ip", "empty", "nested-deep"],
)
def test_a_corrupt_node_json_fails_with_the_reenroll_hint(host: Host, content: str, message: str) -> None:
    (enroll(host) / "node.json").write_text(content)
    result = check_identity(host)
    assert result.status is Status.FAIL
    assert message in result.message
    assert result.hint == REENROLL


def test_a_missing_node_token_fails_naming_it(host: Host) -> None:
    (enroll(host) / "node-token").unlink()
    result = check_identity(host)
    assert (result.status, result.message) == (Status.FAIL, f"identity incomplete: {ID}/node-token missing")
    assert result.hint is not None and "re-enroll" in result.hint


def test_an_empty_node_token_fails(host: Host) -> None:
    (enroll(host) / "node-token").write_text("\n")
    result = check_identity(host)
    assert (result.status, result.message) == (Status.FAIL, f"{ID}/node-token is empty")


def test_a_node_token_readable_by_others_fails_with_the_chmod_fix(host: Host) -> None:
    os.chmod(enroll(host) / "node-token", 0o644)
    result = check_identity(host)
    assert result.status is Status.FAIL
    assert f"{ID}/node-token is mode 0644" in result.message
    assert result.hint == f"sudo chown root:root {ID}/node-token && sudo chmod 600 {ID}/node-token"


def test_an_identity_link_to_a_missing_directory_fails(host: Host) -> None:
    d = enroll(host)
    shutil.rmtree(d)
    os.symlink("identity.gen-gone", d)
    result = check_identity(host)
    assert (result.status, result.message) == (Status.FAIL, f"{ID} points at a missing directory")


def test_the_node_json_as_a_fifo_fails_without_hanging(host: Host) -> None:
    d = enroll(host)
    (d / "node.json").unlink()
    os.mkfifo(d / "node.json")
    result = check_identity(host)
    assert result.status is Status.FAIL  # the FIFO is not a file: "incomplete"
    assert "node.json" in result.message


def test_the_check_runs_every_part_it_lists(host: Host) -> None:
    from doctor.identity import PARTS

    enroll(host)
    assert [p.__name__ for p in PARTS] == ["_files", "_layout", "_node_certificate", "_overlay", "_renewal"]
    now = dt.datetime.now(dt.timezone.utc)
    assert all(part(host, now) is None for part in PARTS)
