"""What the control plane does, apart from HTTP: orgs, tokens, enrollment, node state.

Every operation that changes state runs in one `BEGIN IMMEDIATE` transaction, which SQLite
serialises: that is what makes a provisioning token single-use under concurrency (two enrollments
with one token: the second sees it used) and quota checks race-free.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bootstrap.nebula import NebulaCertError, parse_certificate_pem, parse_public_key_pem
from controlplane.clock import Clock, from_iso, to_iso, wall_now
from controlplane.db import Database
from controlplane.nebula_ca import NebulaCA
from controlplane.pki import (
    CertificateAuthority,
    CsrError,
    csr_key_fingerprint,
    fingerprint,
    peer_certificate,
)
from controlplane.tokens import (
    API_KEY_PREFIX,
    NODE_TOKEN_PREFIX,
    PROVISIONING_PREFIX,
    hash_secret,
    new_id,
    new_secret,
)

PROVISIONING_TTL = timedelta(hours=1)
GPU_MODES = ("passthrough", "container", "none")
DEFAULT_OVERLAY = "100.64.0.0/10"
# RFC 1123 host names (and the underscores real machines carry): never a control character,
# whitespace or quote that would reach a log line, a config file or a dashboard as is.
HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})")
# What the node reports of each GPU unit (docs/contracts.md#hardware-model); stored as is, so held to that.
_IOMMU_GROUP = re.compile(r"[0-9]{1,9}")
_PCI_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]")
# Far above any machine (an HGX box has 8 GPUs): a bound on what one node makes the database hold.
MAX_GPUS = 1024
UNIT_STATUSES = ("ready", "needs_binding", "not_isolatable", "wedged", "no_iommu")
HOSTNAME_RULE = (
    "hostname must be 1-253 characters: letters, digits, '.', '-' and '_', starting with a letter or digit"
)
# Nebula groups: the firewall of every node admits only hosts of the control group.
NODE_GROUP = "vectorlay-node"
CONTROL_GROUP = "vectorlay-control"
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


class ApiError(Exception):
    """An error the API reports as {"error": {"code", "message"}} with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def unauthorized(message: str, code: str = "UNAUTHORIZED") -> ApiError:
    return ApiError(401, code, message)


def peer_fingerprint(client_cert_pem: str) -> str:
    """The fingerprint of the client certificate the TLS layer verified, refused once expired: a
    resumed TLS session does not check the certificate's dates again, so this does."""
    cert_fp, not_after = peer_certificate(client_cert_pem)
    if wall_now() > not_after:
        raise unauthorized("the client certificate has expired", "BAD_NODE_CREDENTIALS")
    return cert_fp


def check_hardware(hardware: dict[str, Any]) -> None:
    """The hardware report of an enrollment, held to the node's own detect --json: the GPUs it found
    (each at a PCI address of its own) and the units (IOMMU groups) that hold them. A unit holds at
    least one GPU of that list and a GPU sits in one unit, so a node cannot enroll more units than
    GPUs it reported: the units it enrolls with cap what is advertised of it (heartbeat.decide)."""
    gpus = hardware.get("gpus", [])
    if not isinstance(gpus, list) or len(gpus) > MAX_GPUS:
        raise bad_request(f"hardware.gpus must be a list of at most {MAX_GPUS} GPUs")
    groups: dict[str, str | None] = {}
    for i, gpu in enumerate(gpus):
        address = gpu.get("address") if isinstance(gpu, dict) else None
        if not isinstance(address, str) or not _PCI_ADDRESS.fullmatch(address):
            raise bad_request(
                f"hardware.gpus[{i}] needs an address: a domain-qualified PCI address (0000:19:00.0)"
            )
        if address in groups:
            raise bad_request(f"hardware.gpus lists {address} twice")
        group = gpu.get("iommu_group")
        groups[address] = group if isinstance(group, str) else None
    units = hardware.get("units") or []
    if not isinstance(units, list):
        raise bad_request("hardware.units must be a list")
    if len(units) > len(gpus):
        raise bad_request(
            f"hardware.units lists {len(units)} GPU unit(s) but hardware.gpus only {len(gpus)} GPU(s):"
            " a unit holds at least one GPU the node reported"
        )
    seen_groups: set[str] = set()
    placed: set[str] = set()
    for i, unit in enumerate(units):
        if not isinstance(unit, dict) or not isinstance(unit.get("iommu_group"), str):
            raise bad_request("each hardware unit needs an iommu_group (a kernel group number, as a string)")
        group = unit["iommu_group"]
        if not _IOMMU_GROUP.fullmatch(group):
            raise bad_request("each hardware unit needs an iommu_group (a kernel group number, as a string)")
        if group in seen_groups:
            raise bad_request(f"hardware.units lists IOMMU group {group} twice")
        seen_groups.add(group)
        members = unit.get("gpus")
        if not isinstance(members, list) or not members:
            raise bad_request(f"hardware.units[{i}] (group {group}) must list the GPUs it holds")
        for address in members:
            if not isinstance(address, str) or address not in groups:
                raise bad_request(
                    f"hardware.units[{i}] (group {group}) holds a GPU that is not in hardware.gpus"
                )
            if address in placed:
                raise bad_request(f"GPU {address} is in more than one hardware unit")
            if groups[address] not in (None, group):
                raise bad_request(f"GPU {address} is in IOMMU group {groups[address]}, not {group}")
            placed.add(address)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BAD_REQUEST", message)


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
            raise ApiError(409, "OVERLAY_FULL", f"the overlay network {self.overlay} has no address left")
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

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self.db.conn()
        # SQLite allows one writer; writers queue on the database's lock instead of its busy handler.
        with self.db.write_lock():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def transaction(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """One serialised write transaction for the modules beside this one (heartbeats), on `conn`
        when given: a connection to this database with pragmas of its own."""
        conn = conn or self.db.conn()
        with self.db.write_lock():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # --- orgs, keys, tokens (admin CLI and API-key endpoints) -------------------------------

    def create_org(self, name: str, *, provider: bool, node_quota: int | None) -> dict[str, Any]:
        if node_quota is not None and node_quota < 0:
            raise bad_request("node quota must be 0 or more")
        org_id = new_id("org_")
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM orgs WHERE name = ?", (name,)).fetchone():
                raise ApiError(409, "CONFLICT", f"an org named {name!r} already exists")
            conn.execute(
                "INSERT INTO orgs (id, name, is_provider, node_quota, created_at) VALUES (?, ?, ?, ?, ?)",
                (org_id, name, int(provider), node_quota, to_iso(self.clock.now())),
            )
        return {"id": org_id, "name": name, "provider": provider, "node_quota": node_quota}

    def update_org(self, ref: str, *, provider: bool | None, node_quota: int | None) -> dict[str, Any]:
        with self._tx() as conn:
            org = self._org(conn, ref)
            if provider is not None:
                conn.execute("UPDATE orgs SET is_provider = ? WHERE id = ?", (int(provider), org["id"]))
            if node_quota is not None:
                conn.execute("UPDATE orgs SET node_quota = ? WHERE id = ?", (node_quota, org["id"]))
            org = self._org(conn, org["id"])
        return _org_json(org)

    def _org(self, conn: sqlite3.Connection, ref: str) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute(
            "SELECT * FROM orgs WHERE id = ? OR name = ?", (ref, ref)
        ).fetchone()
        if row is None:
            raise ApiError(404, "NOT_FOUND", f"no org {ref!r}")
        return row

    def create_api_key(self, org_ref: str) -> str:
        key = new_secret(API_KEY_PREFIX)
        with self._tx() as conn:
            org = self._org(conn, org_ref)
            conn.execute(
                "INSERT INTO api_keys (key_hash, org_id, created_at) VALUES (?, ?, ?)",
                (hash_secret(key), org["id"], to_iso(self.clock.now())),
            )
        return key

    def create_provisioning_token(self, org_ref: str) -> dict[str, Any]:
        token = new_secret(PROVISIONING_PREFIX)
        now = self.clock.now()
        expires = now + PROVISIONING_TTL
        with self._tx() as conn:
            org = self._org(conn, org_ref)
            conn.execute(
                "INSERT INTO provisioning_tokens (token_hash, org_id, created_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (hash_secret(token), org["id"], to_iso(now), to_iso(expires)),
            )
        return {"token": token, "expires_at": to_iso(expires), "org_id": org["id"]}

    def org_for_api_key(self, key: str | None) -> sqlite3.Row:
        if not key or not key.startswith(API_KEY_PREFIX):
            raise unauthorized("missing or malformed API key")
        row: sqlite3.Row | None = (
            self.db.conn()
            .execute(
                "SELECT orgs.* FROM api_keys JOIN orgs ON orgs.id = api_keys.org_id"
                " WHERE key_hash = ? AND revoked_at IS NULL",
                (hash_secret(key),),
            )
            .fetchone()
        )
        if row is None:
            raise unauthorized("bad API key")
        return row

    def api_create_token(self, api_key: str | None) -> dict[str, Any]:
        org = self.org_for_api_key(api_key)
        if not org["is_provider"]:
            raise ApiError(403, "NOT_A_PROVIDER", f"org {org['name']} isn't an approved provider yet")
        result = self.create_provisioning_token(org["id"])
        return {"token": result["token"], "expires_at": result["expires_at"]}

    # --- provisioning tokens ------------------------------------------------------------------

    def introspect(self, token: Any) -> dict[str, Any]:
        """Whether a token would be accepted now, and until when. Never consumes it."""
        if not isinstance(token, str) or not token:
            raise bad_request('body must be {"token": "vtk_..."}')
        row = (
            self.db.conn()
            .execute("SELECT * FROM provisioning_tokens WHERE token_hash = ?", (hash_secret(token),))
            .fetchone()
        )
        if row is None:
            return {"valid": False, "expires_at": None, "reason": "unknown"}
        expires = from_iso(row["expires_at"])
        org = self.db.conn().execute("SELECT is_provider FROM orgs WHERE id = ?", (row["org_id"],)).fetchone()
        if org is None or not org["is_provider"]:
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

    # --- enrollment ---------------------------------------------------------------------------

    def enroll(self, body: Any, client_cert_pem: str | None, node_token: str | None) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise bad_request("body must be a JSON object")
        token, csr_pem = body.get("token"), body.get("csr_pem")
        hostname, hardware, gpu_mode = body.get("hostname"), body.get("hardware", {}), body.get("gpu_mode")
        if not isinstance(token, str) or not token:
            raise unauthorized("missing provisioning token")
        if not isinstance(csr_pem, str):
            raise bad_request("csr_pem is required")
        if not isinstance(hostname, str) or not HOSTNAME_RE.fullmatch(hostname):
            raise bad_request(HOSTNAME_RULE)
        if not isinstance(hardware, dict):
            raise bad_request("hardware must be an object")
        check_hardware(hardware)
        if gpu_mode not in GPU_MODES:
            raise bad_request(f"gpu_mode must be one of {', '.join(GPU_MODES)}")
        try:
            key_fp = csr_key_fingerprint(csr_pem)
        except CsrError as e:
            raise bad_request(str(e)) from None
        nebula_pub, nomad_csr = body.get("nebula_public_key"), body.get("nomad_csr_pem")
        if not isinstance(nebula_pub, str):
            raise bad_request("nebula_public_key is required (the node's X25519 key, nebula's PEM format)")
        try:
            parse_public_key_pem(nebula_pub)
        except NebulaCertError as e:
            raise bad_request(f"nebula_public_key: {e}") from None
        if not isinstance(nomad_csr, str):
            raise bad_request("nomad_csr_pem is required (a CSR for the node's Nomad key)")
        try:
            csr_key_fingerprint(nomad_csr)
        except CsrError as e:
            raise bad_request(f"nomad_csr_pem: {e}") from None
        cert_fp = None
        if client_cert_pem:
            cert_fp = peer_fingerprint(client_cert_pem)

        now = self.clock.now()
        with self._tx() as conn:
            tok = conn.execute(
                "SELECT * FROM provisioning_tokens WHERE token_hash = ?", (hash_secret(token),)
            ).fetchone()
            if tok is None:
                raise unauthorized("bad provisioning token")
            if from_iso(tok["expires_at"]) <= now:
                raise unauthorized("provisioning token expired", "TOKEN_EXPIRED")
            replay_node: str | None = None
            if tok["used_at"] is not None:
                # The same key pair asking again with the same token is a retry of a request whose
                # answer was lost on the way; anyone else is refused.
                if tok["used_by_key"] != key_fp or tok["used_for_node"] is None:
                    raise unauthorized("provisioning token already used", "TOKEN_USED")
                replay_node = tok["used_for_node"]
            org = self._org(conn, tok["org_id"])
            if not org["is_provider"]:
                raise ApiError(403, "NOT_A_PROVIDER", f"org {org['name']} isn't an approved provider yet")

            node = self._node_from_credentials(conn, cert_fp, node_token)
            reenrolled = node is not None
            if node is None and replay_node is not None:
                node = conn.execute("SELECT * FROM nodes WHERE id = ?", (replay_node,)).fetchone()
            if replay_node is not None and node is not None and node["status"] == "removed":
                # A retry is only a retry while the node it enrolled still stands: once removed, a
                # node comes back only with a token that was never used.
                raise unauthorized(
                    f"provisioning token already used, and node {node['id']} it enrolled was removed"
                    " since: a used token never brings a removed node back; use a new token",
                    "TOKEN_USED",
                )
            if node is not None and node["org_id"] != org["id"]:
                raise ApiError(409, "CONFLICT", "this node is enrolled in another org")

            new_token = new_secret(NODE_TOKEN_PREFIX)
            if node is None:
                node_id, overlay_ip = self._insert_node(
                    conn, org, hostname, gpu_mode, hardware, new_token, now
                )
                cert = self._sign_node(csr_pem, node_id, org["id"])
                conn.execute("UPDATE nodes SET cert_fp = ? WHERE id = ?", (fingerprint(cert), node_id))
            else:
                node_id, overlay_ip = node["id"], node["overlay_ip"]
                cert = self._sign_node(csr_pem, node_id, org["id"])
                self._rotate(conn, node, cert_fp, node_token, fingerprint(cert), new_token)
                conn.execute(
                    "UPDATE nodes SET status = 'active', hostname = ?, gpu_mode = ?, hardware = ?,"
                    " enrollments = enrollments + 1, updated_at = ? WHERE id = ?",
                    (hostname, gpu_mode, json.dumps(hardware), to_iso(now), node_id),
                )
            if replay_node is None:
                cur = conn.execute(
                    "UPDATE provisioning_tokens SET used_at = ?, used_by_key = ?, used_for_node = ?"
                    " WHERE token_hash = ? AND used_at IS NULL",
                    (to_iso(now), key_fp, node_id, tok["token_hash"]),
                )
                if cur.rowcount != 1:
                    raise unauthorized("provisioning token already used", "TOKEN_USED")
            self._register_units(conn, node_id, hardware)
            nebula_cert, nomad_cert = self._sign_overlay(
                conn, node_id, overlay_ip, nebula_pub, nomad_csr, cert
            )

        return {
            "node_id": node_id,
            "org_id": org["id"],
            "overlay_ip": overlay_ip,
            "reenrolled": reenrolled,
            "certificate_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
            "ca_pem": self.ca_bundle_pem,
            "node_token": new_token,
            "expires_at": self._expiries(cert, nebula_cert, nomad_cert),
            "nebula": {
                "certificate": nebula_cert,
                "ca": self.nebula_ca_bundle_pem,
                "overlay_cidr": str(self.network.overlay),
                "overlay_ip": overlay_ip,
                "lighthouses": self.network.lighthouses,
                "groups": [NODE_GROUP],
                "listen_port": self.network.nebula_port,
            },
            "nomad": {
                "region": self.network.region,
                "datacenter": self.network.datacenter,
                "servers": self.network.nomad_servers,
                "node_class": gpu_mode,
                "meta": {"vectorlay_node_id": node_id, "vectorlay_org_id": org["id"]},
                "certificate_pem": nomad_cert.public_bytes(serialization.Encoding.PEM).decode(),
                "ca_pem": self.ca_bundle_pem,
            },
        }

    # --- issuing and renewing credentials -------------------------------------------------------

    def _sign_node(self, csr_pem: str, node_id: str, org_id: str) -> x509.Certificate:
        # Wall time, not the control plane's clock: TLS peers check the dates against their own.
        return self.signer.sign_node_csr(csr_pem, node_id, org_id, wall_now(), self.lifetimes.node_days)

    def _sign_overlay(
        self,
        conn: sqlite3.Connection,
        node_id: str,
        overlay_ip: str,
        nebula_pub: str,
        nomad_csr: str,
        node_cert: x509.Certificate,
    ) -> tuple[str, x509.Certificate]:
        """The nebula and Nomad certificates issued with `node_cert`, all three recorded."""
        try:
            nebula_pem = self.nebula_signer.sign(
                nebula_pub,
                name=node_id,
                ip=self.network.overlay_interface(overlay_ip),
                groups=[NODE_GROUP],
                now=wall_now(),
                days=self.lifetimes.nebula_days,
            )
            nomad_cert = self.signer.sign_nomad_client_csr(
                nomad_csr,
                node_id=node_id,
                region=self.network.region,
                overlay_ip=overlay_ip,
                now=wall_now(),
                days=self.lifetimes.nomad_days,
            )
        except (NebulaCertError, CsrError) as e:
            raise bad_request(str(e)) from None
        nebula_cert = parse_certificate_pem(nebula_pem)
        batch, issued = fingerprint(node_cert), to_iso(self.clock.now())
        for kind, serial, not_after in (
            ("node", f"{node_cert.serial_number:x}", node_cert.not_valid_after_utc),
            ("nebula", nebula_cert.fingerprint, nebula_cert.not_after),
            ("nomad", f"{nomad_cert.serial_number:x}", nomad_cert.not_valid_after_utc),
        ):
            conn.execute(
                "INSERT OR REPLACE INTO node_certificates"
                " (node_id, kind, serial, batch, issued_at, not_after) VALUES (?, ?, ?, ?, ?, ?)",
                (node_id, kind, serial, batch, issued, to_iso(not_after)),
            )
        return nebula_pem, nomad_cert

    def _expiries(
        self, node_cert: x509.Certificate, nebula_pem: str, nomad_cert: x509.Certificate
    ) -> dict[str, str]:
        return {
            "node": to_iso(node_cert.not_valid_after_utc),
            "nebula": to_iso(parse_certificate_pem(nebula_pem).not_after),
            "nomad": to_iso(nomad_cert.not_valid_after_utc),
        }

    def renew(self, body: Any, client_cert_pem: str | None, node_token: str | None) -> dict[str, Any]:
        """New credentials for the node behind a current client certificate + node token pair, for
        keys it made anew: the same node ID and overlay IP, the certificates and token of an
        enrollment. The new pair is `pending` until its first use, as at a re-enrollment, so a node
        that dies before saving the answer keeps a working identity."""
        if not client_cert_pem:
            raise unauthorized("a client certificate is required", "CLIENT_CERT_REQUIRED")
        if not node_token:
            raise unauthorized("a node token is required (Authorization: Bearer vnt_...)")
        cert_fp = peer_fingerprint(client_cert_pem)
        if not isinstance(body, dict):
            raise bad_request("body must be a JSON object")
        csr_pem, nebula_pub, nomad_csr = (
            body.get("csr_pem"),
            body.get("nebula_public_key"),
            body.get("nomad_csr_pem"),
        )
        if not isinstance(csr_pem, str):
            raise bad_request("csr_pem is required (a CSR for the node's new key)")
        if not isinstance(nebula_pub, str):
            raise bad_request(
                "nebula_public_key is required (the node's new X25519 key, nebula's PEM format)"
            )
        if not isinstance(nomad_csr, str):
            raise bad_request("nomad_csr_pem is required (a CSR for the node's new Nomad key)")
        for what, csr in (("csr_pem", csr_pem), ("nomad_csr_pem", nomad_csr)):
            try:
                csr_key_fingerprint(csr)
            except CsrError as e:
                raise bad_request(f"{what}: {e}") from None
        try:
            parse_public_key_pem(nebula_pub)
        except NebulaCertError as e:
            raise bad_request(f"nebula_public_key: {e}") from None
        with self._tx() as conn:
            node, _pending = self._active_node(conn, cert_fp, node_token)
            node_id, overlay_ip = node["id"], node["overlay_ip"]
            cert = self._sign_node(csr_pem, node_id, node["org_id"])
            new_token = new_secret(NODE_TOKEN_PREFIX)
            self._rotate(conn, node, cert_fp, node_token, fingerprint(cert), new_token)
            nebula_cert, nomad_cert = self._sign_overlay(
                conn, node_id, overlay_ip, nebula_pub, nomad_csr, cert
            )
            conn.execute("UPDATE nodes SET updated_at = ? WHERE id = ?", (to_iso(self.clock.now()), node_id))
        return {
            "node_id": node_id,
            "org_id": node["org_id"],
            "overlay_ip": overlay_ip,
            "certificate_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
            "ca_pem": self.ca_bundle_pem,
            "node_token": new_token,
            "expires_at": self._expiries(cert, nebula_cert, nomad_cert),
            "nebula": {"certificate": nebula_cert, "ca": self.nebula_ca_bundle_pem},
            "nomad": {
                "region": self.network.region,
                "certificate_pem": nomad_cert.public_bytes(serialization.Encoding.PEM).decode(),
                "ca_pem": self.ca_bundle_pem,
            },
        }

    @staticmethod
    def credential_expiry(conn: sqlite3.Connection, node_id: str, cert_fp: str) -> dict[str, str | None]:
        """When each credential the node holds expires: the set issued with its client certificate
        `cert_fp` (None for a node enrolled before they were recorded)."""
        rows = conn.execute(
            "SELECT kind, not_after FROM node_certificates WHERE node_id = ? AND batch = ?",
            (node_id, cert_fp),
        ).fetchall()
        found = {r["kind"]: r["not_after"] for r in rows}
        return {kind: found.get(kind) for kind in ("node", "nebula", "nomad")}

    @staticmethod
    def _active_node(conn: sqlite3.Connection, cert_fp: str, node_token: str) -> tuple[sqlite3.Row, bool]:
        """The node behind a client certificate (its fingerprint) + node token pair, refused when
        removed or when the pair is neither its current one nor the pending one of its last
        enrollment or renewal; and whether it is the pending one."""
        node = conn.execute(
            "SELECT * FROM nodes WHERE cert_fp = ? OR pending_cert_fp = ?", (cert_fp, cert_fp)
        ).fetchone()
        if node is None:
            raise unauthorized("the client certificate is not current", "BAD_NODE_CREDENTIALS")
        if node["status"] == "removed":
            raise ApiError(403, "NODE_REMOVED", "this node was decommissioned; re-enroll to revive it")
        pair = (cert_fp, hash_secret(node_token))
        if pair == (node["cert_fp"], node["token_hash"]):
            return node, False
        if pair == (node["pending_cert_fp"], node["pending_token_hash"]):
            return node, True
        raise unauthorized("the node token is not current", "BAD_NODE_CREDENTIALS")

    def _node_from_credentials(
        self, conn: sqlite3.Connection, cert_fp: str | None, node_token: str | None
    ) -> sqlite3.Row | None:
        """The node the presented credentials belong to; presented but unknown ones are refused.

        Refusing (instead of enrolling a new node) keeps a node with stale credentials from silently
        getting a second identity.
        """
        found: list[sqlite3.Row] = []
        if cert_fp is not None:
            row = conn.execute(
                "SELECT * FROM nodes WHERE cert_fp = ? OR pending_cert_fp = ?", (cert_fp, cert_fp)
            ).fetchone()
            if row is None:
                raise unauthorized("the node's client certificate is not current", "BAD_NODE_CREDENTIALS")
            found.append(row)
        if node_token:
            h = hash_secret(node_token)
            row = conn.execute(
                "SELECT * FROM nodes WHERE token_hash = ? OR pending_token_hash = ?", (h, h)
            ).fetchone()
            if row is None:
                raise unauthorized("the node token is not current", "BAD_NODE_CREDENTIALS")
            found.append(row)
        if not found:
            return None
        if len({r["id"] for r in found}) != 1:
            raise unauthorized("the client certificate and node token belong to different nodes")
        return found[0]

    def _insert_node(
        self,
        conn: sqlite3.Connection,
        org: sqlite3.Row,
        hostname: str,
        gpu_mode: str,
        hardware: dict[str, Any],
        node_token: str,
        now: datetime,
    ) -> tuple[str, str]:
        if org["node_quota"] is not None:
            (count,) = conn.execute("SELECT COUNT(*) FROM nodes WHERE org_id = ?", (org["id"],)).fetchone()
            if count >= org["node_quota"]:
                raise ApiError(
                    409,
                    "NODE_QUOTA_EXCEEDED",
                    f"org {org['name']} has used its node quota ({org['node_quota']})",
                )
        (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM nodes").fetchone()
        node_id = new_id("node_")
        overlay_ip = self.network.overlay_ip(seq)
        conn.execute(
            "INSERT INTO nodes (id, org_id, seq, overlay_ip, hostname, gpu_mode, hardware, status,"
            " cert_fp, token_hash, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'active', '', ?, ?, ?)",
            (
                node_id,
                org["id"],
                seq,
                overlay_ip,
                hostname,
                gpu_mode,
                json.dumps(hardware),
                hash_secret(node_token),
                to_iso(now),
                to_iso(now),
            ),
        )
        return node_id, overlay_ip

    def _rotate(
        self,
        conn: sqlite3.Connection,
        node: sqlite3.Row,
        cert_fp: str | None,
        node_token: str | None,
        new_cert_fp: str,
        new_token: str,
    ) -> None:
        """Issue new credentials as `pending`; whichever pair the node presented stays valid.

        If the node presented its pending pair, it evidently saved it: that pair becomes current.
        """
        presented_pending = (cert_fp is not None and cert_fp == node["pending_cert_fp"]) or (
            node_token is not None and hash_secret(node_token) == node["pending_token_hash"]
        )
        if presented_pending:
            conn.execute(
                "UPDATE nodes SET cert_fp = pending_cert_fp, token_hash = pending_token_hash WHERE id = ?",
                (node["id"],),
            )
        conn.execute(
            "UPDATE nodes SET pending_cert_fp = ?, pending_token_hash = ? WHERE id = ?",
            (new_cert_fp, hash_secret(new_token), node["id"]),
        )

    def _register_units(self, conn: sqlite3.Connection, node_id: str, hardware: dict[str, Any]) -> None:
        conn.execute("DELETE FROM gpu_units WHERE node_id = ?", (node_id,))
        units = hardware.get("units") or []
        if not isinstance(units, list):
            raise bad_request("hardware.units must be a list")
        for unit in units:
            if not isinstance(unit, dict) or not _IOMMU_GROUP.fullmatch(str(unit.get("iommu_group"))):
                raise bad_request(
                    "each hardware unit needs an iommu_group (a kernel group number, as a string)"
                )
            if unit.get("status") not in UNIT_STATUSES:
                raise bad_request(f"a hardware unit's status must be one of {', '.join(UNIT_STATUSES)}")
            conn.execute(
                "INSERT OR REPLACE INTO gpu_units (node_id, iommu_group, gpus, status, allocatable)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    node_id,
                    unit["iommu_group"],
                    json.dumps(unit.get("gpus") or []),
                    unit["status"],
                    int(unit.get("status") == "ready"),
                ),
            )

    # --- node endpoints (mTLS) -----------------------------------------------------------------

    def node_self(self, client_cert_pem: str | None, node_token: str | None) -> dict[str, Any]:
        """The node behind a client certificate + node token pair, both required and current."""
        if not client_cert_pem:
            raise unauthorized("a client certificate is required", "CLIENT_CERT_REQUIRED")
        if not node_token:
            raise unauthorized("a node token is required (Authorization: Bearer vnt_...)")
        cert_fp = peer_fingerprint(client_cert_pem)
        with self._tx() as conn:
            node, pending = self._active_node(conn, cert_fp, node_token)
            if pending:
                # First use of the pair issued at the last enrollment: the node has it, so the
                # previous pair stops working now.
                conn.execute(
                    "UPDATE nodes SET cert_fp = pending_cert_fp, token_hash = pending_token_hash,"
                    " pending_cert_fp = NULL, pending_token_hash = NULL WHERE id = ?",
                    (node["id"],),
                )
            units = conn.execute(
                "SELECT COUNT(*) AS n, COALESCE(SUM(allocatable), 0) AS a FROM gpu_units WHERE node_id = ?",
                (node["id"],),
            ).fetchone()
            expiry = self.credential_expiry(conn, node["id"], cert_fp)
        return {
            "node_id": node["id"],
            "org_id": node["org_id"],
            "status": node["status"],
            "overlay_ip": node["overlay_ip"],
            "hostname": node["hostname"],
            "gpu_mode": node["gpu_mode"],
            "gpu_units": {"total": units["n"], "allocatable": units["a"]},
            "credentials_expire_at": expiry,
        }

    # --- provider API (API key) ----------------------------------------------------------------

    def set_node_status(self, api_key: str | None, org_ref: str, node_id: str, body: Any) -> dict[str, Any]:
        key_org = self.org_for_api_key(api_key)
        if not isinstance(body, dict) or body.get("status") != "removed":
            raise bad_request('only {"status": "removed"} is supported; re-enroll a node to bring it back')
        if org_ref not in (key_org["id"], key_org["name"]):
            raise ApiError(404, "NOT_FOUND", f"no node {node_id} in org {org_ref}")
        if not key_org["is_provider"]:
            raise ApiError(403, "NOT_A_PROVIDER", f"org {key_org['name']} isn't an approved provider yet")
        with self._tx() as conn:
            node = conn.execute(
                "SELECT * FROM nodes WHERE id = ? AND org_id = ?", (node_id, key_org["id"])
            ).fetchone()
            if node is None:
                raise ApiError(404, "NOT_FOUND", f"no node {node_id} in org {org_ref}")
            freed = conn.execute(
                "UPDATE gpu_units SET allocatable = 0 WHERE node_id = ? AND allocatable = 1", (node_id,)
            ).rowcount
            conn.execute(
                "UPDATE nodes SET status = 'removed', updated_at = ? WHERE id = ?",
                (to_iso(self.clock.now()), node_id),
            )
            # Every nebula certificate the node was given goes on the overlay hosts' blocklist.
            conn.execute(
                "UPDATE node_certificates SET revoked_at = ? WHERE node_id = ? AND revoked_at IS NULL",
                (to_iso(self.clock.now()), node_id),
            )
        return {"node_id": node_id, "status": "removed", "units_freed": freed}

    # --- the overlay's revocations ----------------------------------------------------------

    def nebula_blocklist(self) -> list[str]:
        """The fingerprints nebula's `pki.blocklist` must hold: certificates of removed nodes that
        have not expired yet (nebula refuses an expired one anyway, so the list stays bounded)."""
        rows = self.db.conn().execute(
            "SELECT serial AS fingerprint, not_after FROM node_certificates"
            " WHERE kind = 'nebula' AND revoked_at IS NOT NULL ORDER BY serial"
        )
        # Nebula judges expiry by the wall clock, and the certificates were signed against it.
        now = wall_now()
        return [r["fingerprint"] for r in rows if from_iso(r["not_after"]) > now]

    def org_summary(self, org_ref: str) -> dict[str, Any]:
        conn = self.db.conn()
        org = self._org(conn, org_ref)
        nodes = [
            {
                "node_id": r["id"],
                "status": r["status"],
                "overlay_ip": r["overlay_ip"],
                "credentials_expire_at": self.credential_expiry(conn, r["id"], r["cert_fp"]),
            }
            for r in conn.execute("SELECT * FROM nodes WHERE org_id = ? ORDER BY seq", (org["id"],))
        ]
        return {**_org_json(org), "nodes": nodes}


def _org_json(org: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": org["id"],
        "name": org["name"],
        "provider": bool(org["is_provider"]),
        "node_quota": org["node_quota"],
    }
