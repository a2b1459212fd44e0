from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bootstrap import nebula
from bootstrap.host import Host
from controlplane.pki import CertificateAuthority
from doctor.checks import run_checks
from doctor.identity import check_identity
from doctor.model import Status

NOW = dt.datetime.now(dt.timezone.utc)
Key = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str = "vectorlay node CA") -> tuple[Key, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=365))
        .not_valid_after(NOW + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _node_cert(
    ca: tuple[Key, x509.Certificate], key: Key, *, days_left: float = 365, days_old: float = 1
) -> x509.Certificate:
    ca_key, ca_cert = ca
    return (
        x509.CertificateBuilder()
        .subject_name(_name("node-7f3a"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=days_old))
        .not_valid_after(NOW + dt.timedelta(days=days_left))
        .sign(ca_key, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def enroll(
    host: Host,
    *,
    days_left: float = 365,
    days_old: float = 1,
    key_mode: int = 0o600,
    other_key: bool = False,
    other_ca: bool = False,
    overlay_ip: str = "100.64.0.7",
    nebula_ip: str = "100.64.0.7",
    nebula_days_left: float = 300,
    other_nebula_ca: bool = False,
    nomad_region: str = "global",
) -> Path:
    """Lay out /etc/vectorlay/identity/ as the enroll stage does."""
    ca = _ca()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _node_cert(ca, key, days_left=days_left, days_old=days_old)
    d = host.path("/etc/vectorlay/identity")
    d.mkdir(parents=True, mode=0o700)
    node = {"node_id": "node-7f3a", "org_id": "acme", "overlay_ip": overlay_ip}
    (d / "node.json").write_text(json.dumps(node))
    (d / "enrollment.json").write_text('{"nomad": {"region": "global"}}')
    _nebula_files(d, nebula_ip, nebula_days_left, other_nebula_ca)
    nomad_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name("nomad"))
        .sign(nomad_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    # The product's own signer makes the Nomad certificate: its names are what is under test.
    nomad_cert = CertificateAuthority(ca[1], ca[0]).sign_nomad_client_csr(
        csr, node_id="node-7f3a", region=nomad_region, overlay_ip=overlay_ip, now=NOW
    )
    (d / "nomad.crt").write_bytes(_pem(nomad_cert))
    fd = os.open(d / "nomad.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, _key_pem(nomad_key))
    os.close(fd)
    (d / "nomad-ca.crt").write_bytes(_pem(ca[1]))
    (d / "node.crt").write_bytes(_pem(cert))
    (d / "ca.crt").write_bytes(_pem(_ca("some other CA")[1] if other_ca else ca[1]))
    key_path = d / "node.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT, key_mode)
    os.write(fd, _key_pem(ec.generate_private_key(ec.SECP256R1()) if other_key else key))
    os.close(fd)
    os.chmod(key_path, key_mode)
    fd = os.open(d / "node-token", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"vnt_" + b"t" * 32 + b"\n")
    os.close(fd)
    return d


def _nebula_files(d: Path, ip: str, days_left: float, other_ca: bool) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    def ca_cert(key: ed25519.Ed25519PrivateKey) -> nebula.NebulaCertificate:
        unsigned = nebula.NebulaCertificate(
            name="vectorlay test nebula CA",
            ips=(),
            subnets=(),
            groups=(),
            not_before=NOW - dt.timedelta(days=1),
            not_after=NOW + dt.timedelta(days=3650),
            public_key=key.public_key().public_bytes_raw(),
            is_ca=True,
            issuer="",
        )
        return nebula.sign_certificate(unsigned, key)

    ca_key = ed25519.Ed25519PrivateKey.generate()
    ca = ca_cert(ca_key)
    private, public = nebula.generate_keypair()
    unsigned = nebula.NebulaCertificate(
        name="node-7f3a",
        ips=(ipaddress.IPv4Interface(f"{ip}/10"),),
        subnets=(),
        groups=("vectorlay-node",),
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=days_left),
        public_key=nebula.parse_public_key_pem(public),
        is_ca=False,
        issuer=ca.fingerprint,
    )
    (d / "nebula.crt").write_bytes(nebula.sign_certificate(unsigned, ca_key).to_pem())
    shown_ca = ca_cert(ed25519.Ed25519PrivateKey.generate()) if other_ca else ca
    (d / "nebula-ca.crt").write_bytes(shown_ca.to_pem())
    fd = os.open(d / "nebula.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, private)
    os.close(fd)


@pytest.fixture
def host(make_host: Callable[..., Host]) -> Host:
    return make_host("cpu-only")


def test_a_node_that_never_enrolled_skips_identity(host: Host) -> None:
    result = check_identity(host)
    assert (result.status, result.message) == (Status.SKIP, "not enrolled (no /etc/vectorlay/identity/)")


def test_a_valid_identity_passes_with_its_expiry_date_and_when_the_credentials_renew(host: Host) -> None:
    enroll(host, days_left=200)
    result = run_checks(host, env={}, only=["identity"]).get("identity")
    assert result.status is Status.PASS
    # The Nomad certificate (30 days, the control plane's default) renews first, at two thirds of its
    # life, and the node-agent renews every credential then.
    assert result.message == (
        f"node certificate valid until {NOW + dt.timedelta(days=200):%Y-%m-%d} UTC, renews in 19 days"
    )
    due = NOW + dt.timedelta(days=20) - dt.timedelta(minutes=5) + dt.timedelta(minutes=5) * 2 / 3
    assert result.details[0] == "CN=node-7f3a"
    lines = result.details[1:4]
    assert [d.split(" certificate valid until ")[0] for d in lines] == ["node", "nebula", "nomad"]
    assert all(d.endswith(f", renews {due:%Y-%m-%d}") for d in lines)
    # And the CA each certificate was issued by (during a CA rotation the node trusts two).
    assert [d.split(" (")[0] for d in result.details[4:]] == [
        "node certificate issued by CN=vectorlay node CA",
        "nomad certificate issued by CN=vectorlay node CA",
        "nebula certificate issued by vectorlay test nebula CA",
    ]


def test_a_renewal_overdue_warns_before_anything_expires(host: Host) -> None:
    enroll(host, days_left=5, days_old=25)
    result = check_identity(host, NOW.replace(microsecond=0))  # X.509 dates hold whole seconds
    assert result.status is Status.WARN
    assert result.message == (
        "credential renewal overdue by 5 days: the node certificate expires in 5 days, "
        f"on {NOW + dt.timedelta(days=5):%Y-%m-%d} UTC"
    )
    assert result.hint is not None and "vectorlay-node-agent --once --renew" in result.hint


def test_a_credential_before_its_renewal_time_does_not_warn_however_close_its_end(host: Host) -> None:
    # 10 days left of 11: renewal is due in 6 days, so nothing is wrong yet.
    enroll(host, days_left=10, nebula_days_left=10)
    assert check_identity(host, NOW).status is Status.PASS


def test_an_expired_certificate_fails(host: Host) -> None:
    enroll(host, days_left=-1, days_old=90)
    result = check_identity(host)
    assert result.status is Status.FAIL and result.message.startswith("node certificate expired on ")


def test_a_certificate_from_the_future_blames_the_clock(host: Host) -> None:
    enroll(host, days_old=-2)
    result = check_identity(host)
    assert result.status is Status.FAIL
    assert result.hint == "the system clock is wrong: enable time sync (sudo timedatectl set-ntp true)"


def test_a_world_readable_key_fails_with_the_chmod_fix(host: Host) -> None:
    enroll(host, key_mode=0o644)
    result = check_identity(host)
    assert result.status is Status.FAIL
    assert "node.key is mode 0644" in result.message
    assert result.hint == (
        "sudo chown root:root /etc/vectorlay/identity/node.key"
        " && sudo chmod 600 /etc/vectorlay/identity/node.key"
    )


def test_a_key_that_does_not_match_the_certificate_fails(host: Host) -> None:
    enroll(host, other_key=True)
    result = check_identity(host)
    assert result.status is Status.FAIL
    assert (
        result.message == "/etc/vectorlay/identity/node.key does not match /etc/vectorlay/identity/node.crt"
    )


def test_a_certificate_not_issued_by_the_stored_ca_fails(host: Host) -> None:
    enroll(host, other_ca=True)
    result = check_identity(host)
    assert result.status is Status.FAIL
    assert result.message == (
        "/etc/vectorlay/identity/node.crt was not issued by the CA in /etc/vectorlay/identity/ca.crt"
    )


def test_a_missing_file_fails_naming_it(host: Host) -> None:
    enroll(host).joinpath("ca.crt").unlink()
    result = check_identity(host)
    assert result.message == "identity incomplete: /etc/vectorlay/identity/ca.crt missing"


def test_garbage_in_the_certificate_is_a_fail_not_a_crash(host: Host) -> None:
    enroll(host).joinpath("node.crt").write_text("not a certificate\n")
    result = check_identity(host)
    assert result.status is Status.FAIL and "is not a PEM certificate" in result.message


def test_a_nebula_certificate_for_another_ip_than_node_json_fails(host: Host) -> None:
    enroll(host, overlay_ip="100.64.0.7", nebula_ip="100.64.0.9")
    result = check_identity(host)
    assert result.status is Status.FAIL
    assert result.message == (
        "/etc/vectorlay/identity/nebula.crt is for 100.64.0.9, but node.json says 100.64.0.7"
    )
    assert result.hint is not None and "re-enroll" in result.hint


def test_a_nebula_certificate_from_another_ca_fails(host: Host) -> None:
    enroll(host, other_nebula_ca=True)
    result = check_identity(host)
    assert result.status is Status.FAIL
    assert result.message.startswith("/etc/vectorlay/identity/nebula.crt: ")
    assert "was issued by " in result.message and "not by this CA" in result.message


def test_a_nebula_certificate_past_its_renewal_time_warns(host: Host) -> None:
    enroll(host, nebula_days_left=0.2)
    result = check_identity(host, NOW)
    assert result.status is Status.WARN
    assert result.message.startswith(
        "credential renewal overdue by 4 hours: the nebula certificate expires in 4 hours, on "
    )


def test_a_nomad_certificate_for_another_region_fails(host: Host) -> None:
    enroll(host, nomad_region="elsewhere")
    result = check_identity(host)
    assert result.status is Status.FAIL
    assert result.message == (
        "/etc/vectorlay/identity/nomad.crt does not name client.global.nomad: Nomad servers refuse it"
    )


def test_a_missing_nebula_certificate_fails_naming_it(host: Host) -> None:
    enroll(host).joinpath("nebula.crt").unlink()
    result = check_identity(host)
    assert result.message == "identity incomplete: /etc/vectorlay/identity/nebula.crt missing"
