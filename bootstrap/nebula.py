"""Nebula's own key and certificate formats (the v1 format nebula 1.6 reads), without `nebula-cert`.

Nebula does not read X.509: its certificate is a protobuf message

    RawNebulaCertificate        { Details = 1 (message), Signature = 2 (bytes) }
    RawNebulaCertificateDetails { Name = 1, Ips = 2, Subnets = 3, Groups = 4, NotBefore = 5,
                                  NotAfter = 6, PublicKey = 7, IsCA = 8, Issuer = 9, Curve = 100 }

with `Ips`/`Subnets` packed uint32 pairs (address, mask), times in Unix seconds, `Issuer` the raw
sha256 of the issuing CA certificate, and `Signature` an Ed25519 signature over the marshalled
details. Nebula re-marshals the details from its parsed struct when it checks the signature, and
fingerprints a certificate by hashing its re-marshalled form, so the encoder below must produce
exactly the bytes Go's protobuf runtime does: fields in number order, repeated scalars packed,
proto3 defaults (empty, zero, false) left out. Parsing is strict where nebula would produce a
different struct than the bytes say (bad masks, invalid UTF-8) and bounded by the input size.

Keys are PEM blocks of raw bytes: X25519 host keys (32 bytes each) and the CA's Ed25519 private key
(64 bytes: seed then public key), under nebula's banners.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

CERT_BANNER = "NEBULA CERTIFICATE"
X25519_PRIVATE_BANNER = "NEBULA X25519 PRIVATE KEY"
X25519_PUBLIC_BANNER = "NEBULA X25519 PUBLIC KEY"
ED25519_PRIVATE_BANNER = "NEBULA ED25519 PRIVATE KEY"

KEY_LEN = 32
# A certificate is a few hundred bytes; anything far larger is not one, and refusing it early keeps
# parsing bounded whatever a caller hands over.
MAX_PEM_BYTES = 64 * 1024

_CURVE25519 = 0


class NebulaCertError(ValueError):
    """A nebula key or certificate is malformed, or does not verify."""


# --- PEM (Go's encoding/pem: 64-column base64 between BEGIN/END lines) ---

_PEM_RE = re.compile(
    rb"-----BEGIN (?P<type>[A-Z0-9 ]+)-----\r?\n(?P<body>[A-Za-z0-9+/=\s]*?)-----END (?P=type)-----"
)


def _pem_encode(banner: str, data: bytes) -> bytes:
    b64 = base64.b64encode(data).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return (
        f"-----BEGIN {banner}-----\n" + "".join(f"{line}\n" for line in lines) + f"-----END {banner}-----\n"
    ).encode("ascii")


def _pem_decode(data: bytes | str, banner: str, what: str) -> bytes:
    """The payload of the single PEM block in `data`, which must carry `banner`."""
    if isinstance(data, str):
        try:
            data = data.encode("ascii")
        except UnicodeEncodeError:
            raise NebulaCertError(f"{what}: not PEM (non-ASCII characters)") from None
    if len(data) > MAX_PEM_BYTES:
        raise NebulaCertError(f"{what}: {len(data)} bytes, larger than any {what} ({MAX_PEM_BYTES} max)")
    text = data.strip()
    if not text.startswith(b"-----BEGIN "):
        raise NebulaCertError(f"{what}: not PEM (no '-----BEGIN {banner}-----' line)")
    m = _PEM_RE.match(text)
    if m is None:
        raise NebulaCertError(f"{what}: truncated or malformed PEM block")
    found = m.group("type").decode("ascii")
    if found != banner:
        raise NebulaCertError(f"{what}: PEM banner is {found!r}, expected {banner!r}")
    if text[m.end() :].strip():
        raise NebulaCertError(f"{what}: unexpected data after the PEM block")
    try:
        return base64.b64decode(b"".join(m.group("body").split()), validate=True)
    except (binascii.Error, ValueError):
        raise NebulaCertError(f"{what}: PEM body is not valid base64") from None


# --- keys ---


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as (private PEM, public PEM), what `nebula-cert keygen` writes."""
    key = X25519PrivateKey.generate()
    private = key.private_bytes_raw()
    public = key.public_key().public_bytes_raw()
    return _pem_encode(X25519_PRIVATE_BANNER, private), _pem_encode(X25519_PUBLIC_BANNER, public)


def public_key_pem(public_key: bytes) -> bytes:
    if len(public_key) != KEY_LEN:
        raise NebulaCertError(f"X25519 public key: {len(public_key)} bytes, expected {KEY_LEN}")
    return _pem_encode(X25519_PUBLIC_BANNER, public_key)


def parse_public_key_pem(data: bytes | str) -> bytes:
    """The 32 raw bytes of a `NEBULA X25519 PUBLIC KEY` PEM block."""
    raw = _pem_decode(data, X25519_PUBLIC_BANNER, "nebula public key")
    if len(raw) != KEY_LEN:
        raise NebulaCertError(f"nebula public key: {len(raw)} bytes, expected {KEY_LEN}")
    if raw == bytes(KEY_LEN):
        raise NebulaCertError("nebula public key: all zero, not a usable X25519 key")
    return raw


def parse_private_key_pem(data: bytes | str) -> bytes:
    """The 32 raw bytes of a `NEBULA X25519 PRIVATE KEY` PEM block."""
    raw = _pem_decode(data, X25519_PRIVATE_BANNER, "nebula private key")
    if len(raw) != KEY_LEN:
        raise NebulaCertError(f"nebula private key: {len(raw)} bytes, expected {KEY_LEN}")
    return raw


def public_key_of_private_pem(data: bytes) -> bytes:
    """The raw X25519 public key belonging to a `NEBULA X25519 PRIVATE KEY` PEM block."""
    raw = parse_private_key_pem(data)
    return X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()


def ed25519_private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """A CA signing key as `nebula-cert ca` writes it: 64 bytes, seed then public key."""
    return _pem_encode(ED25519_PRIVATE_BANNER, key.private_bytes_raw() + key.public_key().public_bytes_raw())


def parse_ed25519_private_key_pem(data: bytes | str) -> Ed25519PrivateKey:
    raw = _pem_decode(data, ED25519_PRIVATE_BANNER, "nebula CA key")
    if len(raw) != 64:
        raise NebulaCertError(f"nebula CA key: {len(raw)} bytes, expected 64")
    key = Ed25519PrivateKey.from_private_bytes(raw[:32])
    if key.public_key().public_bytes_raw() != raw[32:]:
        raise NebulaCertError("nebula CA key: its public half does not match its seed")
    return key


# --- protobuf, the subset these two messages use ---


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values are sent as their 64-bit two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(payload)) + payload


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if pos >= len(buf):
            raise NebulaCertError("certificate: truncated (varint runs past the end)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if shift == 63 and b > 1:
                break
            return result & ((1 << 64) - 1), pos
    raise NebulaCertError("certificate: malformed varint")


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field of one message; unknown fields included."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise NebulaCertError("certificate: field number 0")
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
            yield number, wire_type, value
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if length > len(buf) - pos:
                raise NebulaCertError("certificate: truncated (a field runs past the end)")
            yield number, wire_type, buf[pos : pos + length]
            pos += length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            if size > len(buf) - pos:
                raise NebulaCertError("certificate: truncated (a field runs past the end)")
            yield number, wire_type, int.from_bytes(buf[pos : pos + size], "little")
            pos += size
        else:
            raise NebulaCertError(f"certificate: unsupported protobuf wire type {wire_type}")


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _uint32s(wire_type: int, value: int | bytes, into: list[int]) -> None:
    if wire_type == 2:
        assert isinstance(value, bytes)
        pos = 0
        while pos < len(value):
            v, pos = _read_varint(value, pos)
            into.append(v & 0xFFFFFFFF)
    elif wire_type == 0:
        assert isinstance(value, int)
        into.append(value & 0xFFFFFFFF)
    else:
        raise NebulaCertError("certificate: IP list has the wrong wire type")


def _want(wire_type: int, expected: int, name: str) -> None:
    if wire_type != expected:
        raise NebulaCertError(f"certificate: field {name} has the wrong wire type")


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise NebulaCertError(f"certificate: {name} is not valid UTF-8") from None


def _prefix_of(mask: int, what: str) -> int:
    prefix = 32 - (~mask & 0xFFFFFFFF).bit_length()
    if ((0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF) != mask:
        raise NebulaCertError(f"certificate: {what} mask {ipaddress.IPv4Address(mask)} is not a prefix")
    return prefix


def _mask_of(prefix: int) -> int:
    return (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF


def _unix(dt: datetime) -> int:
    # Go's Time.Unix(): whole seconds, rounded towards minus infinity.
    return int(dt.timestamp() // 1)


def _from_unix(seconds: int, name: str) -> datetime:
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise NebulaCertError(f"certificate: {name} {seconds} is out of range") from None


# --- the certificate ---


@dataclass(frozen=True)
class NebulaCertificate:
    name: str
    ips: tuple[ipaddress.IPv4Interface, ...]
    subnets: tuple[ipaddress.IPv4Network, ...]
    groups: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    public_key: bytes
    is_ca: bool
    issuer: str
    signature: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        for name in ("not_before", "not_after"):
            value = getattr(self, name)
            if value.tzinfo is None:
                raise NebulaCertError(f"certificate: {name} must be timezone-aware")
            # Whole seconds in UTC: exactly what the format can hold, so the value round-trips.
            object.__setattr__(self, name, value.astimezone(timezone.utc).replace(microsecond=0))
        try:
            bytes.fromhex(self.issuer)
        except ValueError:
            raise NebulaCertError(f"certificate: issuer {self.issuer!r} is not hex") from None

    def details_bytes(self) -> bytes:
        """The marshalled details, byte for byte what Go's protobuf makes: the signed message."""
        out = bytearray()
        if self.name:
            out += _len_field(1, self.name.encode("utf-8"))
        ips = b"".join(_varint(int(i.ip)) + _varint(_mask_of(i.network.prefixlen)) for i in self.ips)
        if ips:
            out += _len_field(2, ips)
        subnets = b"".join(
            _varint(int(n.network_address)) + _varint(_mask_of(n.prefixlen)) for n in self.subnets
        )
        if subnets:
            out += _len_field(3, subnets)
        for group in self.groups:
            out += _len_field(4, group.encode("utf-8"))
        if nb := _unix(self.not_before):
            out += _tag(5, 0) + _varint(nb)
        if na := _unix(self.not_after):
            out += _tag(6, 0) + _varint(na)
        if self.public_key:
            out += _len_field(7, self.public_key)
        if self.is_ca:
            out += _tag(8, 0) + b"\x01"
        if issuer := bytes.fromhex(self.issuer):
            out += _len_field(9, issuer)
        return bytes(out)

    def to_bytes(self) -> bytes:
        out = _len_field(1, self.details_bytes())
        if self.signature:
            out += _len_field(2, self.signature)
        return out

    def to_pem(self) -> bytes:
        return _pem_encode(CERT_BANNER, self.to_bytes())

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


def parse_certificate(raw: bytes) -> NebulaCertificate:
    """A certificate from its protobuf bytes (the body of the PEM block)."""
    if not raw:
        raise NebulaCertError("certificate: empty")
    details_parts: list[bytes] = []
    signature = b""
    for number, wire_type, value in _fields(raw):
        if number == 1:
            _want(wire_type, 2, "Details")
            assert isinstance(value, bytes)
            details_parts.append(value)  # repeated occurrences of a message field merge
        elif number == 2:
            _want(wire_type, 2, "Signature")
            assert isinstance(value, bytes)
            signature = value
    if not details_parts:
        raise NebulaCertError("certificate: no details")

    name = ""
    ips: list[int] = []
    subnets: list[int] = []
    groups: list[str] = []
    not_before = not_after = 0
    public_key = b""
    is_ca = False
    issuer = b""
    curve = _CURVE25519
    for number, wire_type, value in _fields(b"".join(details_parts)):
        if number in (1, 4, 7, 9):
            _want(wire_type, 2, str(number))
            assert isinstance(value, bytes)
            if number == 1:
                name = _text(value, "Name")
            elif number == 4:
                groups.append(_text(value, "a group"))
            elif number == 7:
                public_key = value
            else:
                issuer = value
        elif number in (2, 3):
            _uint32s(wire_type, value, ips if number == 2 else subnets)
        elif number in (5, 6, 8, 100):
            _want(wire_type, 0, str(number))
            assert isinstance(value, int)
            if number == 5:
                not_before = _int64(value)
            elif number == 6:
                not_after = _int64(value)
            elif number == 8:
                is_ca = value != 0
            else:
                curve = value
    if curve != _CURVE25519:
        raise NebulaCertError(f"certificate: curve {curve} is not supported (only Curve25519)")
    if len(ips) % 2 or len(subnets) % 2:
        raise NebulaCertError("certificate: IPs and subnets must come in (address, mask) pairs")
    if len(public_key) < KEY_LEN:
        raise NebulaCertError(f"certificate: public key is {len(public_key)} bytes, fewer than {KEY_LEN}")
    ip_list = tuple(
        ipaddress.IPv4Interface((ips[i], _prefix_of(ips[i + 1], "IP"))) for i in range(0, len(ips), 2)
    )
    subnet_list: list[ipaddress.IPv4Network] = []
    for i in range(0, len(subnets), 2):
        try:
            subnet_list.append(ipaddress.IPv4Network((subnets[i], _prefix_of(subnets[i + 1], "subnet"))))
        except ValueError:
            raise NebulaCertError(
                f"certificate: subnet {ipaddress.IPv4Address(subnets[i])} has host bits set"
            ) from None
    return NebulaCertificate(
        name=name,
        ips=ip_list,
        subnets=tuple(subnet_list),
        groups=tuple(groups),
        not_before=_from_unix(not_before, "NotBefore"),
        not_after=_from_unix(not_after, "NotAfter"),
        public_key=public_key,
        is_ca=is_ca,
        issuer=issuer.hex(),
        signature=signature,
    )


def parse_certificate_pem(data: bytes | str) -> NebulaCertificate:
    """A certificate from a `NEBULA CERTIFICATE` PEM block."""
    return parse_certificate(_pem_decode(data, CERT_BANNER, "nebula certificate"))


# A CA file holds more than one CA only while a CA is being rolled: the old and the new one.
MAX_BUNDLE = 8


def parse_certificate_bundle_pem(data: bytes | str) -> list[NebulaCertificate]:
    """The certificates of a CA file (`pki.ca`): one or more `NEBULA CERTIFICATE` PEM blocks, as
    nebula loads them (every CA in the file is trusted)."""
    raw = data.encode("ascii", "replace") if isinstance(data, str) else data
    if len(raw) > MAX_PEM_BYTES * MAX_BUNDLE:
        raise NebulaCertError(f"nebula CA bundle: {len(raw)} bytes, more than {MAX_BUNDLE} certificates")
    blocks = [m.group(0) for m in _PEM_RE.finditer(raw)]
    if not blocks:
        raise NebulaCertError("nebula certificate: not PEM (no '-----BEGIN NEBULA CERTIFICATE-----' line)")
    if len(blocks) > MAX_BUNDLE:
        raise NebulaCertError(f"nebula CA bundle: {len(blocks)} certificates, at most {MAX_BUNDLE}")
    if _PEM_RE.sub(b"", raw).strip():
        raise NebulaCertError("nebula CA bundle: data outside its PEM blocks")
    return [parse_certificate_pem(b) for b in blocks]


def sign_certificate(unsigned: NebulaCertificate, key: Ed25519PrivateKey) -> NebulaCertificate:
    """`unsigned` with its signature made by `key` (the CA's, or its own for a CA)."""
    return replace(unsigned, signature=key.sign(unsigned.details_bytes()))


def _signed_by(cert: NebulaCertificate, public_key: bytes) -> bool:
    if len(public_key) != KEY_LEN:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(cert.signature, cert.details_bytes())
    except (InvalidSignature, ValueError):
        return False
    return True


def _within(
    cert_net: ipaddress.IPv4Interface | ipaddress.IPv4Network,
    ca_nets: tuple[ipaddress.IPv4Interface, ...] | tuple[ipaddress.IPv4Network, ...],
) -> bool:
    # nebula's netMatch: the CA network holds the address, and the certificate's mask is no wider.
    address = cert_net.ip if isinstance(cert_net, ipaddress.IPv4Interface) else cert_net.network_address
    prefix = (
        cert_net.network.prefixlen if isinstance(cert_net, ipaddress.IPv4Interface) else cert_net.prefixlen
    )
    for ca_net in ca_nets:
        network = ca_net.network if isinstance(ca_net, ipaddress.IPv4Interface) else ca_net
        if address in network and prefix >= network.prefixlen:
            return True
    return False


def verify_certificate(cert: NebulaCertificate, ca: NebulaCertificate, now: datetime) -> None:
    """Raise NebulaCertError unless nebula would accept `cert` as signed by `ca` at `now`."""
    if not ca.is_ca:
        raise NebulaCertError(f"{ca.name!r} is not a CA certificate")
    if not _signed_by(ca, ca.public_key):
        raise NebulaCertError(f"CA {ca.name!r} is not self-signed (its signature does not match its key)")
    if cert.issuer != ca.fingerprint:
        raise NebulaCertError(
            f"certificate {cert.name!r} was issued by {cert.issuer or 'nobody'}, "
            f"not by this CA ({ca.fingerprint})"
        )
    for what, c in (("CA certificate", ca), ("certificate", cert)):
        if c.not_before > now:
            raise NebulaCertError(f"{what} {c.name!r} is not valid before {c.not_before.isoformat()}")
        if c.not_after < now:
            raise NebulaCertError(f"{what} {c.name!r} expired at {c.not_after.isoformat()}")
    if not _signed_by(cert, ca.public_key):
        raise NebulaCertError(f"certificate {cert.name!r}: signature does not match the CA's key")
    if cert.not_after > ca.not_after:
        raise NebulaCertError(f"certificate {cert.name!r} expires after its CA")
    if cert.not_before < ca.not_before:
        raise NebulaCertError(f"certificate {cert.name!r} is valid before its CA")
    if ca.groups:
        for group in cert.groups:
            if group not in ca.groups:
                raise NebulaCertError(
                    f"certificate {cert.name!r} has group {group!r}, which the CA does not allow"
                )
    if ca.ips:
        for ip in cert.ips:
            if not _within(ip, ca.ips):
                raise NebulaCertError(f"certificate {cert.name!r} has IP {ip}, outside the CA's IP ranges")
    if ca.subnets:
        for subnet in cert.subnets:
            if not _within(subnet, ca.subnets):
                raise NebulaCertError(
                    f"certificate {cert.name!r} has subnet {subnet}, outside the CA's subnets"
                )
