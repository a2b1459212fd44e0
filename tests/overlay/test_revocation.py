"""Revocation reaches the overlay, with the real nebula: a node removed from the control plane can no
longer handshake with a lighthouse whose config `vectorlay-control-plane overlay-host --db` wrote,
and the same node re-enrolled later, with its new certificate, is accepted again.

The lighthouse and the node are real nebula processes, each in a network namespace this test
creates and removes (tests/overlay/nebula_pair.py). The node's certificate is the one the control
plane's enrollment signed for it; its config is a minimal one (the product's node config is tested
in test_netns.py). Nebula re-reads pki.blocklist on SIGHUP (its examples/config.yml: the pki section
is HUPable; cert.go loadCAFromConfig, reloaded by interface.go reloadCA).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bootstrap import nebula
from bootstrap.overlay import TUN_DEVICE
from controlplane import cli as cp_cli
from controlplane.clock import Clock, wall_now
from controlplane.db import Database
from controlplane.nebula_ca import NebulaCA
from controlplane.pki import CertificateAuthority
from controlplane.service import ControlPlane

from .nebula_pair import MISSING, NEBULA_CERT, Underlay, host_config, underlay

pytestmark = pytest.mark.skipif(
    MISSING is not None, reason=f"{MISSING} (.ci/run runs as root and installs them)"
)

LIGHTHOUSE = "100.64.0.1"
UNDERLAY = {"lh": "192.0.2.1", "node": "192.0.2.2"}


def _csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "box")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


class Plane:
    """The control plane's service on its own database and state dir, one provider org."""

    def __init__(self, base: Path) -> None:
        self.state, self.db = base / "state", base / "cp.sqlite"
        self.cp = ControlPlane(
            Database(self.db),
            CertificateAuthority.load_or_create(self.state, wall_now()),
            Clock(),
            nebula_ca=NebulaCA.load_or_create(self.state, wall_now()),
        )
        self.org = self.cp.create_org("acme", provider=True, node_quota=None)["id"]
        self.api_key = self.cp.create_api_key(self.org)

    def enroll(self, out: Path, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """Enroll a node with a new nebula key, as the installer does; its files go to `out`. With
        `previous` (an earlier answer), the node re-enrolls presenting the credentials it holds."""
        private, public = nebula.generate_keypair()
        token = self.cp.create_provisioning_token(self.org)["token"]
        body = {
            "token": token,
            "csr_pem": _csr(),
            "nebula_public_key": public.decode(),
            "nomad_csr_pem": _csr(),
            "hostname": "box",
            "hardware": {},
            "gpu_mode": "none",
        }
        if previous is None:
            answer = self.cp.enroll(body, None, None)
        else:
            answer = self.cp.enroll(body, previous["certificate_pem"], previous["node_token"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "ca.crt").write_text(answer["nebula"]["ca"])
        (out / "node.crt").write_text(answer["nebula"]["certificate"])
        (out / "node.key").write_bytes(private)
        (out / "node.key").chmod(0o600)
        return answer

    def overlay_host(self, out: Path) -> None:
        """`vectorlay-control-plane overlay-host` for the lighthouse, with the control plane's db."""
        args = ["overlay-host", "--state-dir", str(self.state), "--name", "lighthouse"]
        args += ["--overlay-ip", LIGHTHOUSE, "--out", str(out), "--lighthouse", "--db", str(self.db)]
        try:
            cp_cli.main(args)
        except SystemExit as e:
            assert e.code in (0, None)


def _fingerprint(cert: Path) -> str:
    """The certificate's fingerprint as nebula itself computes it."""
    assert NEBULA_CERT is not None
    out = subprocess.run(
        [NEBULA_CERT, "print", "-json", "-path", str(cert)], capture_output=True, text=True, check=True
    )
    fingerprint: str = json.loads(out.stdout)["fingerprint"]
    return fingerprint


def _reaches(u: Underlay, tries: int) -> bool:
    # The first packets wait for the handshake; a few tries cover it.
    return any(u.ping("node", LIGHTHOUSE) for _ in range(tries))


def _wait_log(u: Underlay, name: str, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in u.log(name).read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {text!r} in {name}'s log\n{u.logs()}"
        time.sleep(0.1)


@pytest.fixture
def plane(tmp_path: Path) -> Plane:
    return Plane(tmp_path)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Underlay]:
    with underlay(tmp_path) as u:
        for name, address in UNDERLAY.items():
            u.attach(name, address)
        yield u


def _node_config(node_dir: Path, answer: dict[str, Any]) -> tuple[Path, str]:
    overlay = str(ipaddress.IPv4Interface(f"{answer['overlay_ip']}/10"))
    config = host_config(node_dir, "node", lighthouse=LIGHTHOUSE, lighthouse_underlay=UNDERLAY["lh"])
    return config, overlay.split("/")[0]


@pytest.mark.slow
def test_a_removed_node_is_refused_by_the_lighthouse_and_accepted_again_once_re_enrolled(
    plane: Plane, net: Underlay, tmp_path: Path
) -> None:
    lh_dir, node_dir = tmp_path / "lighthouse", tmp_path / "node"
    first = plane.enroll(node_dir)
    plane.overlay_host(lh_dir)
    lh_config = yaml.safe_load((lh_dir / "config.yml").read_text())
    assert lh_config["pki"]["blocklist"] == [] and lh_config["pki"]["disconnect_invalid"] is True
    net.start_nebula("lh", lh_dir / "config.yml", LIGHTHOUSE, tun=TUN_DEVICE)
    node_config, node_ip = _node_config(node_dir, first)
    net.start_nebula("node", node_config, node_ip)
    assert _reaches(net, tries=10), net.logs()

    # Decommissioned: the certificate it holds goes on the lighthouse's blocklist, which the
    # lighthouse's nebula takes on SIGHUP.
    removed = plane.cp.set_node_status(plane.api_key, plane.org, first["node_id"], {"status": "removed"})
    assert removed["status"] == "removed"
    old_fingerprint = _fingerprint(node_dir / "node.crt")
    plane.overlay_host(lh_dir)
    assert yaml.safe_load((lh_dir / "config.yml").read_text())["pki"]["blocklist"] == [old_fingerprint]
    net.reload_nebula("lh")
    _wait_log(net, "lh", "Trusted CA certificates refreshed")
    # The tunnel it had is closed (pki.disconnect_invalid), and a new handshake is refused.
    net.stop_nebula("node")
    net.start_nebula("node", node_config, node_ip)
    assert not _reaches(net, tries=5)
    _wait_log(net, "lh", "certificate has been blocked")

    # Re-enrolled with a new token: the same node and overlay address, a new certificate that is
    # not on the blocklist, accepted again.
    net.stop_nebula("node")
    second = plane.enroll(node_dir, previous=first)
    assert second["reenrolled"] and (second["node_id"], second["overlay_ip"]) == (
        first["node_id"],
        first["overlay_ip"],
    )
    assert _fingerprint(node_dir / "node.crt") != old_fingerprint
    plane.overlay_host(lh_dir)
    assert yaml.safe_load((lh_dir / "config.yml").read_text())["pki"]["blocklist"] == [old_fingerprint]
    net.reload_nebula("lh")
    node_config, node_ip = _node_config(node_dir, second)
    net.start_nebula("node", node_config, node_ip)
    assert _reaches(net, tries=10), net.logs()
