"""The certificate judgements enrollment and the doctor share (bootstrap.credentials), on real
certificates made here."""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bootstrap import credentials

NOW = dt.datetime.now(dt.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    signer: ec.EllipticCurvePrivateKey,
    issuer: str,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
    )
    if san is not None:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(signer, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_a_certificate_is_for_its_own_key_only() -> None:
    key, other = _key(), _key()
    cert = _cert("node-1", key, key, "node-1")
    assert credentials.same_key(cert.public_key(), key.public_key())
    assert not credentials.same_key(cert.public_key(), other.public_key())


def test_the_chain_is_the_cas_signature_not_the_issuers_name() -> None:
    ca_key, impostor_key, node_key = _key(), _key(), _key()
    ca = _cert("vectorlay CA", ca_key, ca_key, "vectorlay CA")
    signed = _cert("node-1", node_key, ca_key, "vectorlay CA")
    # Same issuer name, another key: what a CA of the same name elsewhere would issue.
    forged = _cert("node-1", node_key, impostor_key, "vectorlay CA")
    assert credentials.issued_by(signed, ca)
    assert not credentials.issued_by(forged, ca)
    assert credentials.chained(_pem(signed), _pem(ca)) == signed
    assert credentials.chained(_pem(forged), _pem(ca)) is None
    assert credentials.chained(b"not a certificate", _pem(ca)) is None
    assert credentials.chained(_pem(signed), b"") is None


def test_names_come_from_the_subject_and_the_alt_names() -> None:
    key = _key()
    plain = _cert("node-7f3a", key, key, "x")
    assert credentials.common_name(plain) == "node-7f3a"
    assert credentials.alt_names(plain) == ([], set())
    named = _cert(
        "nomad",
        key,
        key,
        "x",
        [
            x509.DNSName("client.global.nomad"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("100.64.0.7")),
        ],
    )
    assert credentials.alt_names(named) == (["client.global.nomad"], {"127.0.0.1", "100.64.0.7"})
    no_cn = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme")]))
        .issuer_name(_name("x"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert credentials.common_name(no_cn) is None
