"""Per-unit advertising: a heartbeat's `doctor.units`, validated, and what is advertised of each unit.

A node whose agent reports its units one by one (the doctor's `units` list) has exactly the units
advertised whose status is `ready` or `degraded` and that are among the units it enrolled with
(passthrough: its IOMMU groups, the gpu_units rows of its enrollment; container mode, whose units
are GPUs shared through runsc and enroll no groups: as many as the GPUs it enrolled with, in the
order the node lists them). The node-level rules (heartbeat.decide: active, fresh, verdict not FAIL,
not draining, under the load thresholds) still come first and withhold every unit when one fails.
Every withheld unit says why: the node's own reasons and the control plane's.

A heartbeat without `units` (an agent older than per-unit state) keeps the node-level count rule.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from typing import Any

from controlplane import store
from controlplane.errors import bad_request

STATUSES = ("ready", "degraded", "not_ready")
ADVERTISABLE = frozenset({"ready", "degraded"})
ROLES = ("gpu", "nvswitch", "function")
MAX_UNITS = 64
MAX_DEVICES = 32
MAX_REASONS = 16
MAX_MESSAGE = 200
NOT_ENROLLED = "not among the enrolled units"

# An IOMMU group number, or (container mode) the GPU's PCI address as sysfs spells it.
_UNIT_ID = re.compile(r"[0-9]{1,6}|[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_GROUP = re.compile(r"[0-9]{1,6}")
_PCI = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_WORD = re.compile(r"[a-z0-9][a-z0-9_.+-]{0,63}")
_LINK_SPEED = re.compile(r"[0-9A-Za-z .,/]{1,32}")
# Every string here goes back to the node in the heartbeat's answer and into the listing: no
# control character (the node-agent refuses an answer holding one, and a terminal would act on it).
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f-\x9f]+")
_MAX_COUNTER = 2**63 - 1
# A link width is the 6-bit field of the PCIe Link Capabilities/Status registers, which sysfs shows
# as read: a GPU that fell off the bus answers all ones there, 63, and that heartbeat is the one
# that must get through.
_MAX_WIDTH = 63


@dataclass(frozen=True)
class UnitState:
    """One unit as the node's doctor reported it (only what the rule and the listing need)."""

    id: str
    status: str
    reasons: tuple[str, ...]  # the doctor's messages, in its order


@dataclass(frozen=True)
class UnitOffer:
    """What was decided for one unit: advertised or not, and the reasons shown for it."""

    id: str
    status: str
    advertised: bool
    reasons: tuple[str, ...]


# --- validation ---------------------------------------------------------------------------------


def _object(value: Any, where: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise bad_request(f"{where} must be an object")
    return value


def _list(value: Any, where: str, limit: int, what: str) -> list[Any]:
    if type(value) is not list or len(value) > limit:
        raise bad_request(f"{where} must be a list of at most {limit} {what}")
    return value


# The field checks below take the object, its key and where it is, and spell `where.key` only for
# an error: every heartbeat of a GPU node runs them some hundred times.


def _text(
    obj: dict[str, Any],
    key: str,
    where: str,
    *,
    limit: int = MAX_MESSAGE,
    pattern: re.Pattern[str] | None = None,
    optional: bool = False,
) -> Any:
    """obj[key]: a string `pattern` matches whole (the patterns bound the length themselves), or
    (without one) of 1 to `limit` characters and no control character; None when `optional`."""
    value = obj.get(key)
    if value is None and optional:
        return None
    if type(value) is str:
        if pattern is not None:
            if pattern.fullmatch(value):
                return value
            raise bad_request(f"{where}.{key} {_shown(value)} is not of the expected form")
        if 0 < len(value) <= limit and _PRINTABLE.fullmatch(value):
            return value
        if 0 < len(value) <= limit:
            raise bad_request(f"{where}.{key} holds a control character")
    if pattern is not None:
        raise bad_request(f"{where}.{key} must be a string")
    raise bad_request(f"{where}.{key} must be a string of 1 to {limit} characters")


def _whole(obj: dict[str, Any], key: str, where: str, high: int) -> None:
    """obj[key], when present: a whole number from 0 to `high`."""
    value = obj.get(key)
    if value is not None and (type(value) is not int or not 0 <= value <= high):
        raise bad_request(f"{where}.{key} must be a whole number from 0 to {high}")


def _shown(value: str) -> str:
    return repr(value[:40]) + ("..." if len(value) > 40 else "")


def _device(d: Any, where: str) -> str:
    d = _object(d, where)
    address = _text(d, "address", where, pattern=_PCI)
    if d.get("role") not in ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}")
    if type(d.get("present")) is not bool:
        raise bad_request(f"{where}.present must be true or false")
    _text(d, "driver", where, pattern=_WORD, optional=True)
    link = d.get("link")
    if link is not None:
        link = _object(link, f"{where}.link")
        _text(link, "speed", f"{where}.link", pattern=_LINK_SPEED, optional=True)
        _text(link, "max_speed", f"{where}.link", pattern=_LINK_SPEED, optional=True)
        _whole(link, "width", f"{where}.link", _MAX_WIDTH)
        _whole(link, "max_width", f"{where}.link", _MAX_WIDTH)
    aer = d.get("aer")
    if aer is not None:
        aer = _object(aer, f"{where}.aer")
        for key in ("correctable", "nonfatal", "fatal"):
            _whole(aer, key, f"{where}.aer", _MAX_COUNTER)
    methods = d.get("reset_method")
    if methods is not None:
        for m in _list(methods, f"{where}.reset_method", 16, "reset methods"):
            if type(m) is not str or not _WORD.fullmatch(m):
                raise bad_request(f"{where}.reset_method holds {_shown(str(m))}, not a reset method's name")
    return str(address)


def _reason(r: Any, where: str) -> str:
    r = _object(r, where)
    _text(r, "code", where, pattern=_CODE)
    _text(r, "device", where, pattern=_PCI, optional=True)
    _text(r, "hint", where, optional=True)
    return str(_text(r, "message", where))


def _unit(u: Any, where: str) -> UnitState:
    u = _object(u, where)
    uid = str(_text(u, "id", where, pattern=_UNIT_ID))
    _text(u, "iommu_group", where, pattern=_GROUP, optional=True)
    status = u.get("status")
    if status not in STATUSES:
        raise bad_request(f"{where}.status must be one of {', '.join(STATUSES)}")
    devices = _list(u.get("devices", []), f"{where}.devices", MAX_DEVICES, "devices")
    addresses = [_device(d, f"{where}.devices[{i}]") for i, d in enumerate(devices)]
    if len(set(addresses)) != len(addresses):
        raise bad_request(f"{where}.devices lists a device twice")
    raw_reasons = _list(u.get("reasons", []), f"{where}.reasons", MAX_REASONS, "reasons")
    reasons = tuple(_reason(r, f"{where}.reasons[{i}]") for i, r in enumerate(raw_reasons))
    return UnitState(uid, status, reasons)


def parse_units(doctor: dict[str, Any], ready: int, total: int) -> tuple[UnitState, ...] | None:
    """`doctor.units`, validated (None when the agent sent none), or a 400 saying what is wrong.

    Keys a unit, device or reason carries beyond these are ignored, as the doctor object's are: a
    newer doctor may add some. The list must agree with `doctor.gpu_units`, which older control
    planes read: `total` units, of which `ready` are ready or degraded."""
    raw = doctor.get("units")
    if raw is None:
        return None
    raw = _list(raw, "doctor.units", MAX_UNITS, "units")
    units = tuple(_unit(u, f"doctor.units[{i}]") for i, u in enumerate(raw))
    ids = [u.id for u in units]
    if len(set(ids)) != len(ids):
        raise bad_request("doctor.units lists a unit id twice")
    advertisable = sum(u.status in ADVERTISABLE for u in units)
    if (advertisable, len(units)) != (ready, total):
        raise bad_request(
            f"doctor.gpu_units ({ready} ready of {total}) does not match doctor.units"
            f" ({advertisable} ready or degraded of {len(units)})"
        )
    return units


# --- storage -------------------------------------------------------------------------------------


def encode_units(units: tuple[UnitState, ...] | None) -> str | None:
    """The column node_heartbeats.units: NULL for an agent that sent no units."""
    if units is None:
        return None
    return json.dumps([[u.id, u.status, list(u.reasons)] for u in units], separators=(",", ":"))


def decode_units(stored: str | None) -> tuple[UnitState, ...] | None:
    if stored is None:
        return None
    return tuple(UnitState(uid, status, tuple(reasons)) for uid, status, reasons in json.loads(stored))


@dataclass(frozen=True)
class Enrolled:
    """The units a node enrolled with: its IOMMU groups, or (container mode) a number of GPUs."""

    groups: frozenset[str] | None  # None: container mode, capped by `count`
    count: int

    @classmethod
    def of(cls, gpu_mode: str, groups: frozenset[str] | None, count: int) -> Enrolled:
        """`count` is what the node-level cap counts of them (store.enrolled_units_sql)."""
        return cls(None if gpu_mode == "container" else groups or frozenset(), count)


def enrolled_units(conn: sqlite3.Connection, node: sqlite3.Row) -> Enrolled:
    """The units `node` (a nodes row with its `enrolled_units` count) enrolled with."""
    return Enrolled.of(node["gpu_mode"], store.unit_groups(conn, node["id"]), int(node["enrolled_units"]))


# --- the rule -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitsDecision:
    ready: int
    advertised: int
    reason: str | None  # why fewer are advertised than ready, as the node-level `reason`
    units: tuple[UnitOffer, ...]


def decide_units(units: tuple[UnitState, ...], node_reason: str | None, enrolled: Enrolled) -> UnitsDecision:
    """What is advertised of each unit. `node_reason`: why the node-level rules withdraw the whole
    node (None when they do not)."""
    offers = []
    capacity = enrolled.count  # container mode: enrolled GPUs left to advertise
    not_enrolled: list[str] = []
    for u in units:
        why = list(u.reasons)
        if u.status == "not_ready" and not why:
            why.append("not ready")
        if enrolled.groups is not None:
            member = u.id in enrolled.groups
            if not member:
                why.append(NOT_ENROLLED)
        else:
            # Container mode enrolls GPUs, not groups: only a count to hold a unit against.
            member = u.status not in ADVERTISABLE or capacity > 0
            capacity -= u.status in ADVERTISABLE
            if not member:
                why.append(f"capped at the enrolled hardware ({enrolled.count} GPU unit(s))")
        if not member and u.status in ADVERTISABLE:
            not_enrolled.append(u.id)
        if node_reason is not None:
            why.append(f"node {node_reason}")
        advertised = u.status in ADVERTISABLE and member and node_reason is None
        offers.append(UnitOffer(u.id, u.status, advertised, tuple(why)))
    ready = sum(u.status in ADVERTISABLE for u in units)
    advertised_count = sum(o.advertised for o in offers)
    reason = node_reason
    if reason is None and not_enrolled:
        if enrolled.groups is None:
            reason = f"capped at the enrolled hardware ({enrolled.count} GPU unit(s))"
        else:
            shown = ", ".join(not_enrolled[:8]) + (", ..." if len(not_enrolled) > 8 else "")
            reason = f"{len(not_enrolled)} ready unit(s) {NOT_ENROLLED} ({shown})"
    return UnitsDecision(ready, advertised_count, reason, tuple(offers))


# --- what the node and the provider see --------------------------------------------------------------


def withheld(offers: tuple[UnitOffer, ...] | None) -> dict[str, Any]:
    """The heartbeat answer's `withheld`: every unit not advertised and why. Nothing for an agent
    that sent no units (its answer stays as it was)."""
    if offers is None:
        return {}
    return {"withheld": [{"id": o.id, "reasons": list(o.reasons)} for o in offers if not o.advertised]}


def listing_rows(offers: tuple[UnitOffer, ...] | None) -> list[dict[str, Any]] | None:
    """The listing's `units` of one node (null: its agent reports no per-unit state)."""
    if offers is None:
        return None
    return [
        {"id": o.id, "status": o.status, "advertised": o.advertised, "reasons": list(o.reasons)}
        for o in offers
    ]
