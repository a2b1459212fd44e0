"""The Nomad certificates the control plane's CA signs: the names and usages Nomad's TLS checks need."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.clock import wall_now
from controlplane.pki import NODE_CERT_DAYS, CertificateAuthority, CsrError


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str = "whatever") -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("server.global.nomad")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "state", wall_now())


def _names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [str(a) for a in san.get_values_for_type(x509.IPAddress)]


def test_the_node_nomad_certificate_names_the_client_role_and_ignores_what_the_csr_asks_for(
    ca: CertificateAuthority,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = wall_now().replace(microsecond=0)
    cert = ca.sign_nomad_client_csr(
        _csr(key, "server.global.nomad"),
        node_id="node_abc",
        region="global",
        overlay_ip="100.64.0.7",
        now=now,
    )
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "client.global.nomad"
    assert _names(cert) == (["client.global.nomad", "localhost"], ["127.0.0.1", "100.64.0.7"])
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == key.public_key().public_numbers()
    assert cert.not_valid_after_utc - now == timedelta(days=NODE_CERT_DAYS)
    cert.verify_directly_issued_by(ca.cert)


def test_the_nomad_server_certificate_names_the_server_role_and_has_its_own_key(
    ca: CertificateAuthority,
) -> None:
    key_pem, cert_pem = ca.issue_nomad_server_cert(region="eu-west", overlay_ip="100.64.0.1", now=wall_now())
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == key.public_key().public_numbers()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "server.eu-west.nomad"
    assert _names(cert) == (["server.eu-west.nomad", "localhost"], ["127.0.0.1", "100.64.0.1"])
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.verify_directly_issued_by(ca.cert)


@pytest.mark.parametrize(
    ("csr_pem", "message"),
    [
        ("not a csr", "not a PEM certificate signing request"),
        (_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "at least 2048 bits"),
    ],
)
def test_a_bad_nomad_csr_is_refused_like_a_bad_node_csr(
    ca: CertificateAuthority, csr_pem: str, message: str
) -> None:
    with pytest.raises(CsrError, match=message):
        ca.sign_nomad_client_csr(
            csr_pem, node_id="n", region="global", overlay_ip="100.64.0.7", now=wall_now()
        )


def test_a_csr_whose_signature_is_not_its_keys_is_refused(ca: CertificateAuthority) -> None:
    good = x509.load_pem_x509_csr(_csr(ec.generate_private_key(ec.SECP256R1())).encode())
    other = x509.load_pem_x509_csr(_csr(ec.generate_private_key(ec.SECP256R1())).encode())
    # Splice one request's public key into the other's signed body: DER surgery, not a builder.
    good_der, other_der = (
        good.public_bytes(serialization.Encoding.DER),
        other.public_bytes(serialization.Encoding.DER),
    )
    good_spki = good.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    other_spki = other.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert good_spki in good_der and other_spki in other_der
    forged = x509.load_der_x509_csr(good_der.replace(good_spki, other_spki))
    with pytest.raises(CsrError, match="signature"):
        ca.sign_nomad_client_csr(
            forged.public_bytes(serialization.Encoding.PEM).decode(),
            node_id="n",
            region="global",
            overlay_ip="100.64.0.7",
            now=wall_now(),
        )


@pytest.mark.parametrize(
    ("region", "overlay_ip", "message"),
    [
        ("Global", "100.64.0.7", "region"),
        ("a.b", "100.64.0.7", "region"),
        ("", "100.64.0.7", "region"),
        ("global", "100.64.0", "overlay IP"),
    ],
)
def test_a_region_that_is_no_dns_label_or_a_bad_ip_is_refused(
    ca: CertificateAuthority, region: str, overlay_ip: str, message: str
) -> None:
    csr = _csr(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ValueError, match=message):
        ca.sign_nomad_client_csr(csr, node_id="n", region=region, overlay_ip=overlay_ip, now=wall_now())
    with pytest.raises(ValueError, match=message):
        ca.issue_nomad_server_cert(region=region, overlay_ip=overlay_ip, now=wall_now())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_nomad_server_cert_writes_a_key_only_its_owner_reads_and_the_ca(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ca = CertificateAuthority.load_or_create(state, wall_now())
    out = tmp_path / "out"
    args = ["--state-dir", str(state), "--region", "global", "--overlay-ip", "100.64.0.1", "--out", str(out)]
    result = _cli("nomad-server-cert", *args)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "server.crt", "server.key"]
    assert stat.S_IMODE((out / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "server.crt").stat().st_mode) == 0o644
    assert (out / "ca.crt").read_bytes() == ca.cert.public_bytes(serialization.Encoding.PEM)
    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca.cert)
    assert _names(cert) == (["server.global.nomad", "localhost"], ["127.0.0.1", "100.64.0.1"])
    first_key = (out / "server.key").read_bytes()
    assert _cli("nomad-server-cert", *args).returncode == 0
    assert (out / "server.key").read_bytes() != first_key
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "server.crt", "server.key"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--region", "Not A Label"], "region 'Not A Label' is not a lowercase DNS label"),
        (["--overlay-ip", "nope"], "overlay IP 'nope' is not an IP address"),
    ],
)
def test_nomad_server_cert_refuses_bad_input_without_a_traceback(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    state = tmp_path / "state"
    CertificateAuthority.load_or_create(state, wall_now())
    args = ["--state-dir", str(state), "--overlay-ip", "100.64.0.1", "--out", str(tmp_path / "out"), *extra]
    result = _cli("nomad-server-cert", *args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_nomad_server_cert_does_not_mint_a_new_ca_in_a_mistyped_state_dir(tmp_path: Path) -> None:
    result = _cli(
        "nomad-server-cert",
        *(
            "--state-dir",
            str(tmp_path / "typo"),
            "--overlay-ip",
            "100.64.0.1",
            "--out",
            str(tmp_path / "out"),
        ),
    )
    assert result.returncode == 1
    assert "has no ca.key or ca.crt" in result.stderr
    assert not (tmp_path / "typo").exists()
    assert ipaddress.ip_address("100.64.0.1")  # the address itself was fine: the refusal is the state dir's
