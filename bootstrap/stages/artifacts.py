"""Stage `artifacts`: fetch the control plane's signed manifest with the node's durable identity,
verify it against the pinned key (and that it is no older than the last one accepted, and not
expired), and make every agent's offered version present and verified in
/opt/vectorlay/releases. Switching to a version is the agents stage's job (it drains and checks
health); this stage only downloads what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bootstrap import artifacts, platform
from bootstrap.api import ApiClient, ClientCert
from bootstrap.errors import VectorlayError
from bootstrap.host import Host
from bootstrap.identity import Identity, load_identity
from bootstrap.manifest import (
    Artifact,
    Manifest,
    check_fresh,
    keyring_id,
    public_key_from_text,
    verify_manifest,
)
from bootstrap.stages import Context, Outcome, StageResult
from bootstrap.state import STATE_PATH, RunState, save_state
from bootstrap.update import SERVICES

CONTAINER_ONLY = ("runsc",)


def agent_names(gpu_mode: str) -> list[str]:
    return [*SERVICES, *(CONTAINER_ONLY if gpu_mode == "container" else ())]


def node_client(ident: Identity, api: str | None = None, ca_file: Path | None = None) -> ApiClient:
    """The control plane as the enrolled node reaches it: mTLS with its durable identity, the CA it
    pinned at enrollment trusted. An API given to this run (--api, install.sh's api=) wins over the
    one the node enrolled with."""
    url = api or ident.api
    if not url:
        raise VectorlayError(
            "no control plane URL known", "pass --api https://... (or api=... to install.sh)"
        )
    return ApiClient(
        url,
        ca_file=ca_file,
        pinned_ca=ident.ca_file,
        client_cert=ClientCert(ident.cert_file, ident.key_file),
        node_token=ident.node_token(),
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


def gpu_mode_of(ctx: Context) -> str:
    inv = ctx.inventory
    return platform.gpu_mode(ctx.gpu_mode, ctx.settings.gpu_mode, has_gpus=inv is not None and bool(inv.gpus))


def run(ctx: Context) -> StageResult:
    ident = load_identity(ctx.host)
    if ident is None:
        # Only reachable when enrollment did not run (--only, or a plan): the enroll stage fails a
        # run that cannot enroll.
        ctx.out(
            "artifacts: not enrolled yet; the agents are fetched from the signed manifest after enrollment"
        )
        return StageResult(Outcome.PLANNED if ctx.plan_only else Outcome.OK, "not enrolled")
    client = node_client(ident, ctx.api, ctx.ca_file)
    try:
        manifest = fetch_manifest(client, ident, ctx.state)
        if not ctx.plan_only:
            # Kept at once, not only when the stage ends well: the serial was accepted.
            save_state(ctx.host, ctx.state)
        for art in wanted(
            ctx.host, manifest, agent_names(gpu_mode_of(ctx)), lambda m: ctx.out(f"artifacts: {m}")
        ):
            name = art.name
            ctx.targets[name] = art
            if artifacts.is_installed(ctx.host, art):
                ctx.out(f"artifacts: {name} {art.version} present and verified")
            elif ctx.plan_only:
                ctx.out(
                    f"artifacts: would download {name} {art.version} "
                    f"({art.size} bytes, sha256 {art.sha256[:12]}…)"
                )
            else:
                artifacts.install(ctx.host, client, art)
                ctx.out(f"artifacts: {name} {art.version} downloaded, sha256 verified, unpacked")
    finally:
        client.close()
    return StageResult(Outcome.PLANNED if ctx.plan_only else Outcome.OK)
