"""controlplane.nebula_ca: its files and certificates as the real nebula-cert sees them."""

from __future__ import annotations

import ipaddress
import json
import stat
import subprocess
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from bootstrap import nebula
from bootstrap.nebula import NebulaCertError
from controlplane.nebula_ca import CA_MARGIN, NebulaCA

Run = Callable[..., subprocess.CompletedProcess[str]]
NOW = datetime.now(timezone.utc)
IP = ipaddress.IPv4Interface("100.64.0.2/10")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_ca_files_are_nebula_certs_own_and_stable(tmp_path: Path, nebula_cert: Run) -> None:
    state = tmp_path / "state"
    ca = NebulaCA.load_or_create(state, NOW)
    assert _mode(state / "nebula-ca.key") == 0o600 and _mode(state / "nebula-ca.crt") == 0o644
    assert (state / "nebula-ca.crt").read_text() == ca.ca_pem
    assert NebulaCA.load_or_create(state, NOW + timedelta(days=1)).certificate == ca.certificate
    assert ca.certificate.is_ca and ca.certificate.not_after - NOW > timedelta(days=9 * 365)

    printed = json.loads(nebula_cert("print", "-json", "-path", "state/nebula-ca.crt").stdout)
    assert printed["details"]["isCa"] is True and printed["fingerprint"] == ca.certificate.fingerprint
    # nebula-cert itself signs with our CA files: they are exactly what `nebula-cert ca` writes.
    nebula_cert("keygen", "-out-key", "h.key", "-out-pub", "h.pub")
    nebula_cert(
        "sign",
        "-name",
        "h",
        "-ip",
        "100.64.0.5/10",
        "-in-pub",
        "h.pub",
        "-ca-crt",
        "state/nebula-ca.crt",
        "-ca-key",
        "state/nebula-ca.key",
    )
    nebula_cert("verify", "-ca", "state/nebula-ca.crt", "-crt", "h.crt")
    nebula.verify_certificate(
        nebula.parse_certificate_pem((tmp_path / "h.crt").read_bytes()),
        ca.certificate,
        datetime.now(timezone.utc),
    )


def test_a_signed_host_certificate_is_what_nebula_cert_verify_and_print_see(
    tmp_path: Path, nebula_cert: Run
) -> None:
    ca = NebulaCA.load_or_create(tmp_path, NOW)
    private, public = nebula.generate_keypair()
    pem = ca.sign(public.decode(), name="node_0123abcd", ip=IP, groups=["vectorlay-node"], now=NOW)
    (tmp_path / "host.crt").write_text(pem)
    nebula_cert("verify", "-ca", "nebula-ca.crt", "-crt", "host.crt")
    details = json.loads(nebula_cert("print", "-json", "-path", "host.crt").stdout)["details"]
    assert details["name"] == "node_0123abcd"
    assert details["ips"] == ["100.64.0.2/10"]
    assert details["groups"] == ["vectorlay-node"]
    assert details["isCa"] is False
    assert details["publicKey"] == nebula.public_key_of_private_pem(private).hex()
    crt = nebula.parse_certificate_pem(pem)
    nebula.verify_certificate(crt, ca.certificate, NOW)
    assert crt.not_after - NOW.replace(microsecond=0) == timedelta(days=365)


def test_a_tampered_host_certificate_is_refused_by_nebula_cert_and_verify(
    tmp_path: Path, nebula_cert: Run
) -> None:
    ca = NebulaCA.load_or_create(tmp_path, NOW)
    pem = ca.sign(nebula.generate_keypair()[1].decode(), name="n", ip=IP, groups=["vectorlay-node"], now=NOW)
    crt = nebula.parse_certificate_pem(pem)
    tampered = replace(crt, groups=("vectorlay-control",))
    (tmp_path / "host.crt").write_bytes(tampered.to_pem())
    proc = nebula_cert("verify", "-ca", "nebula-ca.crt", "-crt", "host.crt", check=False)
    assert proc.returncode != 0 and "signature" in proc.stdout + proc.stderr
    with pytest.raises(NebulaCertError, match="signature"):
        nebula.verify_certificate(tampered, ca.certificate, NOW)


def test_expiry_is_capped_well_inside_the_cas_life(tmp_path: Path) -> None:
    ca = NebulaCA.load_or_create(tmp_path, NOW)
    pem = ca.sign(nebula.generate_keypair()[1].decode(), name="n", ip=IP, groups=[], now=NOW, days=100_000)
    assert nebula.parse_certificate_pem(pem).not_after == ca.certificate.not_after - CA_MARGIN
    with pytest.raises(NebulaCertError, match="too soon"):
        ca.sign(
            nebula.generate_keypair()[1].decode(),
            name="n",
            ip=IP,
            groups=[],
            now=ca.certificate.not_after - timedelta(days=10),
        )


@pytest.mark.parametrize(
    "public",
    [
        "",
        "garbage",
        nebula.generate_keypair()[0].decode(),  # a private key where the public one belongs
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ],
)
def test_a_bad_public_key_is_a_nebula_cert_error(tmp_path: Path, public: str) -> None:
    ca = NebulaCA.load_or_create(tmp_path, NOW)
    with pytest.raises(NebulaCertError):
        ca.sign(public, name="n", ip=IP, groups=["vectorlay-node"], now=NOW)


def test_a_crash_between_key_and_certificate_keeps_the_key(tmp_path: Path) -> None:
    ca = NebulaCA.load_or_create(tmp_path, NOW)
    (tmp_path / "nebula-ca.crt").unlink()
    again = NebulaCA.load_or_create(tmp_path, NOW)
    assert again.certificate.public_key == ca.certificate.public_key
    assert (tmp_path / "nebula-ca.crt").read_text() == again.ca_pem


def test_a_certificate_without_its_key_is_refused_not_replaced(tmp_path: Path) -> None:
    NebulaCA.load_or_create(tmp_path, NOW)
    (tmp_path / "nebula-ca.key").unlink()
    with pytest.raises(NebulaCertError, match="missing"):
        NebulaCA.load_or_create(tmp_path, NOW)


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path: Path) -> None:
    NebulaCA.load_or_create(tmp_path / "a", NOW)
    NebulaCA.load_or_create(tmp_path / "b", NOW)
    (tmp_path / "a" / "nebula-ca.key").write_bytes((tmp_path / "b" / "nebula-ca.key").read_bytes())
    with pytest.raises(NebulaCertError, match="does not belong"):
        NebulaCA.load_or_create(tmp_path / "a", NOW)
