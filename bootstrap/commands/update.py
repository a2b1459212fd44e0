"""`vectorlay-bootstrap update`: what node-agent-update.timer runs. Fetch the signed manifest with
the node's durable identity, install what is newer, switch one agent at a time (drain, restart,
health check) and roll back one that does not come up. Output goes to the journal."""

from __future__ import annotations

from pathlib import Path

from bootstrap import resolve, vmprobe
from bootstrap.api import proxy_from_env
from bootstrap.discovery import discover
from bootstrap.errors import VectorlayError
from bootstrap.host import Host, open_host
from bootstrap.identity import Identity, load_identity
from bootstrap.lock import run_lock
from bootstrap.node_manifest import fetch_manifest, node_client, wanted
from bootstrap.settings import Settings, load_settings
from bootstrap.state import load_state, save_state
from bootstrap.update import Timing, agent_names, upgrade


def run_update(root: Path, *, host: Host | None = None) -> int:
    host = host or open_host(root)
    ident = load_identity(host)
    if ident is None:
        raise VectorlayError(
            "this node is not enrolled: there is nothing to update", "run the install one-liner"
        )
    settings = load_settings(host)
    api, mode = run_facts(host, settings, ident)
    with run_lock(host):
        client = node_client(ident, api, proxy=proxy_from_env(fallback=settings.proxy))
        try:
            state = load_state(host)
            manifest = fetch_manifest(client, ident, state)
            save_state(host, state)
            arts = wanted(host, manifest, agent_names(mode), _log)
            listed = ", ".join(f"{a.name} {a.version}" for a in arts)
            print(f"update: manifest {manifest.version} (serial {manifest.serial}): {listed}")
            report = upgrade(host, client, arts, Timing.default(), log=_log)
        finally:
            client.close()
        if mode == "passthrough":
            # A unit proven by no VM-attach probe is not advertised: the units of a node updated to a
            # release with the probe, and units whose devices changed, get theirs here (rented ones
            # are skipped untouched).
            vmprobe.probe_unproven(host, settings, _log)
    if report.rolled_back:
        for name, (bad, back) in report.rolled_back.items():
            print(f"update: FAILED: {name} {bad} did not pass its health check; running {back} again")
        return 1
    if report.upgraded:
        print("update: done: " + ", ".join(f"{n} {new}" for n, (_old, new) in report.upgraded.items()))
    else:
        print("update: everything is current")
    return 0


def run_facts(host: Host, settings: Settings, ident: Identity) -> tuple[str, str]:
    """This run's control plane URL and GPU mode, resolved once, in bootstrap.resolve's order."""
    mode = resolve.gpu_mode(
        settings.gpu_mode,
        recorded=lambda: resolve.recorded_gpu_mode(ident),
        has_gpus=lambda: bool(discover(host, settings).gpus),
    )
    return resolve.api_url(settings.api, ident), mode


def _log(message: str) -> None:
    print(f"update: {message}")
