"""What makes the node's certificates usable, decided once for the installer (the enrollment answer,
before it is saved) and the doctor (what is stored): the key a certificate is for, the CA it chains
to, the names it carries, the overlay address nebula takes from it. Each caller words its own
messages; the judgement is here.

The doctor imports this module only when the node is enrolled: `cryptography` costs more start-up
time than the rest of the doctor together.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from bootstrap import nebula

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PublicKeyTypes

    _PublicKey = PublicKeyTypes | CertificatePublicKeyTypes

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def same_key(
    a: PublicKeyTypes | CertificatePublicKeyTypes, b: PublicKeyTypes | CertificatePublicKeyTypes
) -> bool:
    """Whether two public keys are the same key (their SubjectPublicKeyInfo)."""
    return bool(a.public_bytes(*_SPKI) == b.public_bytes(*_SPKI))


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether `ca` signed `cert` directly (the node's certificates have no intermediate)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def issuer_in(cert: x509.Certificate, ca_pem: bytes) -> x509.Certificate | None:
    """The CA of the bundle `ca_pem` (one CA, or the old and the new one while a CA is rolled) that
    signed `cert`; None when none did or the bundle is not PEM."""
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except (ValueError, TypeError):
        return None
    return next((ca for ca in cas if issued_by(cert, ca)), None)


def chained(cert_pem: bytes, ca_pem: bytes) -> x509.Certificate | None:
    """The certificate in `cert_pem` when it is one issued by a CA in `ca_pem`; None when either is
    not PEM or no CA there signed it."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, TypeError):
        return None
    return cert if issuer_in(cert, ca_pem) is not None else None


def common_name(cert: x509.Certificate) -> str | None:
    """The subject's first CN (the node certificate's is the node ID), None without one."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = cns[0].value if cns else None
    return value if isinstance(value, str) else None


def alt_names(cert: x509.Certificate) -> tuple[list[str], set[str]]:
    """The DNS names and IP addresses the certificate is for (its subjectAltName; none without one)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], set()
    return san.get_values_for_type(x509.DNSName), {str(a) for a in san.get_values_for_type(x509.IPAddress)}


def verified_nebula(cert_pem: bytes | str, ca_pem: bytes | str, now: datetime) -> nebula.NebulaCertificate:
    """The nebula certificate in `cert_pem`, when nebula would accept it as signed by the CA in
    `ca_pem` at `now`; raises nebula.NebulaCertError saying why not."""
    cert = nebula.parse_certificate_pem(cert_pem)
    nebula.verify_certificate(cert, nebula_issuer(cert, ca_pem), now)
    return cert


def nebula_issuer(cert: nebula.NebulaCertificate, ca_pem: bytes | str) -> nebula.NebulaCertificate:
    """The CA of the bundle `ca_pem` named as `cert`'s issuer (the first CA when none is: the check
    against it then says why it fails)."""
    cas = nebula.parse_certificate_bundle_pem(ca_pem)
    return next((ca for ca in cas if ca.fingerprint == cert.issuer), cas[0])


def overlay_ips(cert: nebula.NebulaCertificate) -> list[str]:
    """The addresses nebula gives the node: the ones its certificate names, in order."""
    return [str(i.ip) for i in cert.ips]
