"""When the node's credentials renew: each at two thirds of its lifetime, all together at the earliest.

The node-agent renews every credential at once (one new generation of the identity directory), so
the schedule is the earliest renewal time of the three certificates: the node's client certificate,
its nebula certificate and its Nomad certificate. The doctor reads the same schedule to say when the
next renewal is due and to warn when one is overdue. Two thirds, like kubelet's client certificate
rotation (70-90%): a third of the lifetime is left for retries, and a node that is off for a while
comes back with time to spare.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from bootstrap.paths import IDENTITY_DIR

RENEW_FRACTION = 2 / 3
# What each credential is called in messages, and its certificate file in the identity directory.
CREDENTIALS = (("node", "node.crt"), ("nebula", "nebula.crt"), ("nomad", "nomad.crt"))


class Credential(NamedTuple):
    kind: str  # "node", "nebula", "nomad"
    not_before: datetime
    not_after: datetime

    @property
    def renew_at(self) -> datetime:
        return renew_time(self.not_before, self.not_after)


def renew_time(not_before: datetime, not_after: datetime) -> datetime:
    return not_before + timedelta(seconds=(not_after - not_before).total_seconds() * RENEW_FRACTION)


class CredentialError(ValueError):
    """A certificate of the identity directory that cannot be read."""


def read_credentials(directory: Path) -> list[Credential]:
    """The validity of each certificate in `directory` (an identity directory), in CREDENTIALS' order."""
    from cryptography import x509

    from bootstrap import nebula

    out = []
    for kind, file in CREDENTIALS:
        where = f"{IDENTITY_DIR}/{file}"
        try:
            data = (directory / file).read_bytes()
        except OSError as e:
            raise CredentialError(f"cannot read {where}: {e.strerror or e}") from None
        try:
            if kind == "nebula":
                cert = nebula.parse_certificate_pem(data)
                out.append(Credential(kind, cert.not_before, cert.not_after))
            else:
                x = x509.load_pem_x509_certificate(data)
                out.append(Credential(kind, x.not_valid_before_utc, x.not_valid_after_utc))
        except ValueError as e:  # NebulaCertError is a ValueError
            raise CredentialError(f"{where} is not a certificate: {e}") from None
    return out


def next_renewal(credentials: list[Credential]) -> datetime:
    """When the identity is to be renewed: the earliest renewal time of its credentials."""
    return min(c.renew_at for c in credentials)
