"""Stage `artifacts`: fetch the control plane's signed manifest with the node's durable identity,
verify it against the pinned key (and that it is no older than the last one accepted, and not
expired), and make every agent's offered version present and verified in
/opt/vectorlay/releases. Switching to a version is the agents stage's job (it drains and checks
health); this stage only downloads what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType

from bootstrap import artifacts
from bootstrap.identity import load_identity
from bootstrap.manifest import Artifact
from bootstrap.node_manifest import fetch_manifest, node_client, wanted
from bootstrap.plan import Fetch, compute
from bootstrap.stages.contract import Context, Facts, Outcome, StagePlan, StageResult
from bootstrap.stages.control_plane import api_url, gpu_mode_of, proxy
from bootstrap.update import agent_names


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
    client = node_client(ident, api_url(ctx), ctx.ca_file, proxy=proxy(ctx))
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
        client = node_client(ident, api_url(ctx), ctx.ca_file, proxy=proxy(ctx))
        try:
            for art in accepted.missing:
                artifacts.install(ctx.host, client, art)
                ctx.out(f"artifacts: {art.name} {art.version} downloaded, sha256 verified, unpacked")
        finally:
            client.close()
    return ok, sp.facts
