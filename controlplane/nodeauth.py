"""Who a node is: the one authentication of every node endpoint (self, renew, heartbeat, the
artifacts), and the identification of a node that enrolls again.

A node proves itself with a pair: the client certificate the TLS layer verified and the node token
it sends as `Authorization: Bearer vnt_...`. Both are required and both must be the node's current
pair, or the pending pair of its last enrollment or renewal, which becomes current on this first use
(the node evidently saved it), so that a node that died before saving a new pair keeps a working one.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from controlplane import store
from controlplane.clock import wall_now
from controlplane.errors import Forbidden, unauthorized
from controlplane.pki import peer_certificate
from controlplane.tokens import hash_secret

BAD_CREDENTIALS = "BAD_NODE_CREDENTIALS"


def peer_fingerprint(client_cert_pem: str) -> str:
    """The fingerprint of the client certificate the TLS layer verified, refused once expired: a
    resumed TLS session does not check the certificate's dates again, so this does."""
    cert_fp, not_after = peer_certificate(client_cert_pem)
    if wall_now() > not_after:
        raise unauthorized("the client certificate has expired", BAD_CREDENTIALS)
    return cert_fp


@dataclass(frozen=True)
class NodeCredentials:
    """The pair a request presented: its client certificate's fingerprint and its node token."""

    cert_fp: str
    token: str


def presented(client_cert_pem: str | None, node_token: str | None) -> NodeCredentials:
    """The pair of a request, both parts required; checked against the database by authenticate."""
    if not client_cert_pem:
        raise unauthorized("a client certificate is required", "CLIENT_CERT_REQUIRED")
    if not node_token:
        raise unauthorized("a node token is required (Authorization: Bearer vnt_...)")
    return NodeCredentials(peer_fingerprint(client_cert_pem), node_token)


def authenticate(
    conn: sqlite3.Connection, creds: NodeCredentials, *, removed_ok: bool = False
) -> sqlite3.Row:
    """The node behind `creds` (with `enrolled_units`, the GPU units it enrolled with), inside the
    caller's write transaction: its pending pair becomes current on first use.

    A removed node is refused (403 NODE_REMOVED) before its pair is looked at, unless `removed_ok`:
    a heartbeat is answered `removed` instead, and only for the node's own pair.
    """
    node = store.node_by_certificate(conn, creds.cert_fp)
    if node is None:
        raise unauthorized("the client certificate is not current", BAD_CREDENTIALS)
    if not removed_ok and node["status"] == "removed":
        raise Forbidden("this node was decommissioned; re-enroll to revive it", "NODE_REMOVED")
    pair = (creds.cert_fp, hash_secret(creds.token))
    if pair == (node["cert_fp"], node["token_hash"]):
        return node
    if pair == (node["pending_cert_fp"], node["pending_token_hash"]):
        store.promote_pending(conn, node["id"])
        return node
    raise unauthorized("the node token is not current", BAD_CREDENTIALS)


def reenrolling_node(
    conn: sqlite3.Connection, cert_fp: str | None, node_token: str | None
) -> tuple[sqlite3.Row | None, bool]:
    """The node an enrollment comes from, by whatever it presented (either part of its pair, or
    none: a new node), and whether what it presented is its pending pair. Presented but unknown
    credentials are refused: enrolling a new node instead would silently give a node with stale
    credentials a second identity.

    Not `authenticate`: an enrollment is authorised by its provisioning token, and a node whose
    identity files were partly lost (only its certificate, only its token) is still the same node.
    """
    found: list[sqlite3.Row] = []
    token_hash = hash_secret(node_token) if node_token else None
    if cert_fp is not None:
        row = store.node_by_certificate(conn, cert_fp)
        if row is None:
            raise unauthorized("the node's client certificate is not current", BAD_CREDENTIALS)
        found.append(row)
    if token_hash is not None:
        row = store.node_by_token(conn, token_hash)
        if row is None:
            raise unauthorized("the node token is not current", BAD_CREDENTIALS)
        found.append(row)
    if not found:
        return None, False
    if len({r["id"] for r in found}) != 1:
        raise unauthorized("the client certificate and node token belong to different nodes")
    node = found[0]
    pending = (cert_fp is not None and cert_fp == node["pending_cert_fp"]) or (
        token_hash is not None and token_hash == node["pending_token_hash"]
    )
    return node, pending
