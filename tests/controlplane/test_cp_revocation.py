"""Decommissioning puts a node's nebula certificates on the overlay hosts' blocklist
(ControlPlane.nebula_blocklist, what `overlay-host --db` writes into pki.blocklist); the real nebula
refusing them is tests/overlay/test_revocation.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bootstrap import nebula
from controlplane.clock import Clock, wall_now
from controlplane.db import Database
from controlplane.nebula_ca import NebulaCA
from controlplane.pki import CertificateAuthority
from controlplane.service import ControlPlane
from tests.controlplane.cp_nodes import _csr


def _plane(base: Path) -> tuple[ControlPlane, str, str]:
    cp = ControlPlane(
        Database(base / "cp.sqlite"),
        CertificateAuthority.load_or_create(base / "state", wall_now()),
        Clock(),
        nebula_ca=NebulaCA.load_or_create(base / "state", wall_now()),
    )
    org = cp.create_org("acme", provider=True, node_quota=None)["id"]
    return cp, org, cp.create_api_key(org)


def _enroll(cp: ControlPlane, org: str, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {
        "token": cp.create_provisioning_token(org)["token"],
        "csr_pem": _csr(),
        "nebula_public_key": nebula.generate_keypair()[1].decode(),
        "nomad_csr_pem": _csr(),
        "hostname": "box",
        "hardware": {},
        "gpu_mode": "none",
    }
    if previous is None:
        return cp.enroll(body, None, None)
    return cp.enroll(body, previous["certificate_pem"], previous["node_token"])


def _fp(answer: dict[str, Any]) -> str:
    return nebula.parse_certificate_pem(answer["nebula"]["certificate"].encode()).fingerprint


def test_only_the_removed_nodes_certificates_are_blocked_and_re_enrolling_adds_an_unblocked_one(
    tmp_path: Path,
) -> None:
    cp, org, key = _plane(tmp_path)
    kept, removed = _enroll(cp, org), _enroll(cp, org)
    renewed = _enroll(cp, org, previous=removed)  # a second certificate for the same node
    assert cp.nebula_blocklist() == []
    cp.set_node_status(key, org, removed["node_id"], {"status": "removed"})
    assert cp.nebula_blocklist() == sorted([_fp(removed), _fp(renewed)])
    back = _enroll(cp, org, previous=renewed)
    assert back["node_id"] == removed["node_id"] and _fp(back) not in cp.nebula_blocklist()
    assert _fp(kept) not in cp.nebula_blocklist()


def test_an_expired_revoked_certificate_leaves_the_blocklist(tmp_path: Path) -> None:
    # Nebula refuses an expired certificate on its own: the list stays as long as the live ones.
    cp, org, key = _plane(tmp_path)
    node = _enroll(cp, org)
    cp.set_node_status(key, org, node["node_id"], {"status": "removed"})
    assert cp.nebula_blocklist() == [_fp(node)]
    with cp.store.write() as conn:
        conn.execute("UPDATE node_certificates SET not_after = '2020-01-01T00:00:00Z' WHERE kind = 'nebula'")
    assert cp.nebula_blocklist() == []
