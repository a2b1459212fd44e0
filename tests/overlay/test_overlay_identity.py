"""The node's overlay identity as enrolled: real nebula-cert accepts it, and its IP is the node's.

Runs the real `vectorlay-bootstrap enroll` against the real control plane, then Debian's
`nebula-cert` on the files the node wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap import nebula
from bootstrap.host import TreeHost
from bootstrap.identity import load_identity

pytestmark = pytest.mark.slow

NEBULA_CERT = shutil.which("nebula-cert")
# Skipped only on a developer's machine without Debian's nebula; in CI (which installs it) a missing
# nebula-cert fails the tests instead of hiding them.
needs_nebula = pytest.mark.skipif(
    NEBULA_CERT is None and not os.environ.get("CI"),
    reason="nebula-cert not installed (apt-get install nebula; .ci/run does)",
)


def _cert_json(path: Path) -> dict[str, Any]:
    assert NEBULA_CERT is not None
    out = subprocess.run(
        [NEBULA_CERT, "print", "-json", "-path", str(path)], capture_output=True, text=True, check=True
    )
    data = json.loads(out.stdout)
    return data if isinstance(data, dict) else data[0]


def _verify(ca: Path, crt: Path) -> subprocess.CompletedProcess[str]:
    assert NEBULA_CERT is not None
    return subprocess.run(
        [NEBULA_CERT, "verify", "-ca", str(ca), "-crt", str(crt)], capture_output=True, text=True, check=False
    )


@needs_nebula
def test_the_enrolled_nebula_certificate_verifies_and_carries_the_nodes_overlay_ip(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    root = make_tree("cpu-only")
    res = control_plane.enroll(root, control_plane.org("acme"))
    assert res.returncode == 0, res.stderr
    ident = load_identity(TreeHost(root))
    assert ident is not None
    idir = ident.path

    check = _verify(idir / "nebula-ca.crt", idir / "nebula.crt")
    assert check.returncode == 0, check.stdout + check.stderr
    details = _cert_json(idir / "nebula.crt")["details"]
    assert details["ips"] == [f"{ident.overlay_ip}/10"]
    assert details["name"] == ident.node_id
    assert details["groups"] == ["vectorlay-node"]
    assert details["isCa"] is False
    # The CA the node got is the control plane's own nebula CA, byte for byte.
    assert (idir / "nebula-ca.crt").read_bytes() == (control_plane.state_dir / "nebula-ca.crt").read_bytes()
    # The private key was made on the node and is the one the certificate is for.
    pub = nebula.public_key_of_private_pem((idir / "nebula.key").read_bytes())
    assert nebula.parse_certificate_pem((idir / "nebula.crt").read_bytes()).public_key == pub
    assert (idir / "nebula.key").read_bytes() not in (control_plane.state_dir / "nebula-ca.crt").read_bytes()


@needs_nebula
def test_re_enrollment_replaces_the_nebula_certificate_for_the_same_ip(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    root = make_tree("cpu-only")
    org = control_plane.org("acme")
    assert control_plane.enroll(root, org).returncode == 0
    first = load_identity(TreeHost(root))
    assert first is not None
    first_cert = (first.path / "nebula.crt").read_bytes()
    first_key = (first.path / "nebula.key").read_bytes()

    res = control_plane.enroll(root, org)
    assert res.returncode == 0, res.stderr
    again = load_identity(TreeHost(root))
    assert again is not None
    assert (again.node_id, again.overlay_ip) == (first.node_id, first.overlay_ip)
    assert (again.path / "nebula.crt").read_bytes() != first_cert
    assert (again.path / "nebula.key").read_bytes() != first_key
    assert _verify(again.path / "nebula-ca.crt", again.path / "nebula.crt").returncode == 0
    assert _cert_json(again.path / "nebula.crt")["details"]["ips"] == [f"{again.overlay_ip}/10"]
    node_json = json.loads((again.path / "node.json").read_text())
    assert node_json["overlay_ip"] == again.overlay_ip
