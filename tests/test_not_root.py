"""Every command that needs root, run by an ordinary user: one message, one fix, exit 1, no traceback,
and nothing taken or written first (the run lock under /run/vectorlay comes after the check).

The commands run for real as uid/gid 65534 (setpriv drops every privilege and capability). On this
machine's own `/` the guard against the real root stays on (hostsim's sitecustomize): a command that
opened the live host before saying "run it with sudo" would fail differently, and the test with it.
On a --root tree the rule stays what it was (a tree is the caller's own directory): the commands get as
far as the tree's permissions let them, and say so without a traceback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostsim import build_host, inject, load_topology

BIN = Path(sys.executable).parent
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SUDO = ["error: the installer must run as root", "  fix: re-run it with sudo"]

LIVE_COMMANDS = [
    ["vectorlay-bootstrap", "install"],
    ["vectorlay-bootstrap", "install", "--plan"],
    ["vectorlay-bootstrap", "install", "--only", "gpu"],
    ["vectorlay-bootstrap", "enroll", "--api", "https://127.0.0.1:9"],
    ["vectorlay-bootstrap", "update"],
    ["vectorlay-bootstrap", "uninstall"],
    ["vectorlay-bootstrap", "uninstall", "--plan"],
    ["vectorlay-bootstrap", "vfio-bind"],
    ["vectorlay-bootstrap", "wait-overlay", "--timeout", "0"],
]


def as_nobody(argv: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    env = inject.env({"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LC_ALL": "C.UTF-8", **extra})
    return subprocess.run(
        [*NOBODY, str(BIN / argv[0]), *argv[1:]],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("argv", LIVE_COMMANDS, ids=" ".join)
def test_a_command_that_changes_this_machine_says_run_it_with_sudo(argv: list[str]) -> None:
    res = as_nobody(argv)
    assert res.stderr.splitlines() == SUDO, res.stderr
    assert res.returncode == 1 and res.stdout == ""


def test_the_doctor_on_this_machine_says_run_it_with_sudo() -> None:
    for argv in (["vectorlay-node-doctor"], ["vectorlay-node-doctor", "--json"]):
        res = as_nobody(argv)
        assert res.stderr.splitlines() == [
            "error: vectorlay-node-doctor must run as root",
            "  fix: re-run it with sudo: sudo vectorlay-node-doctor",
        ]
        assert res.returncode == 1 and res.stdout == ""


def test_detect_and_help_need_no_root() -> None:
    res = as_nobody(["vectorlay-bootstrap", "--help"])
    assert res.returncode == 0 and "install" in res.stdout
    res = as_nobody(["vectorlay-bootstrap", "detect", "--json"])
    assert res.returncode == 0 and res.stdout.startswith("{"), res.stderr


@pytest.fixture
def node_tree() -> Iterator[Path]:
    """A host tree an ordinary user may enter, holding an enrolled node's root-only identity."""
    base = Path(tempfile.mkdtemp(prefix="vl-notroot-", dir="/tmp"))
    base.chmod(0o755)
    root = build_host(base / "host", load_topology("cpu-only"))
    ident = root / "etc/vectorlay/identity"
    ident.mkdir(parents=True)
    (ident / "node.json").write_text('{"node_id": "node_1", "org_id": "org_1", "overlay_ip": "10.42.0.2"}\n')
    ident.chmod(0o700)
    yield root
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize(
    ("argv", "first_line"),
    [
        (["vectorlay-bootstrap", "install"], "error: cannot take the run lock /run/vectorlay/bootstrap.lock"),
        (["vectorlay-bootstrap", "update"], "error: permission denied: {root}/etc/vectorlay/identity/"),
        (["vectorlay-bootstrap", "wait-overlay", "--timeout", "0"], "error: permission denied: {root}/etc/"),
        (["vectorlay-node-doctor"], "error: permission denied: {root}/etc/vectorlay/identity/"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_on_a_tree_of_roots_files_a_command_says_what_it_cannot_read(
    node_tree: Path, argv: list[str], first_line: str
) -> None:
    res = as_nobody([*argv, "--root", str(node_tree)])
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.splitlines()
    assert res.returncode == 1, res.stdout + res.stderr
    assert lines[0].startswith(first_line.format(root=node_tree)), res.stderr
    assert lines[1:] == ["  fix: re-run it with sudo"], res.stderr
