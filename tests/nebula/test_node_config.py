"""The node's rendered nebula config, loaded by the real nebula with real files from our CA."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from bootstrap import nebula
from bootstrap.overlay import CONTROL_GROUP, NODE_GROUP, TUN_DEVICE
from bootstrap.templating import render
from controlplane.nebula_ca import NebulaCA

NebulaTest = Callable[[Path], subprocess.CompletedProcess[str]]


def _enrollment_nebula(ca: NebulaCA, public_pem: bytes, *, ip: str = "100.64.0.2") -> dict[str, Any]:
    """The enrollment answer's `nebula` object, as the control plane sends it."""
    cert = ca.sign(
        public_pem.decode(),
        name="node_0123",
        ip=ipaddress.IPv4Interface(f"{ip}/10"),
        groups=[NODE_GROUP],
        now=datetime.now(timezone.utc),
    )
    return {
        "certificate": cert,
        "ca": ca.ca_pem,
        "overlay_cidr": "100.64.0.0/10",
        "overlay_ip": ip,
        "lighthouses": [{"overlay_ip": "100.64.0.1", "endpoints": ["203.0.113.10:4242"]}],
        "groups": [NODE_GROUP],
        "listen_port": 4242,
    }


def _node(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    ca = NebulaCA.load_or_create(tmp_path / "cp", datetime.now(timezone.utc))
    identity = tmp_path / "identity"
    identity.mkdir()
    private, public = nebula.generate_keypair()
    answer = _enrollment_nebula(ca, public)
    (identity / "nebula.key").write_bytes(private)
    (identity / "nebula.key").chmod(0o600)
    (identity / "nebula.crt").write_text(answer["certificate"])
    (identity / "nebula-ca.crt").write_text(answer["ca"])
    config = tmp_path / "config.yml"
    config.write_text(
        render("nebula-config.yml.j2", nebula=answer, identity_dir=str(identity), tun_device=TUN_DEVICE)
    )
    return config, answer


def test_the_real_nebula_loads_the_rendered_config_with_the_nodes_files(
    tmp_path: Path, nebula_test: NebulaTest
) -> None:
    config, _ = _node(tmp_path)
    proc = nebula_test(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # nebula takes the address from the certificate and says so.
    assert "network=100.64.0.2/10" in proc.stdout + proc.stderr


def test_the_rendered_config_points_at_the_lighthouse_and_admits_only_the_control_group(
    tmp_path: Path,
) -> None:
    config, _ = _node(tmp_path)
    data = yaml.safe_load(config.read_text())
    identity = str(tmp_path / "identity")
    assert data["pki"] == {
        "ca": f"{identity}/nebula-ca.crt",
        "cert": f"{identity}/nebula.crt",
        "key": f"{identity}/nebula.key",
    }
    assert data["static_host_map"] == {"100.64.0.1": ["203.0.113.10:4242"]}
    assert data["lighthouse"] == {"am_lighthouse": False, "interval": 60, "hosts": ["100.64.0.1"]}
    assert data["listen"]["port"] == 4242
    assert data["tun"]["dev"] == TUN_DEVICE
    assert data["firewall"] == {
        "outbound": [{"port": "any", "proto": "any", "host": "any"}],
        "inbound": [{"port": "any", "proto": "any", "group": CONTROL_GROUP}],
    }


def test_the_node_files_chain_and_pair_as_nebula_checks_them(
    tmp_path: Path, nebula_test: NebulaTest, nebula_cert: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """nebula -test pairs key and certificate; the chain to the CA it checks only at handshakes, which
    nebula-cert verify does here. Both checks can fail, shown by breaking each file."""
    config, _ = _node(tmp_path)
    identity = tmp_path / "identity"
    nebula_cert("verify", "-ca", str(identity / "nebula-ca.crt"), "-crt", str(identity / "nebula.crt"))

    other = NebulaCA.load_or_create(tmp_path / "other", datetime.now(timezone.utc))
    (tmp_path / "other-ca.crt").write_text(other.ca_pem)
    proc = nebula_cert(
        "verify", "-ca", str(tmp_path / "other-ca.crt"), "-crt", str(identity / "nebula.crt"), check=False
    )
    assert proc.returncode != 0

    (identity / "nebula.key").write_bytes(nebula.generate_keypair()[0])
    proc = nebula_test(config)
    assert proc.returncode != 0 and "key" in (proc.stdout + proc.stderr).lower()


def test_without_lighthouses_the_config_is_still_valid_yaml_for_nebula(tmp_path: Path) -> None:
    text = render("nebula-config.yml.j2", nebula={}, identity_dir="/etc/vectorlay/identity", tun_device="x")
    data = yaml.safe_load(text)
    assert data["static_host_map"] == {} and data["lighthouse"]["hosts"] == []
    assert data["listen"]["port"] == 0
