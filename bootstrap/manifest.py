"""The control plane's artifact manifest: Ed25519-signed, verified against pinned keys.

The signature covers the manifest without its `signature` field, serialised canonically (sorted
keys, no whitespace, UTF-8). `jq -cS 'del(.signature)'` produces the same bytes, which is how
install.sh checks the manifest with nothing but jq and openssl.

A good signature proves the control plane signed the manifest once, not that it is the current
one. The update framework TUF names the two attacks that remain and the client rules against them,
which this module follows:
- rollback: something the node trusts for TLS (a proxy, a mis-issued certificate) replays an older
  manifest the control plane really signed, to bring back old versions. Each manifest carries a
  `serial` that only grows; the node remembers the highest serial it accepted and refuses any
  lower one (equal is fine: the same manifest fetched again).
- freeze: the same party keeps serving the last manifest forever, so the node never hears of a
  fix. Each manifest carries `expires_at`; an expired one is refused.
- and, as TUF does when the keys that sign its timestamps change, the remembered serial belongs to
  the set of pinned keys: a node enrolled anew (new keys pinned over the pinned TLS channel) starts
  counting again, so a control plane rebuilt from scratch is not locked out by its old serials.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from bootstrap.errors import VectorlayError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A path on the control plane or an https URL: printable, no white space, bounded.
_URL = re.compile(r"[!-~]{1,2048}")
MAX_ARTIFACTS = 64
MAX_ARTIFACT_SIZE = 1 << 40

STALE_HINT = "a stale artifact — re-run; artifacts are re-fetched and verified each run"


@dataclass(frozen=True)
class Artifact:
    name: str
    version: str
    url: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    version: str
    artifacts: tuple[Artifact, ...]
    serial: int
    issued_at: datetime
    expires_at: datetime

    def find(self, name: str) -> Artifact | None:
        for a in self.artifacts:
            if a.name == name:
                return a
        return None

    def get(self, name: str) -> Artifact:
        found = self.find(name)
        if found is not None:
            return found
        raise VectorlayError(
            f"the control plane's manifest {self.version} has no artifact named {name!r}",
            "re-run later; if it persists, contact support with this message",
        )


def canonical_bytes(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_manifest(doc: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    signed = dict(doc)
    signed["signature"] = base64.b64encode(key.sign(canonical_bytes(doc))).decode()
    return signed


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """A pinned key: PEM (SubjectPublicKeyInfo) or the raw 32 bytes in base64."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
            return key
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error, UnsupportedAlgorithm) as e:
        raise VectorlayError(
            f"the pinned manifest key is unreadable ({e})", "re-run the install one-liner to restore it"
        ) from None


def _timestamp(doc: dict[str, Any], field: str) -> datetime:
    value = doc.get(field)
    try:
        if not isinstance(value, str):
            raise ValueError
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"needs an ISO 8601 time '{field}', got {value!r:.60}") from None
    if stamp.tzinfo is None:
        raise ValueError(f"'{field}' has no time zone")
    return stamp


def _parse(doc: dict[str, Any]) -> Manifest:
    version = doc.get("version")
    items = doc.get("artifacts")
    if not isinstance(version, str) or not isinstance(items, list):
        raise ValueError("needs a string 'version' and a list 'artifacts'")
    if not _VERSION.fullmatch(version):
        raise ValueError(f"bad manifest version {version!r:.60}")
    if len(items) > MAX_ARTIFACTS:
        raise ValueError(f"lists {len(items)} artifacts, more than the {MAX_ARTIFACTS} a manifest may")
    serial = doc.get("serial")
    # A manifest without a serial is one from before serials existed: exactly what a rollback
    # would replay.
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 1:
        raise ValueError(f"needs a positive integer 'serial', got {serial!r:.60}")
    issued_at, expires_at = _timestamp(doc, "issued_at"), _timestamp(doc, "expires_at")
    if expires_at <= issued_at:
        raise ValueError("'expires_at' is not after 'issued_at'")
    arts = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("an artifact entry is not an object")
        name, ver, url, sha, size = (item.get(k) for k in ("name", "version", "url", "sha256", "size"))
        if not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise ValueError(f"bad artifact name {name!r:.60}")
        if not (isinstance(ver, str) and _VERSION.fullmatch(ver)):
            raise ValueError(f"bad version {ver!r:.60} for {name}")
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            raise ValueError(f"bad sha256 for {name}")
        if not (isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_ARTIFACT_SIZE):
            raise ValueError(f"bad size for {name}")
        if not isinstance(url, str) or not _URL.fullmatch(url):
            raise ValueError(f"bad url for {name}")
        arts.append(Artifact(name, ver, url, sha, size))
    return Manifest(version, tuple(arts), serial, issued_at, expires_at)


def verify_manifest(
    doc: Any, keys: Sequence[Ed25519PublicKey], source: str = "the control plane"
) -> Manifest:
    """Check the signature against any pinned key, then parse. Raises VectorlayError (502 ARTIFACT)."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(doc, dict):
        raise VectorlayError(f"the artifact manifest from {source} is not a JSON object", STALE_HINT)
    sig_text = doc.get("signature")
    try:
        sig = base64.b64decode(str(sig_text or ""), validate=True)
    except binascii.Error:
        sig = b""
    message = canonical_bytes(doc)
    for key in keys:
        try:
            key.verify(sig, message)
            break
        except InvalidSignature:
            continue
    else:
        raise VectorlayError(
            f"the artifact manifest from {source} does not carry a valid signature of the pinned key "
            "(502 ARTIFACT): refusing to install anything from it",
            "re-run; if it persists, the manifest was tampered with on the way — contact support",
        )
    try:
        return _parse(doc)
    except ValueError as e:
        raise VectorlayError(
            f"the signed artifact manifest from {source} is malformed: {e}", STALE_HINT
        ) from None


ROLLBACK_HINT = (
    "something between this node and the control plane (a TLS-intercepting proxy, a mis-issued "
    "certificate) serves an old manifest; nothing was changed. Check the node's network path and "
    "clock (timedatectl), pass --ca-file with the control plane's CA, and contact support if it persists"
)


def keyring_id(pinned: Sequence[str]) -> str:
    """Names a set of pinned keys, whatever their order or surrounding whitespace."""
    joined = "\n".join(sorted(k.strip() for k in pinned))
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


def check_fresh(
    manifest: Manifest, trusted_serial: int, source: str = "the control plane", now: datetime | None = None
) -> None:
    """Refuse a manifest older than the one already accepted (rollback) or past its expiry (freeze)."""
    now = now or datetime.now(timezone.utc)
    if manifest.serial < trusted_serial:
        raise VectorlayError(
            f"the artifact manifest from {source} has serial {manifest.serial}, older than serial "
            f"{trusted_serial} this node already accepted: refusing a rollback to older versions",
            ROLLBACK_HINT,
        )
    if manifest.expires_at <= now:
        stamp = manifest.expires_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        raise VectorlayError(
            f"the artifact manifest from {source} (serial {manifest.serial}) expired at {stamp}: "
            "refusing a stale manifest that may be hiding newer versions",
            ROLLBACK_HINT,
        )
