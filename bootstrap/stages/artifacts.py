"""Stage `artifacts`: fetch the control plane's signed manifest with the node's durable identity,
verify it against the pinned key (and that it is no older than the last one accepted, and not
expired), and make every agent's offered version present and verified in
/opt/vectorlay/releases. Switching to a version is the agents stage's job (it drains and checks
health); this stage only downloads what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

from bootstrap import artifacts, platform
from bootstrap.api import ApiClient, ClientCert, Proxy
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
from bootstrap.plan import Fetch, compute
from bootstrap.stages.contract import Context, Facts, Outcome, StagePlan, StageResult
from bootstrap.stages.control_plane import proxy
from bootstrap.state import STATE_PATH, RunState
from bootstrap.update import SERVICES

CONTAINER_ONLY = ("runsc",)


def agent_names(gpu_mode: str) -> list[str]:
    return [*SERVICES, *(CONTAINER_ONLY if gpu_mode == "container" else ())]


def node_client(
    ident: Identity, api: str | None = None, ca_file: Path | None = None, *, proxy: Proxy | None = None
) -> ApiClient:
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


def gpu_mode_of(ctx: Context, facts: Facts) -> str:
    inv = facts.inventory
    return platform.gpu_mode(ctx.settings.gpu_mode, has_gpus=inv is not None and bool(inv.gpus))


@dataclass(frozen=True)
class _Accepted:
    """The manifest the plan verified: its serial is recorded, what is missing downloaded."""

    serial: int
    keyring: str | None
    missing: tuple[Artifact, ...]


def plan(ctx: Context, facts: Facts) -> StagePlan[_Accepted]:
    ident = facts.identity if facts.identity is not None else load_identity(ctx.host)
    names = agent_names(gpu_mode_of(ctx, facts))
    if ident is None:
        ctx.out(
            "artifacts: not enrolled yet; the agents are fetched from the signed manifest after enrollment"
        )
        # The manifest is fetched with the identity the enrollment gives: its versions are not known.
        fetches = [Fetch(n, reason="after enrollment") for n in names] if facts.would_enroll else []
        changes = compute(ctx.host, fetches)
        return StagePlan(facts, StageResult(Outcome.PLANNED, "not enrolled"), changes)
    client = node_client(ident, ctx.api, ctx.ca_file, proxy=proxy(ctx))
    # A copy: the serial accepted is the run state's only once apply records it.
    trial = replace(ctx.state)
    try:
        manifest = fetch_manifest(client, ident, trial)
    finally:
        client.close()
    arts = wanted(ctx.host, manifest, names, lambda m: ctx.out(f"artifacts: {m}"))
    fetches, missing = [], []
    for art in arts:
        present = artifacts.is_installed(ctx.host, art)
        if present:
            ctx.out(f"artifacts: {art.name} {art.version} present and verified")
        else:
            missing.append(art)
        fetches.append(Fetch(art.name, art.version, art.size, art.sha256, needed=not present))
    targets = MappingProxyType({a.name: a for a in arts})
    carry = _Accepted(trial.manifest_serial, trial.manifest_keys, tuple(missing))
    after = replace(facts, identity=ident, targets=targets)
    return StagePlan(after, StageResult(Outcome.PLANNED), compute(ctx.host, fetches), carry=carry)


def apply(ctx: Context, sp: StagePlan[_Accepted]) -> tuple[StageResult, Facts]:
    ok = StageResult(Outcome.OK, sp.planned.message)
    accepted, ident = sp.carry, sp.facts.identity
    if accepted is None or ident is None:
        return ok, sp.facts
    ctx.state.manifest_serial, ctx.state.manifest_keys = accepted.serial, accepted.keyring
    # Kept at once, not only when the stage ends well: the serial was accepted.
    ctx.persist()
    if accepted.missing:
        client = node_client(ident, ctx.api, ctx.ca_file, proxy=proxy(ctx))
        try:
            for art in accepted.missing:
                artifacts.install(ctx.host, client, art)
                ctx.out(f"artifacts: {art.name} {art.version} downloaded, sha256 verified, unpacked")
        finally:
            client.close()
    return ok, sp.facts
