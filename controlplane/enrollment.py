"""Enrollment and renewal: what a node sends to join (or rejoin) and what it is issued.

An enrollment is a chain of named steps (`enroll`): check the request, claim the provisioning token,
find the node it comes from (if any), place the node (a new one, or the same one again), consume the
token, record its GPU units, issue its credentials, answer. All but the first run in one write
transaction, so a token is single-use under concurrency and the node quota is race-free.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bootstrap.nebula import NebulaCertError, parse_certificate_pem, parse_public_key_pem
from controlplane import nodeauth, store
from controlplane.clock import from_iso, to_iso, wall_now
from controlplane.errors import Conflict, bad_request, not_a_provider, unauthorized
from controlplane.pki import CsrError, csr_key_fingerprint, fingerprint
from controlplane.tokens import NODE_TOKEN_PREFIX, hash_secret, new_id, new_secret

if TYPE_CHECKING:
    from controlplane.service import ControlPlane

GPU_MODES = ("passthrough", "container", "none")
# RFC 1123 host names (and the underscores real machines carry): never a control character,
# whitespace or quote that would reach a log line, a config file or a dashboard as is.
HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})")
HOSTNAME_RULE = (
    "hostname must be 1-253 characters: letters, digits, '.', '-' and '_', starting with a letter or digit"
)
# What the node reports of each GPU unit (docs/contracts.md#hardware-model); stored as is, so held to that.
_IOMMU_GROUP = re.compile(r"[0-9]{1,9}")
_PCI_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]")
# Far above any machine (an HGX box has 8 GPUs): a bound on what one node makes the database hold.
MAX_GPUS = 1024
UNIT_STATUSES = ("ready", "needs_binding", "not_isolatable", "wedged", "no_iommu")
# Nebula groups: the firewall of every node admits only hosts of the control group.
NODE_GROUP = "vectorlay-node"


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


def checked_units(hardware: dict[str, Any]) -> list[dict[str, Any]]:
    """The GPU units to record of a node, each with a group and a status the store can hold."""
    units = hardware.get("units") or []
    if not isinstance(units, list):
        raise bad_request("hardware.units must be a list")
    for unit in units:
        if not isinstance(unit, dict) or not _IOMMU_GROUP.fullmatch(str(unit.get("iommu_group"))):
            raise bad_request("each hardware unit needs an iommu_group (a kernel group number, as a string)")
        if unit.get("status") not in UNIT_STATUSES:
            raise bad_request(f"a hardware unit's status must be one of {', '.join(UNIT_STATUSES)}")
    return units


@dataclass(frozen=True)
class EnrollRequest:
    """An enrollment body that passed every check that needs no database."""

    token: str
    csr_pem: str
    key_fp: str  # of the CSR's key: a retry of a request whose answer was lost comes from the same key
    hostname: str
    gpu_mode: str
    hardware: dict[str, Any]
    nebula_pub: str
    nomad_csr: str


def parse_enroll(body: Any) -> EnrollRequest:
    """Step 1: the request, or a 400/401 saying what is wrong with it, in the order a node fixes it."""
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
    return EnrollRequest(token, csr_pem, key_fp, hostname, gpu_mode, hardware, nebula_pub, nomad_csr)


@dataclass(frozen=True)
class Claim:
    """A provisioning token an enrollment may use, and the node it enrolled when this is a retry."""

    token: sqlite3.Row
    org: sqlite3.Row
    replay_node: str | None


def claim_token(conn: sqlite3.Connection, req: EnrollRequest, now: datetime) -> Claim:
    """Step 2: the provisioning token, unexpired, unused (or used by this same key: a retry), of an
    org that is an approved provider."""
    tok = store.provisioning_token(conn, hash_secret(req.token))
    if tok is None:
        raise unauthorized("bad provisioning token")
    if from_iso(tok["expires_at"]) <= now:
        raise unauthorized("provisioning token expired", "TOKEN_EXPIRED")
    replay_node: str | None = None
    if tok["used_at"] is not None:
        # The same key pair asking again with the same token is a retry of a request whose answer
        # was lost on the way; anyone else is refused.
        if tok["used_by_key"] != req.key_fp or tok["used_for_node"] is None:
            raise unauthorized("provisioning token already used", "TOKEN_USED")
        replay_node = tok["used_for_node"]
    org = store.find_org(conn, tok["org_id"])
    if not org["is_provider"]:
        raise not_a_provider(org["name"])
    return Claim(tok, org, replay_node)


@dataclass(frozen=True)
class Found:
    """The node an enrollment comes from: None for a new one."""

    node: sqlite3.Row | None
    reenrolled: bool  # it presented credentials of its own
    presented_pending: bool


def find_node(conn: sqlite3.Connection, claim: Claim, cert_fp: str | None, node_token: str | None) -> Found:
    """Step 3: the node by the credentials it presented, else the node a retried token enrolled."""
    node, pending = nodeauth.reenrolling_node(conn, cert_fp, node_token)
    reenrolled = node is not None
    if node is None and claim.replay_node is not None:
        node = store.node_by_id(conn, claim.replay_node)
    if claim.replay_node is not None and node is not None and node["status"] == "removed":
        # A retry is only a retry while the node it enrolled still stands: once removed, a node
        # comes back only with a token that was never used.
        raise unauthorized(
            f"provisioning token already used, and node {node['id']} it enrolled was removed"
            " since: a used token never brings a removed node back; use a new token",
            "TOKEN_USED",
        )
    if node is not None and node["org_id"] != claim.org["id"]:
        raise Conflict("this node is enrolled in another org")
    return Found(node, reenrolled, pending)


def place_node(
    cp: ControlPlane,
    conn: sqlite3.Connection,
    req: EnrollRequest,
    claim: Claim,
    found: Found,
    new_token: str,
    now: datetime,
) -> tuple[str, str, x509.Certificate]:
    """Step 4: a new node (within the org's quota, at the next overlay address) or the same node
    again, with its client certificate signed; its new pair is pending until first used. Returns
    the node's ID, overlay IP and certificate."""
    org = claim.org
    if found.node is None:
        node_id, overlay_ip = _insert_node(cp, conn, req, org, new_token, now)
        cert = sign_node(cp, req.csr_pem, node_id, org["id"])
        store.set_certificate(conn, node_id, fingerprint(cert))
        return node_id, overlay_ip, cert
    node_id, overlay_ip = found.node["id"], found.node["overlay_ip"]
    cert = sign_node(cp, req.csr_pem, node_id, org["id"])
    # Whichever pair the node presented stays valid; if it presented its pending pair, it
    # evidently saved it, and that pair becomes current.
    if found.presented_pending:
        store.promote_pending(conn, node_id)
    store.set_pending(conn, node_id, fingerprint(cert), hash_secret(new_token))
    store.reenroll_node(conn, node_id, req.hostname, req.gpu_mode, req.hardware, to_iso(now))
    return node_id, overlay_ip, cert


def _insert_node(
    cp: ControlPlane,
    conn: sqlite3.Connection,
    req: EnrollRequest,
    org: sqlite3.Row,
    node_token: str,
    now: datetime,
) -> tuple[str, str]:
    if org["node_quota"] is not None and store.count_nodes(conn, org["id"]) >= org["node_quota"]:
        raise Conflict(
            f"org {org['name']} has used its node quota ({org['node_quota']})", "NODE_QUOTA_EXCEEDED"
        )
    seq = store.next_node_seq(conn)
    node_id = new_id("node_")
    overlay_ip = cp.network.overlay_ip(seq)
    store.insert_node(
        conn,
        node_id=node_id,
        org_id=org["id"],
        seq=seq,
        overlay_ip=overlay_ip,
        hostname=req.hostname,
        gpu_mode=req.gpu_mode,
        hardware=req.hardware,
        token_hash=hash_secret(node_token),
        now=to_iso(now),
    )
    return node_id, overlay_ip


def consume_token(
    conn: sqlite3.Connection, req: EnrollRequest, claim: Claim, node_id: str, now: datetime
) -> None:
    """Step 5: the token is used, by this key for this node (a retry finds it so)."""
    if claim.replay_node is None and not store.use_provisioning_token(
        conn, claim.token["token_hash"], to_iso(now), req.key_fp, node_id
    ):
        raise unauthorized("provisioning token already used", "TOKEN_USED")


def enroll(
    cp: ControlPlane, body: Any, client_cert_pem: str | None, node_token: str | None
) -> dict[str, Any]:
    req = parse_enroll(body)
    cert_fp = nodeauth.peer_fingerprint(client_cert_pem) if client_cert_pem else None
    now = cp.clock.now()
    with cp.store.write() as conn:
        claim = claim_token(conn, req, now)
        found = find_node(conn, claim, cert_fp, node_token)
        new_token = new_secret(NODE_TOKEN_PREFIX)
        node_id, overlay_ip, cert = place_node(cp, conn, req, claim, found, new_token, now)
        consume_token(conn, req, claim, node_id, now)
        store.replace_units(conn, node_id, checked_units(req.hardware))
        nebula_cert, nomad_cert = sign_overlay(
            cp, conn, node_id, overlay_ip, req.nebula_pub, req.nomad_csr, cert
        )
    return _enrolled_answer(
        cp, req, claim, found, node_id, overlay_ip, new_token, cert, nebula_cert, nomad_cert
    )


def _enrolled_answer(
    cp: ControlPlane,
    req: EnrollRequest,
    claim: Claim,
    found: Found,
    node_id: str,
    overlay_ip: str,
    new_token: str,
    cert: x509.Certificate,
    nebula_cert: str,
    nomad_cert: x509.Certificate,
) -> dict[str, Any]:
    """Step 6: everything the node needs to join the overlay and the scheduler."""
    org_id = claim.org["id"]
    return {
        "node_id": node_id,
        "org_id": org_id,
        "overlay_ip": overlay_ip,
        "reenrolled": found.reenrolled,
        "certificate_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "ca_pem": cp.ca_bundle_pem,
        "node_token": new_token,
        "expires_at": expiries(cert, nebula_cert, nomad_cert),
        "nebula": {
            "certificate": nebula_cert,
            "ca": cp.nebula_ca_bundle_pem,
            "overlay_cidr": str(cp.network.overlay),
            "overlay_ip": overlay_ip,
            "lighthouses": cp.network.lighthouses,
            "groups": [NODE_GROUP],
            "listen_port": cp.network.nebula_port,
        },
        "nomad": {
            "region": cp.network.region,
            "datacenter": cp.network.datacenter,
            "servers": cp.network.nomad_servers,
            "node_class": req.gpu_mode,
            "meta": {"vectorlay_node_id": node_id, "vectorlay_org_id": org_id},
            "certificate_pem": nomad_cert.public_bytes(serialization.Encoding.PEM).decode(),
            "ca_pem": cp.ca_bundle_pem,
        },
    }


# --- issuing and renewing credentials -----------------------------------------------------------


def sign_node(cp: ControlPlane, csr_pem: str, node_id: str, org_id: str) -> x509.Certificate:
    # Wall time, not the control plane's clock: TLS peers check the dates against their own.
    return cp.signer.sign_node_csr(csr_pem, node_id, org_id, wall_now(), cp.lifetimes.node_days)


def sign_overlay(
    cp: ControlPlane,
    conn: sqlite3.Connection,
    node_id: str,
    overlay_ip: str,
    nebula_pub: str,
    nomad_csr: str,
    node_cert: x509.Certificate,
) -> tuple[str, x509.Certificate]:
    """The nebula and Nomad certificates issued with `node_cert`, all three recorded."""
    try:
        nebula_pem = cp.nebula_signer.sign(
            nebula_pub,
            name=node_id,
            ip=cp.network.overlay_interface(overlay_ip),
            groups=[NODE_GROUP],
            now=wall_now(),
            days=cp.lifetimes.nebula_days,
        )
        nomad_cert = cp.signer.sign_nomad_client_csr(
            nomad_csr,
            node_id=node_id,
            region=cp.network.region,
            overlay_ip=overlay_ip,
            now=wall_now(),
            days=cp.lifetimes.nomad_days,
        )
    except (NebulaCertError, CsrError) as e:
        raise bad_request(str(e)) from None
    nebula_cert = parse_certificate_pem(nebula_pem)
    store.record_certificates(
        conn,
        node_id,
        batch=fingerprint(node_cert),
        issued=to_iso(cp.clock.now()),
        certs=(
            ("node", f"{node_cert.serial_number:x}", to_iso(node_cert.not_valid_after_utc)),
            ("nebula", nebula_cert.fingerprint, to_iso(nebula_cert.not_after)),
            ("nomad", f"{nomad_cert.serial_number:x}", to_iso(nomad_cert.not_valid_after_utc)),
        ),
    )
    return nebula_pem, nomad_cert


def expiries(node_cert: x509.Certificate, nebula_pem: str, nomad_cert: x509.Certificate) -> dict[str, str]:
    return {
        "node": to_iso(node_cert.not_valid_after_utc),
        "nebula": to_iso(parse_certificate_pem(nebula_pem).not_after),
        "nomad": to_iso(nomad_cert.not_valid_after_utc),
    }


def renew(cp: ControlPlane, body: Any, client_cert_pem: str | None, node_token: str | None) -> dict[str, Any]:
    """New credentials for the node behind a current client certificate + node token pair, for
    keys it made anew: the same node ID and overlay IP, the certificates and token of an
    enrollment. The new pair is `pending` until its first use, as at a re-enrollment, so a node
    that dies before saving the answer keeps a working identity."""
    creds = nodeauth.presented(client_cert_pem, node_token)
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
        raise bad_request("nebula_public_key is required (the node's new X25519 key, nebula's PEM format)")
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
    with cp.store.write() as conn:
        # A pending pair presented here is promoted first, as a re-enrollment does: the pair
        # presented stays valid until the node uses the one issued now.
        node = nodeauth.authenticate(conn, creds)
        node_id, overlay_ip = node["id"], node["overlay_ip"]
        cert = sign_node(cp, csr_pem, node_id, node["org_id"])
        new_token = new_secret(NODE_TOKEN_PREFIX)
        store.set_pending(conn, node_id, fingerprint(cert), hash_secret(new_token))
        nebula_cert, nomad_cert = sign_overlay(cp, conn, node_id, overlay_ip, nebula_pub, nomad_csr, cert)
        store.touch_node(conn, node_id, to_iso(cp.clock.now()))
    return {
        "node_id": node_id,
        "org_id": node["org_id"],
        "overlay_ip": overlay_ip,
        "certificate_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "ca_pem": cp.ca_bundle_pem,
        "node_token": new_token,
        "expires_at": expiries(cert, nebula_cert, nomad_cert),
        "nebula": {"certificate": nebula_cert, "ca": cp.nebula_ca_bundle_pem},
        "nomad": {
            "region": cp.network.region,
            "certificate_pem": nomad_cert.public_bytes(serialization.Encoding.PEM).decode(),
            "ca_pem": cp.ca_bundle_pem,
        },
    }
