"""bootstrap.nebula against the real nebula-cert (Debian's nebula 1.6.1): both directions, byte for byte."""

from __future__ import annotations

import base64
import ipaddress
import json
import subprocess
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bootstrap import nebula
from bootstrap.nebula import NebulaCertError, NebulaCertificate

Run = Callable[..., subprocess.CompletedProcess[str]]
NOW = datetime.now(timezone.utc).replace(microsecond=0)


def _ca(
    key: Ed25519PrivateKey, *, groups: tuple[str, ...] = (), ips: tuple[str, ...] = (), days: int = 3650
) -> NebulaCertificate:
    return nebula.sign_certificate(
        NebulaCertificate(
            name="test ca",
            ips=tuple(ipaddress.IPv4Interface(i) for i in ips),
            subnets=(),
            groups=groups,
            not_before=NOW - timedelta(minutes=1),
            not_after=NOW + timedelta(days=days),
            public_key=key.public_key().public_bytes_raw(),
            is_ca=True,
            issuer="",
        ),
        key,
    )


def _host(
    ca: NebulaCertificate,
    key: Ed25519PrivateKey,
    *,
    ip: str = "100.64.0.2/10",
    groups: tuple[str, ...] = ("g",),
) -> NebulaCertificate:
    public = nebula.parse_public_key_pem(nebula.generate_keypair()[1])
    return nebula.sign_certificate(
        NebulaCertificate(
            name="node-1",
            ips=(ipaddress.IPv4Interface(ip),),
            subnets=(),
            groups=groups,
            not_before=NOW,
            not_after=NOW + timedelta(days=30),
            public_key=public,
            is_ca=False,
            issuer=ca.fingerprint,
        ),
        key,
    )


def test_files_made_by_nebula_cert_parse_verify_and_re_encode_byte_identically(
    tmp_path: Path, nebula_cert: Run
) -> None:
    nebula_cert(
        "ca",
        "-name",
        "Real CA",
        "-groups",
        "vectorlay-node,x",
        "-ips",
        "100.64.0.0/10",
        "-subnets",
        "10.1.0.0/16",
    )
    nebula_cert("keygen", "-out-key", "h.key", "-out-pub", "h.pub")
    nebula_cert(
        "sign",
        "-name",
        "node-a",
        "-ip",
        "100.64.0.7/10",
        "-groups",
        "vectorlay-node",
        "-subnets",
        "10.1.2.0/24",
        "-in-pub",
        "h.pub",
        "-ca-crt",
        "ca.crt",
        "-ca-key",
        "ca.key",
    )
    ca_pem, crt_pem = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "node-a.crt").read_bytes()
    ca, crt = nebula.parse_certificate_pem(ca_pem), nebula.parse_certificate_pem(crt_pem)

    assert ca.to_pem() == ca_pem and crt.to_pem() == crt_pem
    printed = json.loads(nebula_cert("print", "-json", "-path", "node-a.crt").stdout)
    assert crt.fingerprint == printed["fingerprint"]
    assert crt.issuer == ca.fingerprint == printed["details"]["issuer"]
    assert crt.name == "node-a"
    assert crt.ips == (ipaddress.IPv4Interface("100.64.0.7/10"),)
    assert crt.subnets == (ipaddress.IPv4Network("10.1.2.0/24"),)
    assert crt.groups == ("vectorlay-node",)
    assert crt.not_after.tzinfo is not None and not crt.is_ca and ca.is_ca
    assert crt.public_key == nebula.parse_public_key_pem((tmp_path / "h.pub").read_bytes())
    assert crt.public_key == nebula.public_key_of_private_pem((tmp_path / "h.key").read_bytes())
    nebula.verify_certificate(crt, ca, datetime.now(timezone.utc))

    ca_key = nebula.parse_ed25519_private_key_pem((tmp_path / "ca.key").read_bytes())
    assert ca_key.public_key().public_bytes_raw() == ca.public_key
    assert nebula.ed25519_private_key_pem(ca_key) == (tmp_path / "ca.key").read_bytes()


def test_certificates_made_here_are_accepted_by_nebula_cert_verify(tmp_path: Path, nebula_cert: Run) -> None:
    key = Ed25519PrivateKey.generate()
    ca = _ca(key, groups=("g", "h"), ips=("100.64.0.0/10",))
    crt = _host(ca, key)
    (tmp_path / "ca.crt").write_bytes(ca.to_pem())
    (tmp_path / "h.crt").write_bytes(crt.to_pem())
    nebula_cert("verify", "-ca", "ca.crt", "-crt", "h.crt")
    printed = json.loads(nebula_cert("print", "-json", "-path", "h.crt").stdout)
    assert printed["details"]["ips"] == ["100.64.0.2/10"]
    assert printed["details"]["groups"] == ["g"]
    assert printed["fingerprint"] == crt.fingerprint


def test_a_key_pair_made_here_is_signed_by_nebula_cert_sign_in_pub(tmp_path: Path, nebula_cert: Run) -> None:
    private, public = nebula.generate_keypair()
    assert private.startswith(b"-----BEGIN NEBULA X25519 PRIVATE KEY-----\n")
    (tmp_path / "h.pub").write_bytes(public)
    nebula_cert("ca", "-name", "ca")
    nebula_cert(
        "sign",
        "-name",
        "h",
        "-ip",
        "100.64.0.3/10",
        "-in-pub",
        "h.pub",
        "-ca-crt",
        "ca.crt",
        "-ca-key",
        "ca.key",
    )
    crt = nebula.parse_certificate_pem((tmp_path / "h.crt").read_bytes())
    assert crt.public_key == nebula.public_key_of_private_pem(private) == nebula.parse_public_key_pem(public)


def test_a_tampered_certificate_is_refused_by_both(tmp_path: Path, nebula_cert: Run) -> None:
    key = Ed25519PrivateKey.generate()
    ca = _ca(key)
    forged = replace(_host(ca, key), ips=(ipaddress.IPv4Interface("100.64.0.9/10"),))
    (tmp_path / "ca.crt").write_bytes(ca.to_pem())
    (tmp_path / "h.crt").write_bytes(forged.to_pem())
    proc = nebula_cert("verify", "-ca", "ca.crt", "-crt", "h.crt", check=False)
    assert proc.returncode != 0 and "signature" in (proc.stdout + proc.stderr)
    with pytest.raises(NebulaCertError, match="signature does not match"):
        nebula.verify_certificate(forged, ca, NOW)


def test_verify_refuses_another_ca_expiry_and_a_non_ca() -> None:
    key, other_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    ca, other = _ca(key), _ca(other_key)
    crt = _host(ca, key)
    with pytest.raises(NebulaCertError, match="not by this CA"):
        nebula.verify_certificate(crt, other, NOW)
    with pytest.raises(NebulaCertError, match="expired at"):
        nebula.verify_certificate(crt, ca, NOW + timedelta(days=31))
    with pytest.raises(NebulaCertError, match="not valid before"):
        nebula.verify_certificate(crt, ca, NOW - timedelta(seconds=30))
    with pytest.raises(NebulaCertError, match="not a CA"):
        nebula.verify_certificate(crt, crt, NOW)
    not_self_signed = replace(ca, name="renamed")
    with pytest.raises(NebulaCertError, match="not self-signed"):
        nebula.verify_certificate(crt, not_self_signed, NOW)
    short_ca = _ca(key, days=10)
    with pytest.raises(NebulaCertError, match="expires after its CA"):
        nebula.verify_certificate(_host(short_ca, key), short_ca, NOW)


def test_verify_holds_the_cas_group_and_ip_constraints(tmp_path: Path, nebula_cert: Run) -> None:
    key = Ed25519PrivateKey.generate()
    ca = _ca(key, groups=("g",), ips=("100.64.0.0/10",))
    (tmp_path / "ca.crt").write_bytes(ca.to_pem())
    cases = {
        "group 'h'": _host(ca, key, groups=("g", "h")),
        "outside the CA's IP": _host(ca, key, ip="10.0.0.1/8"),
        "100.64.0.2/8": _host(ca, key, ip="100.64.0.2/8"),  # inside the range, but a wider mask
    }
    for reason, crt in cases.items():
        with pytest.raises(NebulaCertError, match=reason.split("/")[0] if "/" in reason else reason):
            nebula.verify_certificate(crt, ca, NOW)
        (tmp_path / "h.crt").write_bytes(crt.to_pem())
        assert nebula_cert("verify", "-ca", "ca.crt", "-crt", "h.crt", check=False).returncode != 0, reason
    nebula.verify_certificate(_host(ca, key, ip="100.64.3.4/16"), ca, NOW)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not PEM"),
        (b"garbage", "not PEM"),
        ("-----BEGIN NEBULA CERTIFICATE-----\nnot base64!\n-----END NEBULA CERTIFICATE-----\n", "malformed"),
        (b"-----BEGIN NEBULA CERTIFICATE-----\nAAAA\n", "truncated or malformed"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "banner is 'CERTIFICATE'"),
        (b"-----BEGIN NEBULA CERTIFICATE-----\n-----END NEBULA CERTIFICATE-----\n", "empty"),
        (b"x" * (nebula.MAX_PEM_BYTES + 1), "larger than"),
        ("-----BEGIN NEBULA CERTIFICATE-----\n\u00e9\n-----END NEBULA CERTIFICATE-----\n", "non-ASCII"),
    ],
)
def test_garbage_is_a_clear_error(data: bytes | str, reason: str) -> None:
    with pytest.raises(NebulaCertError, match=reason):
        nebula.parse_certificate_pem(data)


def test_every_truncation_of_a_certificate_is_a_clear_error() -> None:
    key = Ed25519PrivateKey.generate()
    raw = _host(_ca(key), key).to_bytes()
    for n in range(len(raw)):
        pem = (
            b"-----BEGIN NEBULA CERTIFICATE-----\n"
            + base64.b64encode(raw[:n])
            + b"\n-----END NEBULA CERTIFICATE-----\n"
        )
        try:
            crt = nebula.parse_certificate_pem(pem)
        except NebulaCertError:
            continue
        # A cut exactly at a field boundary is valid protobuf: then it must at least not verify.
        with pytest.raises(NebulaCertError):
            nebula.verify_certificate(crt, _ca(key), NOW)


def test_an_x509_certificate_is_refused_with_the_banner_named(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    with pytest.raises(NebulaCertError, match="expected 'NEBULA CERTIFICATE'"):
        nebula.parse_certificate_pem(pem)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"-----BEGIN NEBULA X25519 PRIVATE KEY-----\n"
        + base64.b64encode(bytes(range(32)))
        + b"\n-----END NEBULA X25519 PRIVATE KEY-----\n",
        b"-----BEGIN NEBULA X25519 PUBLIC KEY-----\n"
        + base64.b64encode(bytes(31))
        + b"\n-----END NEBULA X25519 PUBLIC KEY-----\n",
        b"-----BEGIN NEBULA X25519 PUBLIC KEY-----\n"
        + base64.b64encode(bytes(32))
        + b"\n-----END NEBULA X25519 PUBLIC KEY-----\n",
        "not a key",
    ],
)
def test_parse_public_key_refuses_anything_but_a_32_byte_public_key(data: bytes | str) -> None:
    with pytest.raises(NebulaCertError):
        nebula.parse_public_key_pem(data)


def test_public_key_accepts_str_and_bytes() -> None:
    private, public = nebula.generate_keypair()
    assert nebula.parse_public_key_pem(public.decode()) == nebula.parse_public_key_pem(public)
    assert nebula.public_key_of_private_pem(private) == nebula.parse_public_key_pem(public)
    with pytest.raises(NebulaCertError, match="banner"):
        nebula.public_key_of_private_pem(public)


def _raw_cert(details: bytes) -> bytes:
    return (
        b"-----BEGIN NEBULA CERTIFICATE-----\n"
        + base64.b64encode(b"\x0a" + bytes([len(details)]) + details)
        + (b"\n-----END NEBULA CERTIFICATE-----\n")
    )


@pytest.mark.parametrize(
    ("details", "reason"),
    [
        (b"\x12\x01\x01" + b"\x3a\x20" + bytes(32), "pairs"),  # one uint32 in Ips
        (b"\x12\x02\x01\x05" + b"\x3a\x20" + bytes(32), "not a prefix"),  # mask 0.0.0.5
        (b"\x3a\x10" + bytes(16), "fewer than 32"),
        (b"\x0a\x02\xff\xfe" + b"\x3a\x20" + bytes(32), "UTF-8"),
        (b"\x3a\x20" + bytes(32) + b"\xa0\x06\x01", "curve 1"),  # P256 (nebula 1.7+), field 100
        (b"\x0d\x00\x00", "truncated"),
    ],
)
def test_malformed_details_are_clear_errors(details: bytes, reason: str) -> None:
    with pytest.raises(NebulaCertError, match=reason):
        nebula.parse_certificate_pem(_raw_cert(details))
