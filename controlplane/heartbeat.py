"""Node heartbeats and the advertising rule: what the control plane offers of a node's GPU units.

A node's node-agent posts its doctor report, its load and its agents' versions every interval. The
units offered for rent are decided here, from the last heartbeat and the control plane's own clock,
never taken from the node's word alone:

- the node is `active` (a removed node's heartbeat is answered `removed` and changes nothing);
- its last heartbeat is fresh: at most `STALE_INTERVALS` of its declared interval old;
- the doctor's verdict is not FAIL and the node is not draining;
- its load is under the thresholds (CPU 90%, memory 85%, storage 90%; a node may set stricter ones
  for itself in node.yaml, never looser ones);
- and never more units than the hardware it enrolled with: a node that enrolled with no GPUs and
  claims 10,000 ready units is capped at 0.

A node that reports its units one by one (the doctor's `units`) is decided per unit on top of these
(controlplane.units): only its ready and degraded units among those it enrolled with are offered.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from controlplane import nodeauth, store
from controlplane.clock import from_iso, to_iso
from controlplane.errors import bad_request
from controlplane.service import ControlPlane
from controlplane.units import (
    Enrolled,
    UnitOffer,
    UnitState,
    decide_units,
    decode_units,
    encode_units,
    enrolled_units,
    listing_rows,
    parse_units,
    withheld,
)

DEFAULT_INTERVAL_S = 240
MIN_INTERVAL_S, MAX_INTERVAL_S = 1, 3600
STALE_INTERVALS = 3
THRESHOLDS = {"cpu_percent": 90.0, "memory_percent": 85.0, "disk_percent": 90.0}
_RESOURCE_NAMES = {"cpu_percent": "CPU", "memory_percent": "memory", "disk_percent": "storage"}
MAX_BODY_BYTES = 64 * 1024

VERDICTS = ("PASS", "WARN", "FAIL")
CHECK_STATUSES = ("PASS", "WARN", "FAIL", "SKIP")
_TOP_LEVEL = frozenset({"doctor", "resources", "agents", "draining", "interval_s"})
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_MAX_CHECKS = 64
_MAX_TEXT = 2000
_MAX_EXTRA_RESOURCES = 16
_MAX_AGENTS = 16
_MAX_UNITS = 100_000


@dataclass(frozen=True)
class Heartbeat:
    """A validated heartbeat body."""

    verdict: str
    checks: tuple[dict[str, Any], ...]
    units_ready: int
    units_total: int
    resources: dict[str, float]
    thresholds: dict[str, float]
    agents: dict[str, str | None]
    draining: bool
    interval_s: int
    units: tuple[UnitState, ...] | None = None  # None: an agent that reports no per-unit state


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{where} must be a number")
    f = float(value)
    if not math.isfinite(f) or not low <= f <= high:
        raise bad_request(f"{where} must be between {low:g} and {high:g}")
    return f


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_UNITS:
        raise bad_request(f"{where} must be a whole number from 0 to {_MAX_UNITS}")
    return value


def _text(value: Any, where: str, *, optional: bool = False, limit: int = _MAX_TEXT) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise bad_request(f"{where} must be a string of at most {limit} characters")
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be an object")
    return value


def parse_heartbeat(body: Any) -> Heartbeat:
    """The heartbeat in `body`, or a 400 saying what is wrong with it."""
    body = _object(body, "the body")
    unknown = sorted(set(body) - _TOP_LEVEL)
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(unknown)[:200]}")

    doctor = _object(body.get("doctor"), "doctor")
    verdict = doctor.get("verdict")
    if verdict not in VERDICTS:
        raise bad_request(f"doctor.verdict must be one of {', '.join(VERDICTS)}")
    raw_checks = doctor.get("checks", [])
    if not isinstance(raw_checks, list) or len(raw_checks) > _MAX_CHECKS:
        raise bad_request(f"doctor.checks must be a list of at most {_MAX_CHECKS} checks")
    checks = []
    for i, c in enumerate(raw_checks):
        c = _object(c, f"doctor.checks[{i}]")
        name = c.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad_request(f"doctor.checks[{i}].name must be a check name")
        if c.get("status") not in CHECK_STATUSES:
            raise bad_request(f"doctor.checks[{i}].status must be one of {', '.join(CHECK_STATUSES)}")
        checks.append(
            {
                "name": name,
                "status": c["status"],
                "message": _text(c.get("message", ""), f"doctor.checks[{i}].message"),
                "hint": _text(c.get("hint"), f"doctor.checks[{i}].hint", optional=True),
            }
        )
    units = _object(doctor.get("gpu_units"), "doctor.gpu_units")
    ready = _count(units.get("ready"), "doctor.gpu_units.ready")
    total = _count(units.get("total"), "doctor.gpu_units.total")
    if ready > total:
        raise bad_request("doctor.gpu_units.ready must not exceed doctor.gpu_units.total")

    raw_resources = _object(body.get("resources"), "resources")
    resources: dict[str, float] = {}
    thresholds = dict(THRESHOLDS)
    extras = 0
    for key, value in raw_resources.items():
        if key == "thresholds":
            for tkey, tvalue in _object(value, "resources.thresholds").items():
                if tkey not in THRESHOLDS:
                    raise bad_request(f"resources.thresholds: unknown threshold {str(tkey)[:64]!r}")
                # A node may hold itself to a stricter threshold, never a looser one.
                thresholds[tkey] = min(
                    THRESHOLDS[tkey], _number(tvalue, f"resources.thresholds.{tkey}", 1, 100)
                )
            continue
        if not isinstance(key, str) or not _NAME.fullmatch(key):
            raise bad_request("resources: names are lower-case words of at most 64 characters")
        if key in THRESHOLDS:
            resources[key] = _number(value, f"resources.{key}", 0, 100)
            continue
        extras += 1
        if extras > _MAX_EXTRA_RESOURCES:
            raise bad_request(f"resources: at most {_MAX_EXTRA_RESOURCES} figures besides the percentages")
        resources[key] = _number(value, f"resources.{key}", 0, 1e18)
    missing = [k for k in THRESHOLDS if k not in resources]
    if missing:
        raise bad_request(f"resources must give {', '.join(missing)}")

    raw_agents = _object(body.get("agents", {}), "agents")
    if len(raw_agents) > _MAX_AGENTS:
        raise bad_request(f"agents: at most {_MAX_AGENTS} entries")
    agents: dict[str, str | None] = {}
    for name, version in raw_agents.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad_request("agents: names are lower-case words of at most 64 characters")
        agents[name] = _text(version, f"agents.{name}", optional=True, limit=64)

    draining = body.get("draining")
    if not isinstance(draining, bool):
        raise bad_request("draining must be true or false")
    interval = body.get("interval_s", DEFAULT_INTERVAL_S)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int)
        or not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S
    ):
        raise bad_request(
            f"interval_s must be a whole number of seconds from {MIN_INTERVAL_S} to {MAX_INTERVAL_S}"
        )
    return Heartbeat(
        verdict,
        tuple(checks),
        ready,
        total,
        resources,
        thresholds,
        agents,
        draining,
        interval,
        parse_units(doctor, ready, total),
    )


@dataclass(frozen=True)
class Offer:
    """What the rule decided for one node: units advertised and, when fewer than ready, why."""

    ready: int
    advertised: int
    reason: str | None
    units: tuple[UnitOffer, ...] | None = None  # per unit, when the node reports its units


def decide(
    status: str,
    heartbeat: sqlite3.Row | None,
    enrolled_units: int,
    now: datetime,
    enrolled: Enrolled | None = None,
) -> Offer:
    """The advertising rule (module docstring) over the stored state of one node; per unit
    (controlplane.units) when the heartbeat reported its units, against `enrolled`."""
    if heartbeat is None:
        return Offer(0, 0, "removed" if status == "removed" else "no heartbeat yet")
    ready = int(heartbeat["units_ready"])
    withdrawn = _withdrawn(status, heartbeat, now)
    units = decode_units(heartbeat["units"])
    if units is not None:
        per_unit = decide_units(units, withdrawn, enrolled or Enrolled(frozenset(), enrolled_units))
        return Offer(per_unit.ready, per_unit.advertised, per_unit.reason, per_unit.units)
    if withdrawn is not None:
        return Offer(ready, 0, withdrawn)
    if ready > enrolled_units:
        return Offer(ready, enrolled_units, f"capped at the enrolled hardware ({enrolled_units} GPU unit(s))")
    return Offer(ready, ready, None)


def _withdrawn(status: str, heartbeat: sqlite3.Row, now: datetime) -> str | None:
    """Why the node-level rules advertise none of the node's units, or None."""
    if status == "removed":
        return "removed"
    age = now - from_iso(heartbeat["received_at"])
    limit = timedelta(seconds=STALE_INTERVALS * int(heartbeat["interval_s"]))
    if age > limit:
        return f"stale heartbeat ({int(age.total_seconds())} s old, limit {int(limit.total_seconds())} s)"
    if heartbeat["verdict"] == "FAIL":
        return "verdict FAIL"
    if heartbeat["draining"]:
        return "draining"
    resources = json.loads(heartbeat["resources"])
    thresholds = json.loads(heartbeat["thresholds"])
    over = [
        f"{_RESOURCE_NAMES[k]} {resources[k]:.0f}% over {thresholds[k]:.0f}%"
        for k in THRESHOLDS
        if resources.get(k, 0.0) > thresholds.get(k, THRESHOLDS[k])
    ]
    return "; ".join(over) if over else None


def record_heartbeat(
    cp: ControlPlane, body: Any, client_cert_pem: str | None, node_token: str | None
) -> dict[str, Any]:
    """Store a node's heartbeat and answer what is advertised of it."""
    hb = parse_heartbeat(body)
    creds = nodeauth.presented(client_cert_pem, node_token)
    # Everything that needs no database outside the write lock, which every heartbeat waits for.
    encoded = (
        json.dumps(hb.resources),
        json.dumps(hb.thresholds),
        json.dumps(hb.agents),
        json.dumps(hb.checks),
        encode_units(hb.units),
    )
    now = cp.clock.now()
    # Not durable: a heartbeat lost to a power cut is sent again within one interval.
    with cp.store.write(durable=False) as conn:
        node = nodeauth.authenticate(conn, creds, removed_ok=True)
        if node["status"] == "removed":
            # Answered, not refused: the agent keeps running and says so; nothing here revives it.
            return {
                "status": "removed",
                "advertised_units": 0,
                "next_heartbeat_s": hb.interval_s,
                "reason": "removed",
            }
        stored = store.upsert_heartbeat(
            conn,
            node["id"],
            to_iso(now),
            hb.interval_s,
            hb.verdict,
            hb.units_ready,
            hb.units_total,
            hb.draining,
            encoded,
        )
        enrolled = enrolled_units(conn, node) if hb.units is not None else None
    offer = decide(node["status"], stored, int(node["enrolled_units"]), now, enrolled)
    return {
        "status": "active",
        "advertised_units": offer.advertised,
        "next_heartbeat_s": hb.interval_s,
        "reason": offer.reason,
        **withheld(offer.units),
    }


def list_provider_nodes(cp: ControlPlane, api_key: str | None, org_ref: str) -> dict[str, Any]:
    """The org's nodes with what is advertised of each, and why when fewer than ready."""
    key_org = cp.provider_org(cp.org_for_api_key(api_key), org_ref, f"no org {org_ref}")
    now = cp.clock.now()
    conn = cp.store.read()
    rows = store.nodes_with_heartbeats(conn, key_org["id"])
    groups = store.unit_groups_of_org(conn, key_org["id"])
    nodes = []
    for r in rows:
        hb = r if r["hb"] is not None else None
        enrolled = Enrolled.of(r["gpu_mode"], groups.get(r["id"]), int(r["enrolled"]))
        offer = decide(r["status"], hb, int(r["enrolled"]), now, enrolled)
        nodes.append(
            {
                "node_id": r["id"],
                "hostname": r["hostname"],
                "status": r["status"],
                "last_heartbeat_at": r["received_at"],
                "verdict": r["verdict"],
                "gpu_units": {
                    "ready": offer.ready,
                    "total": int(r["units_total"]) if hb is not None else 0,
                    "enrolled": int(r["enrolled"]),
                    "advertised": offer.advertised,
                },
                "resources": json.loads(r["resources"]) if hb is not None else {},
                "agents": json.loads(r["agents"]) if hb is not None else {},
                "draining": bool(r["draining"]) if hb is not None else False,
                "reason": offer.reason,
                "units": listing_rows(offer.units),
                "credentials_expire_at": store.credential_expiry(conn, r["id"], r["cert_fp"]),
            }
        )
    return {"nodes": nodes}
