"""What the control plane does, apart from HTTP and SQL: orgs, keys, tokens and the nodes' state.

The layers (docs/architecture.md): the HTTP face (controlplane.app) turns requests into calls here
and the domain errors raised here (controlplane.errors) into statuses; this module and the ones
beside it (enrollment and renewal in controlplane.enrollment, heartbeats in controlplane.heartbeat,
node authentication in controlplane.nodeauth) decide; controlplane.store holds every SQL statement
and the one connection pool. Every operation that changes state runs in one write transaction
(Store.write), which SQLite serialises.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from controlplane import enrollment, nodeauth, store
from controlplane.clock import Clock, from_iso, to_iso, wall_now
from controlplane.db import Database
from controlplane.errors import Conflict, NotFound, bad_request, not_a_provider, unauthorized
from controlplane.nebula_ca import NebulaCA
from controlplane.pki import CertificateAuthority
from controlplane.store import Store
from controlplane.tokens import API_KEY_PREFIX, PROVISIONING_PREFIX, hash_secret, new_id, new_secret

PROVISIONING_TTL = timedelta(hours=1)
DEFAULT_OVERLAY = "100.64.0.0/10"
# Every credential a node holds is short-lived: the node-agent renews it at two thirds of its life
# (POST /v1/node/renew), so a fleet installed in one week never expires together, and a leaked key is
# good for weeks. `serve --cert-days` sets them.
DEFAULT_CERT_DAYS = 30
MAX_CERT_DAYS = 3650


@dataclass(frozen=True)
class Lifetimes:
    """Days each credential issued to a node is valid: its client certificate (and node token's
    pair), its nebula certificate, its Nomad certificate."""

    node_days: int = DEFAULT_CERT_DAYS
    nebula_days: int = DEFAULT_CERT_DAYS
    nomad_days: int = DEFAULT_CERT_DAYS

    def __post_init__(self) -> None:
        for name in ("node_days", "nebula_days", "nomad_days"):
            days = getattr(self, name)
            if not 1 <= days <= MAX_CERT_DAYS:
                raise ValueError(f"{name} must be 1 to {MAX_CERT_DAYS} days, not {days}")


@dataclass
class Network:
    """What nodes are told about the overlay (nebula) and the scheduler (nomad)."""

    public_host: str = "127.0.0.1"
    overlay: ipaddress.IPv4Network = field(default_factory=lambda: ipaddress.IPv4Network(DEFAULT_OVERLAY))
    nebula_port: int = 4242
    nomad_port: int = 4647
    region: str = "global"  # Nomad's own default region name
    datacenter: str = "vectorlay"

    @property
    def lighthouse_ip(self) -> str:
        return str(self.overlay.network_address + 1)

    @property
    def lighthouses(self) -> list[dict[str, Any]]:
        """Overlay address and underlay endpoints of each lighthouse (one in the reference setup)."""
        return [{"overlay_ip": self.lighthouse_ip, "endpoints": [f"{self.public_host}:{self.nebula_port}"]}]

    @property
    def nomad_servers(self) -> list[str]:
        # The reference deployment runs its Nomad server on the lighthouse host; nodes reach it only
        # over the overlay.
        return [f"{self.lighthouse_ip}:{self.nomad_port}"]

    def overlay_interface(self, ip: str) -> ipaddress.IPv4Interface:
        """The address with the overlay's prefix length: nebula routes the whole overlay to its tun."""
        return ipaddress.IPv4Interface(f"{ip}/{self.overlay.prefixlen}")

    def overlay_ip(self, seq: int) -> str:
        # .1 is the lighthouse; nodes follow in enrollment order.
        addr = self.overlay.network_address + 1 + seq
        if addr not in self.overlay or addr == self.overlay.broadcast_address:
            raise Conflict(f"the overlay network {self.overlay} has no address left", "OVERLAY_FULL")
        return str(addr)


class ControlPlane:
    def __init__(
        self,
        db: Database,
        ca: CertificateAuthority | None,
        clock: Clock,
        network: Network | None = None,
        nebula_ca: NebulaCA | None = None,
        lifetimes: Lifetimes | None = None,
        next_ca: CertificateAuthority | None = None,
        next_nebula_ca: NebulaCA | None = None,
    ) -> None:
        self.db = db
        self.store = Store(db)
        self._ca = ca
        self._nebula_ca = nebula_ca
        # During a CA rotation (controlplane.rotation): the new CAs sign, nodes are given both.
        self._next_ca = next_ca
        self._next_nebula_ca = next_nebula_ca
        self.clock = clock
        self.network = network or Network()
        self.lifetimes = lifetimes or Lifetimes()

    @property
    def ca(self) -> CertificateAuthority:
        if self._ca is None:
            raise RuntimeError("this ControlPlane was opened without its CA (admin use only)")
        return self._ca

    @property
    def nebula_ca(self) -> NebulaCA:
        if self._nebula_ca is None:
            raise RuntimeError("this ControlPlane was opened without its nebula CA (admin use only)")
        return self._nebula_ca

    @property
    def signer(self) -> CertificateAuthority:
        return self._next_ca or self.ca

    @property
    def nebula_signer(self) -> NebulaCA:
        return self._next_nebula_ca or self.nebula_ca

    @property
    def ca_bundle_pem(self) -> str:
        """The X.509 CAs a node trusts: one, or the old and the new one during a rotation."""
        return self.ca.cert_pem + (self._next_ca.cert_pem if self._next_ca else "")

    @property
    def nebula_ca_bundle_pem(self) -> str:
        return self.nebula_ca.ca_pem + (self._next_nebula_ca.ca_pem if self._next_nebula_ca else "")

    # --- orgs, keys, tokens (admin CLI and API-key endpoints) -------------------------------

    def create_org(self, name: str, *, provider: bool, node_quota: int | None) -> dict[str, Any]:
        if node_quota is not None and node_quota < 0:
            raise bad_request("node quota must be 0 or more")
        org_id = new_id("org_")
        with self.store.write() as conn:
            if store.org_name_taken(conn, name):
                raise Conflict(f"an org named {name!r} already exists")
            store.insert_org(conn, org_id, name, provider, node_quota, to_iso(self.clock.now()))
        return {"id": org_id, "name": name, "provider": provider, "node_quota": node_quota}

    def update_org(self, ref: str, *, provider: bool | None, node_quota: int | None) -> dict[str, Any]:
        with self.store.write() as conn:
            org = store.find_org(conn, ref)
            store.update_org(conn, org["id"], provider, node_quota)
            org = store.find_org(conn, org["id"])
        return _org_json(org)

    def create_api_key(self, org_ref: str) -> str:
        key = new_secret(API_KEY_PREFIX)
        with self.store.write() as conn:
            org = store.find_org(conn, org_ref)
            store.insert_api_key(conn, hash_secret(key), org["id"], to_iso(self.clock.now()))
        return key

    def create_provisioning_token(self, org_ref: str) -> dict[str, Any]:
        token = new_secret(PROVISIONING_PREFIX)
        now = self.clock.now()
        expires = now + PROVISIONING_TTL
        with self.store.write() as conn:
            org = store.find_org(conn, org_ref)
            store.insert_provisioning_token(conn, hash_secret(token), org["id"], to_iso(now), to_iso(expires))
        return {"token": token, "expires_at": to_iso(expires), "org_id": org["id"]}

    def org_for_api_key(self, key: str | None) -> sqlite3.Row:
        """The org row of a current API key."""
        if not key or not key.startswith(API_KEY_PREFIX):
            raise unauthorized("missing or malformed API key")
        row = store.org_of_api_key(self.store.read(), hash_secret(key))
        if row is None:
            raise unauthorized("bad API key")
        return row

    @staticmethod
    def provider_org(key_org: sqlite3.Row, org_ref: str, not_found: str) -> sqlite3.Row:
        """The org of an API key (`key_org`) when `org_ref` names it (by ID or name) and it is an
        approved provider; another org's key finds nothing there (`not_found`)."""
        if org_ref not in (key_org["id"], key_org["name"]):
            raise NotFound(not_found)
        if not key_org["is_provider"]:
            raise not_a_provider(key_org["name"])
        return key_org

    def api_create_token(self, api_key: str | None) -> dict[str, Any]:
        org = self.org_for_api_key(api_key)
        if not org["is_provider"]:
            raise not_a_provider(org["name"])
        result = self.create_provisioning_token(org["id"])
        return {"token": result["token"], "expires_at": result["expires_at"]}

    # --- provisioning tokens ------------------------------------------------------------------

    def introspect(self, token: Any) -> dict[str, Any]:
        """Whether a token would be accepted now, and until when. Never consumes it."""
        if not isinstance(token, str) or not token:
            raise bad_request('body must be {"token": "vtk_..."}')
        conn = self.store.read()
        row = store.provisioning_token(conn, hash_secret(token))
        if row is None:
            return {"valid": False, "expires_at": None, "reason": "unknown"}
        expires = from_iso(row["expires_at"])
        if not store.org_is_provider(conn, row["org_id"]):
            # First: enrollment would refuse it whatever else is true, and a new token of the same
            # org would not help either.
            reason: str | None = "not_a_provider"
        elif row["used_at"] is not None:
            reason = "used"
        elif expires <= self.clock.now():
            reason = "expired"
        else:
            reason = None
        return {"valid": reason is None, "expires_at": row["expires_at"], "reason": reason}

    # --- enrollment and renewal (controlplane.enrollment) -------------------------------------

    def enroll(self, body: Any, client_cert_pem: str | None, node_token: str | None) -> dict[str, Any]:
        return enrollment.enroll(self, body, client_cert_pem, node_token)

    def renew(self, body: Any, client_cert_pem: str | None, node_token: str | None) -> dict[str, Any]:
        return enrollment.renew(self, body, client_cert_pem, node_token)

    # --- node endpoints (mTLS) -----------------------------------------------------------------

    def node_self(self, client_cert_pem: str | None, node_token: str | None) -> dict[str, Any]:
        """The node behind a client certificate + node token pair, both required and current."""
        creds = nodeauth.presented(client_cert_pem, node_token)
        with self.store.write() as conn:
            node = nodeauth.authenticate(conn, creds)
            total, allocatable = store.unit_counts(conn, node["id"])
            expiry = store.credential_expiry(conn, node["id"], creds.cert_fp)
        return {
            "node_id": node["id"],
            "org_id": node["org_id"],
            "status": node["status"],
            "overlay_ip": node["overlay_ip"],
            "hostname": node["hostname"],
            "gpu_mode": node["gpu_mode"],
            "gpu_units": {"total": total, "allocatable": allocatable},
            "credentials_expire_at": expiry,
        }

    # --- provider API (API key) ----------------------------------------------------------------

    def set_node_status(self, api_key: str | None, org_ref: str, node_id: str, body: Any) -> dict[str, Any]:
        key_org = self.org_for_api_key(api_key)
        if not isinstance(body, dict) or body.get("status") != "removed":
            raise bad_request('only {"status": "removed"} is supported; re-enroll a node to bring it back')
        key_org = self.provider_org(key_org, org_ref, f"no node {node_id} in org {org_ref}")
        with self.store.write() as conn:
            if store.node_by_id(conn, node_id, key_org["id"]) is None:
                raise NotFound(f"no node {node_id} in org {org_ref}")
            freed = store.remove_node(conn, node_id, to_iso(self.clock.now()))
        return {"node_id": node_id, "status": "removed", "units_freed": freed}

    # --- the overlay's revocations ----------------------------------------------------------

    def nebula_blocklist(self) -> list[str]:
        """The fingerprints nebula's `pki.blocklist` must hold: certificates of removed nodes that
        have not expired yet (nebula refuses an expired one anyway, so the list stays bounded)."""
        rows = store.revoked_nebula_certificates(self.store.read())
        # Nebula judges expiry by the wall clock, and the certificates were signed against it.
        now = wall_now()
        return [r["fingerprint"] for r in rows if from_iso(r["not_after"]) > now]

    def org_summary(self, org_ref: str) -> dict[str, Any]:
        conn = self.store.read()
        org = store.find_org(conn, org_ref)
        nodes = [
            {
                "node_id": r["id"],
                "status": r["status"],
                "overlay_ip": r["overlay_ip"],
                "credentials_expire_at": store.credential_expiry(conn, r["id"], r["cert_fp"]),
            }
            for r in store.org_nodes(conn, org["id"])
        ]
        return {**_org_json(org), "nodes": nodes}


def _org_json(org: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": org["id"],
        "name": org["name"],
        "provider": bool(org["is_provider"]),
        "node_quota": org["node_quota"],
    }
