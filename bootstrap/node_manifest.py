"""The signed manifest as the enrolled node fetches it: over mTLS with its durable identity,
verified against the keys it pinned at enrollment, never older than the last one accepted; and the
entries of it this node runs. The artifacts stage (an install run) and `vectorlay-bootstrap update`
(the timer) both stand on this."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bootstrap import artifacts
from bootstrap.api import ApiClient, ClientCert, Proxy
from bootstrap.errors import VectorlayError
from bootstrap.host import Host
from bootstrap.identity import Identity
from bootstrap.manifest import (
    Artifact,
    Manifest,
    check_fresh,
    keyring_id,
    public_key_from_text,
    verify_manifest,
)
from bootstrap.state import STATE_PATH, RunState


def node_client(
    ident: Identity, api: str, ca_file: Path | None = None, *, proxy: Proxy | None = None
) -> ApiClient:
    """The control plane at `api` (bootstrap.resolve.api_url: resolved once by the caller) as the
    enrolled node reaches it: mTLS with its durable identity, the CA it pinned at enrollment trusted."""
    return ApiClient(
        api,
        ca_file=ca_file,
        pinned_ca=ident.ca_file,
        client_cert=ClientCert(ident.cert_file, ident.key_file),
        node_token=ident.node_token(),
        proxy=proxy,
    )


def fetch_manifest(client: ApiClient, ident: Identity, state: RunState) -> Manifest:
    """The signed manifest, fetched with the node's credentials (`node_client`: certificate and token),
    verified against the pinned keys and refused when older than the last one accepted or expired.
    Records the accepted serial in `state`; the caller saves it."""
    pinned = [k for k in ident.enrollment().get("manifest_keys") or [] if isinstance(k, str)]
    keys = [public_key_from_text(k) for k in pinned]
    if not keys:
        raise VectorlayError(
            "this node has no pinned manifest key, so it cannot verify the artifacts it would install",
            "re-run the install one-liner with a new token to re-enroll",
        )
    doc = client.request("GET", "/v1/artifacts/manifest")
    manifest = verify_manifest(doc, keys, source=client.base_url)
    keyring = keyring_id(pinned)
    trusted = state.manifest_serial if state.manifest_keys == keyring else 0
    if not isinstance(trusted, int) or isinstance(trusted, bool) or trusted < 0:
        raise VectorlayError(
            f"{STATE_PATH}: manifest_serial is not a number ({trusted!r:.40})",
            f"move {STATE_PATH} away and re-run; it is rebuilt",
        )
    check_fresh(manifest, trusted, client.base_url)
    state.manifest_serial, state.manifest_keys = max(trusted, manifest.serial), keyring
    return manifest


def wanted(host: Host, manifest: Manifest, names: list[str], out: Callable[[str], None]) -> list[Artifact]:
    """The manifest's entries for `names`. One it does not list keeps the installed version: a
    manifest never removes an agent; only an agent never installed is an error."""
    found = []
    for name in names:
        art = manifest.find(name)
        if art is None:
            current = artifacts.current_version(host, name)
            if current is None:
                manifest.get(name)  # raises the error naming the missing artifact
            out(f"{name} is not in manifest {manifest.version}; keeping {current}")
            continue
        found.append(art)
    return found
