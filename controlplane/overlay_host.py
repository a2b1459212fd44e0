"""Overlay identities for the control plane's own hosts (lighthouse, Nomad servers).

They join the same nebula network as the nodes, signed by the same CA, but carry the group
`vectorlay-control`: the only group a node's firewall lets in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from bootstrap.fsutil import atomic_write
from bootstrap.nebula import (
    NebulaCertError,
    generate_keypair,
    parse_certificate_pem,
    public_key_of_private_pem,
    public_key_pem,
    verify_certificate,
)
from bootstrap.overlay import CONTROL_GROUP, TUN_DEVICE
from controlplane.nebula_ca import NebulaCA
from controlplane.rotation import nebula_trust_pem

# Re-running re-signs a certificate that has less than this left.
RENEW_BEFORE = timedelta(days=30)


@dataclass(frozen=True)
class Lighthouse:
    overlay_ip: ipaddress.IPv4Address
    endpoints: tuple[str, ...]


def parse_lighthouse(spec: str) -> Lighthouse:
    """`OVERLAY_IP=HOST:PORT[,HOST:PORT...]`."""
    ip, sep, endpoints = spec.partition("=")
    try:
        address = ipaddress.IPv4Address(ip.strip())
    except ValueError:
        raise ValueError(f"{spec!r}: expected OVERLAY_IP=HOST:PORT") from None
    hosts = tuple(e.strip() for e in endpoints.split(",") if e.strip())
    if (
        not sep
        or not hosts
        or any(
            not (e.rpartition(":")[2].isascii() and e.rpartition(":")[2].isdigit()) or e.startswith(":")
            for e in hosts
        )
    ):
        raise ValueError(f"{spec!r}: expected OVERLAY_IP=HOST:PORT")
    return Lighthouse(address, hosts)


def host_config(
    out: Path,
    *,
    am_lighthouse: bool,
    listen_port: int,
    lighthouses: Sequence[Lighthouse],
    blocklist: Sequence[str] = (),
) -> dict[str, Any]:
    return {
        "pki": {
            "ca": str(out / "ca.crt"),
            "cert": str(out / "host.crt"),
            "key": str(out / "host.key"),
            # The certificates of removed nodes (ControlPlane.nebula_blocklist): nebula refuses a
            # handshake from a blocklisted certificate. Both keys are re-read on SIGHUP (nebula's
            # examples/config.yml: "Some options in this file are HUPable, including the pki
            # section"; cert.go loadCAFromConfig reads pki.blocklist, interface.go reloadCA is its
            # reload callback), and disconnect_invalid tears down a tunnel that a certificate
            # blocklisted since still holds (connection_manager.go handleInvalidCertificate).
            "blocklist": list(blocklist),
            "disconnect_invalid": True,
        },
        "static_host_map": {str(lh.overlay_ip): list(lh.endpoints) for lh in lighthouses},
        "lighthouse": {
            "am_lighthouse": am_lighthouse,
            "interval": 60,
            # A lighthouse does not query others: nebula refuses hosts on a lighthouse.
            "hosts": [] if am_lighthouse else [str(lh.overlay_ip) for lh in lighthouses],
        },
        "listen": {"host": "0.0.0.0", "port": listen_port},
        "punchy": {"punch": True, "respond": True},
        "tun": {"dev": TUN_DEVICE, "mtu": 1300},
        "logging": {"level": "info", "format": "text"},
        "firewall": {
            "outbound": [{"port": "any", "proto": "any", "host": "any"}],
            "inbound": [
                {"port": "any", "proto": "icmp", "host": "any"},
                {"port": "any", "proto": "any", "group": CONTROL_GROUP},
            ],
        },
    }


def _certificate_current(
    path: Path,
    ca: NebulaCA,
    *,
    name: str,
    ip: ipaddress.IPv4Interface,
    groups: Sequence[str],
    public_key: bytes,
    now: datetime,
) -> bool:
    try:
        cert = parse_certificate_pem(path.read_bytes())
        verify_certificate(cert, ca.certificate, now)
    except (OSError, NebulaCertError):
        return False
    return (
        cert.name == name
        and cert.ips == (ip,)
        and cert.groups == tuple(groups)
        and cert.public_key == public_key
        and cert.not_after - now > RENEW_BEFORE
    )


def write_overlay_host(
    state_dir: Path,
    out: Path,
    *,
    name: str,
    ip: ipaddress.IPv4Interface,
    groups: Sequence[str],
    am_lighthouse: bool,
    listen_port: int,
    lighthouses: Sequence[Lighthouse],
    now: datetime,
    blocklist: Sequence[str] = (),
) -> list[str]:
    """Write host.key (kept when present), host.crt, ca.crt and config.yml into `out`; return what changed."""
    ca = NebulaCA.load_or_create(state_dir, now)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    changed: list[str] = []
    key_path = out / "host.key"
    if key_path.exists():
        try:
            public_key = public_key_of_private_pem(key_path.read_bytes())
        except NebulaCertError as e:
            raise NebulaCertError(f"{key_path}: {e}") from None
    else:
        private, _ = generate_keypair()
        atomic_write(key_path, private, mode=0o600)
        public_key = public_key_of_private_pem(private)
        changed.append("host.key")

    cert_path = out / "host.crt"
    if not _certificate_current(
        cert_path, ca, name=name, ip=ip, groups=groups, public_key=public_key, now=now
    ):
        pem = ca.sign(public_key_pem(public_key).decode("ascii"), name=name, ip=ip, groups=groups, now=now)
        atomic_write(cert_path, pem, mode=0o644)
        changed.append("host.crt")

    config = yaml.safe_dump(
        host_config(
            out,
            am_lighthouse=am_lighthouse,
            listen_port=listen_port,
            lighthouses=lighthouses,
            blocklist=blocklist,
        ),
        sort_keys=False,
    )
    for file, data in (("ca.crt", nebula_trust_pem(state_dir, ca)), ("config.yml", config)):
        path = out / file
        if not path.exists() or path.read_text() != data:
            atomic_write(path, data, mode=0o644)
            changed.append(file)
    return changed
