"""The control plane's answers, held to their contract before the node acts on any of them.

An answer is bad input like any other: a field of the wrong type, a string of a megabyte, an
overlay address on loopback or a network of /0 would otherwise be written into the node's identity
and its agents' configs, or crash the command reading it. Each reader here returns the answer's
fields it checked, or raises AnswerError naming the first field that is wrong and how; the caller
turns that into its own message. Nothing is echoed unbounded: a value is shown by `shown`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Node and org IDs, group and class names: what the reference control plane makes (node_<hex>,
# org_<hex>), with room for another's, never a control character, a space or a path separator.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# A bearer secret goes into an HTTP header and a file: URL-safe base64 and its prefix, no more.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,512}")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):(?P<port>[0-9]{1,5})")
# A public key as PEM or bare base64 (bootstrap.manifest.public_key_from_text parses it).
_KEY = re.compile(r"[A-Za-z0-9+/= \r\n-]+")
_PEM_LIMIT = 64 * 1024
_TEXT_LIMIT = 1024
_LIST_LIMIT = 64
# Nomad's node meta is free text the scheduler shows; printable, bounded.
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]*")
# Where an overlay may live: RFC 1918's private networks and RFC 6598's shared address space (the
# reference control plane's 100.64.0.0/10). Not Python's is_private, which also holds loopback,
# 0.0.0.0/8 and the documentation networks.
_OVERLAY_RANGES = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)
_RANGES_TEXT = "10/8, 172.16/12, 192.168/16 or 100.64/10"


class AnswerError(ValueError):
    """What is wrong with an answer, as `<field> <what>`."""


def shown(value: Any) -> str:
    """A value as a message may show it: a string cut at 60 characters (and its repr at 80), other
    types by name."""
    if isinstance(value, str):
        # The repr of 60 characters can be ten times longer (\U0010ffff each): cut it too.
        text = repr(value[:60])
        return text[:80] + ("..." if len(value) > 60 or len(text) > 80 else "")
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value) if not isinstance(value, int) or abs(value) < 10**18 else "a huge number"
    if isinstance(value, dict):
        return "an object"
    return "a list" if isinstance(value, list) else type(value).__name__


def obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise AnswerError(f"{where} is {shown(value)}, not an object")
    return value


def text(value: Any, where: str, *, limit: int = _TEXT_LIMIT, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str):
        raise AnswerError(f"{where} is {shown(value)}, not a string")
    if not value or len(value) > limit:
        raise AnswerError(f"{where} must be 1-{limit} characters, not {len(value)}")
    if pattern is not None and not pattern.fullmatch(value):
        raise AnswerError(f"{where} {shown(value)} is not of the expected form")
    if pattern is None and not _PRINTABLE.fullmatch(value):
        raise AnswerError(f"{where} holds a control character")
    return value


def integer(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise AnswerError(f"{where} is {shown(value)}, not a whole number from {low} to {high}")
    return value


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise AnswerError(f"{where} is {shown(value)}, not true or false")
    return value


def items(
    value: Any, where: str, check: Callable[[Any, str], T], *, limit: int = _LIST_LIMIT, least: int = 0
) -> list[T]:
    if not isinstance(value, list):
        raise AnswerError(f"{where} is {shown(value)}, not a list")
    if not least <= len(value) <= limit:
        raise AnswerError(f"{where} must hold {least}-{limit} entries, not {len(value)}")
    return [check(v, f"{where}[{i}]") for i, v in enumerate(value)]


def pem(value: Any, where: str) -> str:
    return text(value, where, limit=_PEM_LIMIT, pattern=re.compile(r"-----BEGIN [A-Z0-9 ]+-----[\s\S]*"))


def overlay_network(value: Any, where: str) -> ipaddress.IPv4Network:
    """An overlay's network: private (RFC 1918) or shared (RFC 6598) IPv4, between /8 and /30. Nebula
    routes the whole network into its tun: a /0 would take every address, loopback the host's own."""
    raw = text(value, where, limit=18)
    try:
        net = ipaddress.IPv4Network(raw, strict=True)
    except ValueError:
        raise AnswerError(f"{where} {shown(raw)} is not an IPv4 network (a.b.c.d/n)") from None
    if not 8 <= net.prefixlen <= 30:
        raise AnswerError(f"{where} {raw} is a /{net.prefixlen}: an overlay is between /8 and /30")
    if not any(net.subnet_of(r) for r in _OVERLAY_RANGES):
        raise AnswerError(f"{where} {raw} is not inside {_RANGES_TEXT}")
    return net


def overlay_address(value: Any, where: str, net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """A host address inside the overlay `net` (neither its network nor its broadcast address)."""
    raw = text(value, where, limit=15)
    try:
        ip = ipaddress.IPv4Address(raw)
    except ValueError:
        raise AnswerError(f"{where} {shown(raw)} is not an IPv4 address") from None
    if ip not in net or ip in (net.network_address, net.broadcast_address):
        raise AnswerError(f"{where} {ip} is not a host address of the overlay {net}")
    return ip


def host_port(value: Any, where: str) -> str:
    raw = text(value, where, limit=262)
    m = _HOST_PORT.fullmatch(raw)
    if m is None or not 1 <= int(m["port"]) <= 65535:
        raise AnswerError(f"{where} {shown(raw)} is not host:port")
    return raw


def introspection(body: Any) -> tuple[bool, str | None, str | None]:
    """POST /v1/provisioning-tokens/introspect: (valid, expires_at, reason)."""
    body = obj(body, "the answer")
    if "valid" not in body:
        raise AnswerError("valid is missing")
    valid = boolean(body["valid"], "valid")
    expires = body.get("expires_at")
    if expires is not None:
        text(expires, "expires_at", limit=64)
    reason = body.get("reason")
    if reason is not None:
        reason = text(reason, "reason", limit=64)
    return valid, expires, reason


def enrollment(body: Any) -> dict[str, Any]:
    """POST /v1/nodes/enroll: every field the node writes into its identity or its agents' configs,
    checked; returns the answer (the checks do not change it)."""
    answer = body = obj(body, "the answer")
    for field in ("node_id", "org_id"):
        text(body.get(field), field, limit=128, pattern=_ID)
    text(body.get("node_token"), "node_token", limit=512, pattern=_TOKEN)
    pem(body.get("certificate_pem"), "certificate_pem")
    pem(body.get("ca_pem"), "ca_pem")
    if "reenrolled" in body:
        boolean(body["reenrolled"], "reenrolled")
    if body.get("manifest_keys") is not None:
        items(
            body["manifest_keys"], "manifest_keys", lambda v, w: text(v, w, limit=4096, pattern=_KEY), limit=8
        )

    neb = obj(body.get("nebula"), "nebula")
    pem(neb.get("certificate"), "nebula.certificate")
    pem(neb.get("ca"), "nebula.ca")
    if neb.get("overlay_cidr") is not None:
        net = overlay_network(neb["overlay_cidr"], "nebula.overlay_cidr")
    else:  # not in every control plane's answer: then the widest overlay the rules allow
        net = ipaddress.IPv4Network("0.0.0.0/0")
    ip = overlay_address(body.get("overlay_ip"), "overlay_ip", net)
    if not any(ip in r for r in _OVERLAY_RANGES):
        raise AnswerError(f"overlay_ip {ip} is not inside {_RANGES_TEXT}")
    if neb.get("overlay_ip") not in (None, str(ip)):
        raise AnswerError(f"nebula.overlay_ip {shown(neb['overlay_ip'])} is not overlay_ip {ip}")

    def lighthouse(v: Any, where: str) -> None:
        v = obj(v, where)
        overlay_address(v.get("overlay_ip"), f"{where}.overlay_ip", net)
        items(v.get("endpoints"), f"{where}.endpoints", host_port, limit=16, least=1)

    items(neb.get("lighthouses", []), "nebula.lighthouses", lighthouse, limit=16)
    items(neb.get("groups", []), "nebula.groups", lambda v, w: text(v, w, limit=64, pattern=_ID))
    if neb.get("listen_port") is not None:
        integer(neb["listen_port"], "nebula.listen_port", 0, 65535)

    nomad = obj(body.get("nomad"), "nomad")
    text(nomad.get("region"), "nomad.region", limit=63, pattern=_DNS_LABEL)
    for field in ("datacenter", "node_class"):
        if nomad.get(field) is not None:
            text(nomad[field], f"nomad.{field}", limit=128, pattern=_ID)
    items(nomad.get("servers", []), "nomad.servers", host_port, limit=16)
    meta = obj(nomad.get("meta", {}), "nomad.meta")
    if len(meta) > _LIST_LIMIT:
        raise AnswerError(f"nomad.meta must hold at most {_LIST_LIMIT} entries, not {len(meta)}")
    for key, value in meta.items():
        text(key, "a nomad.meta key", limit=128, pattern=_ID)
        text(value, f"nomad.meta.{key}")
    pem(nomad.get("certificate_pem"), "nomad.certificate_pem")
    pem(nomad.get("ca_pem"), "nomad.ca_pem")
    return answer


# A node never rents more units than this (the control plane's own bound on a heartbeat's figures).
MAX_UNITS = 100_000


def heartbeat(body: Any) -> dict[str, Any]:
    """POST /v1/node/heartbeat: what status.json keeps of the answer."""
    body = obj(body, "the answer")
    status = body.get("status")
    if status not in ("active", "removed"):
        raise AnswerError(f"status is {shown(status)}, not active or removed")
    units = integer(body.get("advertised_units"), "advertised_units", 0, MAX_UNITS)
    nxt = body.get("next_heartbeat_s")
    if nxt is not None:
        integer(nxt, "next_heartbeat_s", 1, 86_400)
    reason = body.get("reason")
    if reason is not None:
        reason = text(reason, "reason", limit=500)
    answer = {"status": status, "advertised_units": units, "next_heartbeat_s": nxt, "reason": reason}
    if body.get("withheld") is not None:
        # The units the control plane does not advertise and why (an answer to a heartbeat that
        # carried the doctor's per-unit state).
        answer["withheld"] = items(body["withheld"], "withheld", _withheld_unit, limit=_UNITS_LIMIT)
    return answer


_UNIT_ID = re.compile(r"[0-9]{1,6}|[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_UNITS_LIMIT = 64


def _withheld_unit(value: Any, where: str) -> dict[str, Any]:
    unit = obj(value, where)
    uid = text(unit.get("id"), f"{where}.id", limit=12, pattern=_UNIT_ID)
    reasons = items(unit.get("reasons"), f"{where}.reasons", lambda v, w: text(v, w, limit=500), limit=32)
    return {"id": uid, "reasons": reasons}
