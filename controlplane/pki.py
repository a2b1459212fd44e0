"""The control plane's own CA: it signs the HTTPS server certificate, every node's client certificate,
and the Nomad TLS identities of nodes and of the control plane's Nomad servers.

ECDSA P-256 throughout: signing is cheap enough to do inside the enrollment transaction, and every
TLS library a node runs understands it.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bootstrap.fsutil import atomic_write

# The default lifetime of a node's client and Nomad certificates (`serve --cert-days`): short, because
# the node-agent renews them at two thirds of their life, and a leaked key is good for weeks, not years.
# The server also accepts only the fingerprints it currently holds for each node.
NODE_CERT_DAYS = 30
CA_DAYS = 3650
CA_NAME = "vectorlay reference control plane CA"
SERVER_CERT_DAYS = 825


class CsrError(ValueError):
    pass


# Nomad puts the region into a DNS name (`server.<region>.nomad`), so it has to be one DNS label.
_REGION = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _nomad_name(role: str, region: str) -> str:
    """`server.<region>.nomad` or `client.<region>.nomad`: what Nomad checks with verify_server_hostname."""
    if not _REGION.fullmatch(region):
        raise ValueError(f"region {region!r} is not a lowercase DNS label (letters, digits, '-')")
    return f"{role}.{region}.nomad"


def _nomad_san(role: str, region: str, overlay_ip: str) -> list[x509.GeneralName]:
    try:
        overlay = ipaddress.ip_address(overlay_ip)
    except ValueError:
        raise ValueError(f"overlay IP {overlay_ip!r} is not an IP address") from None
    san: list[x509.GeneralName] = [
        x509.DNSName(_nomad_name(role, region)),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    if x509.IPAddress(overlay) not in san:
        san.append(x509.IPAddress(overlay))
    return san


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@functools.lru_cache(maxsize=4096)
def peer_certificate(pem: str) -> tuple[str, datetime]:
    """Fingerprint and expiry of a client certificate the TLS layer verified (PEM, as in the WSGI
    environ). Cached: a node presents the same certificate every heartbeat."""
    cert = x509.load_pem_x509_certificate(pem.encode())
    return fingerprint(cert), cert.not_valid_after_utc


def key_fingerprint(public_key: object) -> str:
    assert isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey))
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def load_or_create(cls, state_dir: Path, now: datetime, name: str = CA_NAME) -> CertificateAuthority:
        """The CA of `state_dir`, created (ca.key 0600, ca.crt) on first use."""
        state_dir.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = state_dir / "ca.key", state_dir / "ca.crt"
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC key")
            return cls(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        # Key first: a crash between the two writes leaves no ca.crt, so the next start makes a new
        # pair instead of loading a certificate without its key.
        atomic_write(key_path, _pem_key(key), mode=0o600)
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return cls(cert, key)

    def _leaf(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
        now: datetime,
        days: int,
        usage: x509.ObjectIdentifier,
        san: list[x509.GeneralName],
        extra_usages: tuple[x509.ObjectIdentifier, ...] = (),
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage, *extra_usages]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def write_server_cert(
        self, state_dir: Path, host: str, now: datetime, extra_names: tuple[str, ...] = ()
    ) -> tuple[Path, Path]:
        """A fresh server key and certificate for `host` (plus localhost and `extra_names`, e.g. the
        public URL's host when nodes reach the server under another name), every start."""
        key = ec.generate_private_key(ec.SECP256R1())
        san: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        for name in (host, *extra_names):
            try:
                addr = ipaddress.ip_address(name)
                entry: x509.GeneralName = x509.IPAddress(addr)
            except ValueError:
                entry = x509.DNSName(name)
            if entry not in san:
                san.append(entry)
        cert = self._leaf(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]),
            key.public_key(),
            now,
            SERVER_CERT_DAYS,
            ExtendedKeyUsageOID.SERVER_AUTH,
            san,
        )
        key_path, cert_path = state_dir / "server.key", state_dir / "server.crt"
        atomic_write(key_path, _pem_key(key), mode=0o600)
        atomic_write(
            cert_path, cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem.encode(), mode=0o600
        )
        return cert_path, key_path

    def sign_node_csr(
        self, csr_pem: str, node_id: str, org_id: str, now: datetime, days: int = NODE_CERT_DAYS
    ) -> x509.Certificate:
        """The node's client certificate: subject and SAN are set here, never taken from the CSR."""
        public_key = _csr_public_key(csr_pem)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, org_id),
                x509.NameAttribute(NameOID.COMMON_NAME, node_id),
            ]
        )
        san: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(f"spiffe://vectorlay/org/{org_id}/node/{node_id}")
        ]
        return self._leaf(subject, public_key, now, days, ExtendedKeyUsageOID.CLIENT_AUTH, san)

    def sign_nomad_client_csr(
        self,
        csr_pem: str,
        *,
        node_id: str,
        region: str,
        overlay_ip: str,
        now: datetime,
        days: int = NODE_CERT_DAYS,
    ) -> x509.Certificate:
        """The node's Nomad certificate, for the key in the CSR (made on the node).

        Nomad servers with `verify_server_hostname` accept RPC only from `client.<region>.nomad`, so
        that is the name, whatever the CSR asks for; the node is known by its Nomad node ID, not by
        this certificate. The client's HTTP API (:4646) presents the same certificate, hence
        serverAuth next to clientAuth and the addresses it answers on (loopback, the overlay IP).
        """
        public_key = _csr_public_key(csr_pem)
        if not node_id:
            raise ValueError("node_id is empty")
        name = _nomad_name("client", region)
        # Every node carries the same name; the OU tells an operator whose certificate this is.
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, node_id),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        return self._leaf(
            subject,
            public_key,
            now,
            days,
            ExtendedKeyUsageOID.SERVER_AUTH,
            _nomad_san("client", region, overlay_ip),
            extra_usages=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        )

    def issue_nomad_server_cert(self, *, region: str, overlay_ip: str, now: datetime) -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) for one of the control plane's Nomad servers: `server.<region>.nomad`.

        clientAuth too, because servers dial each other (raft, serf over RPC) with the same certificate.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        name = _nomad_name("server", region)
        cert = self._leaf(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
            key.public_key(),
            now,
            SERVER_CERT_DAYS,
            ExtendedKeyUsageOID.SERVER_AUTH,
            _nomad_san("server", region, overlay_ip),
            extra_usages=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        )
        return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


def _csr_public_key(
    csr_pem: str,
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey:
    """The CSR's public key once the CSR is well formed, self-signed and of a key type we sign."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except (ValueError, TypeError):
        raise CsrError("csr_pem is not a PEM certificate signing request") from None
    try:
        valid = csr.is_signature_valid
    except InvalidSignature:
        valid = False
    if not valid:
        raise CsrError("the CSR's signature does not match its public key")
    public_key = csr.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise CsrError("RSA keys must have at least 2048 bits")
    elif not isinstance(public_key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise CsrError("the CSR's key must be EC, Ed25519 or RSA")
    return public_key


def csr_key_fingerprint(csr_pem: str) -> str:
    """The fingerprint of a CSR's key, once the CSR passed every check signing will make: enrollment
    asks for it before touching the token, so a CSR that could not be signed is a 400 that leaves
    the token unused, never a failure half-way through."""
    return key_fingerprint(_csr_public_key(csr_pem))
