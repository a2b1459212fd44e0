"""Rolling the control plane's CAs (the X.509 CA of the API and Nomad, and the nebula CA).

Three states of the state dir:

- one CA pair (`ca.*`, `nebula-ca.*`): the usual;
- `introduce`: a new pair in `next/` beside it. The server (restarted) then trusts client
  certificates of both, signs every new node credential with the new CAs and hands nodes both CAs
  (`ca_pem`, `nebula.ca`, `nomad.ca_pem` are bundles), so a node moves to the new CA at its next
  renewal while the old certificates keep working. The HTTPS server certificate stays with the old
  CA, which every node trusts; the overlay hosts' `ca.crt` and the Nomad servers' `ca.crt` become
  the bundle when `overlay-host` and `nomad-server-cert` are run again;
- `retire`: the new pair replaces the old one (kept in `retired/`), `next/` goes. Nodes that never
  renewed during the overlap are cut off and re-enroll.

A crash during `retire` leaves `next/` in place; running it again finishes it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bootstrap.credentials import same_key
from bootstrap.fsutil import atomic_write, fsync_dir
from controlplane import nebula_ca as nebula_ca_module
from controlplane import pki
from controlplane.nebula_ca import NebulaCA
from controlplane.pki import CertificateAuthority

NEXT_DIR = "next"
RETIRED_DIR = "retired"
# Keys before certificates: a crash between the two never leaves a certificate whose key is gone.
CA_FILES = (("ca.key", 0o600), ("ca.crt", 0o644), ("nebula-ca.key", 0o600), ("nebula-ca.crt", 0o644))


class RotationError(ValueError):
    pass


@dataclass(frozen=True)
class Authorities:
    ca: CertificateAuthority  # the HTTPS server's CA, trusted by every node
    nebula_ca: NebulaCA
    next_ca: CertificateAuthority | None = None  # during a rotation: signs what nodes get
    next_nebula_ca: NebulaCA | None = None


def rotating(state_dir: Path) -> bool:
    return all((state_dir / NEXT_DIR / name).is_file() for name, _mode in CA_FILES)


def load(state_dir: Path, now: datetime) -> Authorities:
    """The CAs of `state_dir` (created on first use) and, during a rotation, the new ones."""
    ca = CertificateAuthority.load_or_create(state_dir, now)
    if not same_key(ca.key.public_key(), ca.cert.public_key()):
        # Only an interrupted `ca retire` leaves a key beside another CA's certificate.
        raise RotationError(
            f"{state_dir}/ca.key does not belong to ca.crt: run `ca retire` again to finish it"
        )
    nebula = NebulaCA.load_or_create(state_dir, now)  # checks its own pair
    if not rotating(state_dir):
        return Authorities(ca, nebula)
    nxt = state_dir / NEXT_DIR
    return Authorities(
        ca, nebula, CertificateAuthority.load_or_create(nxt, now), NebulaCA.load_or_create(nxt, now)
    )


def nebula_trust_pem(state_dir: Path, current: NebulaCA) -> str:
    """What an overlay host's `pki.ca` holds: the nebula CA, and the new one during a rotation."""
    if not rotating(state_dir):
        return current.ca_pem
    return current.ca_pem + (state_dir / NEXT_DIR / "nebula-ca.crt").read_text()


def ca_trust_pem(state_dir: Path, current: CertificateAuthority) -> str:
    """What a Nomad server's `ca_file` holds: the X.509 CA, and the new one during a rotation."""
    if not rotating(state_dir):
        return current.cert_pem
    return current.cert_pem + (state_dir / NEXT_DIR / "ca.crt").read_text()


def introduce(state_dir: Path, now: datetime) -> Authorities:
    """Create the new CAs in `next/` (kept when there already); the authorities in force after."""
    for name, _mode in CA_FILES:
        if not (state_dir / name).is_file():
            raise RotationError(
                f"{state_dir} has no {name}: point --state-dir at the control plane's state dir"
            )
    nxt = state_dir / NEXT_DIR
    nxt.mkdir(mode=0o700, exist_ok=True)
    stamp = now.strftime("%Y-%m-%d")
    CertificateAuthority.load_or_create(nxt, now, name=f"{pki.CA_NAME} {stamp}")
    NebulaCA.load_or_create(nxt, now, name=f"{nebula_ca_module.CA_NAME} {stamp}")
    return load(state_dir, now)


def retire(state_dir: Path, now: datetime) -> Authorities:
    """The new CAs replace the old ones, which are kept in `retired/`."""
    nxt = state_dir / NEXT_DIR
    if not rotating(state_dir):
        raise RotationError(f"no CA rotation under way in {state_dir} (run `ca introduce` first)")
    retired = state_dir / RETIRED_DIR
    retired.mkdir(mode=0o700, exist_ok=True)
    for name, mode in CA_FILES:
        old, new = state_dir / name, nxt / name
        # A re-run after a crash finds some files already moved: those are not "retired" again.
        if old.read_bytes() != new.read_bytes():
            atomic_write(retired / name, old.read_bytes(), mode=mode)
    for name, mode in CA_FILES:
        atomic_write(state_dir / name, (nxt / name).read_bytes(), mode=mode)
    fsync_dir(state_dir)
    shutil.rmtree(nxt)
    fsync_dir(state_dir)
    return load(state_dir, now)
