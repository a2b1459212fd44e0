"""The control plane's nebula CA: it signs the overlay identity of every node and control-plane host.

The files are exactly what `nebula-cert ca` writes (`nebula-ca.crt`, `nebula-ca.key`), so an operator
can take over with nebula's own tools. Signing takes only the host's X25519 public key, like
`nebula-cert sign -in-pub`: private keys are made where they are used and never travel.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bootstrap.fsutil import atomic_write
from bootstrap.nebula import (
    NebulaCertError,
    NebulaCertificate,
    ed25519_private_key_pem,
    parse_certificate_pem,
    parse_ed25519_private_key_pem,
    parse_public_key_pem,
    sign_certificate,
    verify_certificate,
)

CA_CERT_FILE = "nebula-ca.crt"
CA_KEY_FILE = "nebula-ca.key"
CA_NAME = "vectorlay overlay CA"
CA_DAYS = 3650
# A host certificate ends at least this long before its CA, leaving time to roll the CA out.
CA_MARGIN = timedelta(days=30)
# Clocks of nodes and servers disagree a little; a certificate valid from "now" on the signer would be
# "not yet valid" on a peer a minute behind.
CLOCK_SKEW = timedelta(minutes=5)


class NebulaCA:
    def __init__(self, certificate: NebulaCertificate, key: Ed25519PrivateKey) -> None:
        if not certificate.is_ca:
            raise NebulaCertError(f"{certificate.name!r} is not a CA certificate")
        if key.public_key().public_bytes_raw() != certificate.public_key:
            raise NebulaCertError("the nebula CA key does not belong to the CA certificate")
        self._certificate = certificate
        self._key = key

    @property
    def certificate(self) -> NebulaCertificate:
        return self._certificate

    @property
    def ca_pem(self) -> str:
        return self._certificate.to_pem().decode("ascii")

    @classmethod
    def load_or_create(cls, state_dir: Path, now: datetime, name: str = CA_NAME) -> NebulaCA:
        """The CA of `state_dir`, created (nebula-ca.key 0600, nebula-ca.crt 0644) on first use."""
        key_path, cert_path = state_dir / CA_KEY_FILE, state_dir / CA_CERT_FILE
        if cert_path.exists() and not key_path.exists():
            # Making a new CA here would silently cut off every host signed by the old one.
            raise NebulaCertError(f"{cert_path} exists but its key {key_path} is missing")
        if key_path.exists():
            try:
                key = parse_ed25519_private_key_pem(key_path.read_bytes())
            except NebulaCertError as e:
                raise NebulaCertError(f"{key_path}: {e}") from None
            if cert_path.exists():
                try:
                    return cls(parse_certificate_pem(cert_path.read_bytes()), key)
                except NebulaCertError as e:
                    raise NebulaCertError(f"{cert_path}: {e}") from None
            # A crash after the key but before the certificate: keep the key, finish the pair.
        else:
            key = Ed25519PrivateKey.generate()
            state_dir.mkdir(parents=True, exist_ok=True)
            # Key first, so a crash never leaves a certificate whose key is gone.
            atomic_write(key_path, ed25519_private_key_pem(key), mode=0o600)
        now = now.replace(microsecond=0)
        certificate = sign_certificate(
            NebulaCertificate(
                name=name,
                ips=(),
                subnets=(),
                groups=(),
                not_before=now - CLOCK_SKEW,
                not_after=now + timedelta(days=CA_DAYS),
                public_key=key.public_key().public_bytes_raw(),
                is_ca=True,
                issuer="",
            ),
            key,
        )
        atomic_write(cert_path, certificate.to_pem(), mode=0o644)
        return cls(certificate, key)

    def sign(
        self,
        public_key_pem: str,
        *,
        name: str,
        ip: ipaddress.IPv4Interface,
        groups: Sequence[str],
        now: datetime,
        days: int = 365,
    ) -> str:
        """A PEM host certificate for `public_key_pem` (a `NEBULA X25519 PUBLIC KEY` block)."""
        public_key = parse_public_key_pem(public_key_pem)
        if not name:
            raise NebulaCertError("a nebula certificate needs a name")
        if not isinstance(ip, ipaddress.IPv4Interface):
            raise NebulaCertError(f"nebula certificates carry IPv4 addresses only, not {ip!r}")
        if any(not g or "," in g for g in groups):
            raise NebulaCertError(f"invalid nebula group in {list(groups)!r}")
        if days < 1:
            raise NebulaCertError(f"certificate lifetime must be at least a day, not {days}")
        now = now.replace(microsecond=0)
        not_after = min(now + timedelta(days=days), self._certificate.not_after - CA_MARGIN)
        if not_after <= now:
            raise NebulaCertError(
                f"the nebula CA expires at {self._certificate.not_after.isoformat()}: too soon to sign; "
                "roll out a new CA"
            )
        certificate = sign_certificate(
            NebulaCertificate(
                name=name,
                ips=(ip,),
                subnets=(),
                groups=tuple(groups),
                not_before=max(now - CLOCK_SKEW, self._certificate.not_before),
                not_after=not_after,
                public_key=public_key,
                is_ca=False,
                issuer=self._certificate.fingerprint,
            ),
            self._key,
        )
        verify_certificate(certificate, self._certificate, now)
        return certificate.to_pem().decode("ascii")
