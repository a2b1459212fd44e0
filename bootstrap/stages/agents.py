"""Stage `agents`: nebula, nomad and node-agent units and configs from the enrollment, the update
timer, the settings file, and in container-GPU mode runsc registered with docker (nvproxy on).

Services are touched only when something of theirs changed: `daemon-reload` when a unit file did,
a restart of exactly the service whose unit or config changed, a start of one found stopped, and a
version switch (drain, switch, restart, health check, roll back) of the one whose binary changed.
A second run on an unchanged node writes nothing and restarts nothing.
"""

from __future__ import annotations

import json
from typing import Any

import jinja2

from bootstrap import artifacts, runsc
from bootstrap.api import Proxy
from bootstrap.discovery import Inventory, UnitStatus
from bootstrap.errors import VectorlayError
from bootstrap.host import Host
from bootstrap.identity import REENROLL_HINT, Identity, IdentityError, load_identity
from bootstrap.nebula import NebulaCertError, parse_certificate_pem
from bootstrap.overlay import NEBULA_CONFIG, TUN_DEVICE
from bootstrap.paths import AGENT_CONFIG, IDENTITY_DIR, SETTINGS_PATH, SYSTEMD_UNITS, UPDATE_TIMER
from bootstrap.plan import MARKER, Change, Command, FileChange, Removal, Switch, Symlink, compute
from bootstrap.plan import apply as plan_apply
from bootstrap.resources import units_dir
from bootstrap.settings import settings_yaml
from bootstrap.stages.artifacts import agent_names, gpu_mode_of
from bootstrap.stages.contract import Context, Facts, Outcome, StagePlan, StageResult
from bootstrap.stages.control_plane import proxy
from bootstrap.templating import render as render_template
from bootstrap.update import (
    IN_PLACE_SIGNAL,
    RESTART,
    SERVICES,
    Timing,
    is_active,
    services_really_run,
    switch,
)

UPDATE_SERVICE = "node-agent-update.service"
UNIT_FILES = (*SERVICES.values(), UPDATE_SERVICE, UPDATE_TIMER)
NOMAD_CONFIG = "/etc/vectorlay/nomad.d/client.hcl"
NOMAD_VFIO_DROPIN = f"{SYSTEMD_UNITS}/nomad.service.d/10-vectorlay-vfio.conf"
DOCKER_DAEMON = "/etc/docker/daemon.json"
# The proxy environment of nomad, the node-agent and the update service (their units name it as an
# optional EnvironmentFile): the node's https_proxy and no_proxy, with the overlay added to no_proxy.
PROXY_ENV = "/etc/vectorlay/proxy.env"
# What systemd's EnvironmentFile= would need quoting or escaping for: such values are refused.
_ENV_UNSAFE = set(" \t\"'\\$`#;") | {chr(c) for c in range(0x20)} | {"\x7f"}

CONFIGS = {
    "nebula": (NEBULA_CONFIG,),
    "nomad": (NOMAD_CONFIG, NOMAD_VFIO_DROPIN, PROXY_ENV),
    "node-agent": (AGENT_CONFIG, PROXY_ENV),
}


def unit_path(unit: str) -> str:
    return f"{SYSTEMD_UNITS}/{unit}"


def wants_path(unit: str) -> str:
    target = "timers.target" if unit.endswith(".timer") else "multi-user.target"
    return f"{SYSTEMD_UNITS}/{target}.wants/{unit}"


def _docker_daemon_json(host: Host) -> bytes:
    """Docker's daemon.json with runsc added as a runtime (nvproxy on); everything else kept."""
    text = host.read_text(DOCKER_DAEMON, default="")
    try:
        data: Any = json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise VectorlayError(
            f"{DOCKER_DAEMON} is not valid JSON ({e})", f"fix {DOCKER_DAEMON}, then re-run"
        ) from None
    if not isinstance(data, dict):
        raise VectorlayError(f"{DOCKER_DAEMON} must hold a JSON object", f"fix {DOCKER_DAEMON}, then re-run")
    runtimes = data.setdefault("runtimes", {})
    if not isinstance(runtimes, dict):
        raise VectorlayError(f"{DOCKER_DAEMON}: 'runtimes' must be an object", f"fix {DOCKER_DAEMON}")
    runtimes[runsc.RUNTIME_NAME] = runsc.docker_runtime()
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _gpu_meta(inv: Inventory | None, mode: str) -> dict[str, str]:
    units = inv.units if inv is not None else []
    ready = [u for u in units if u.status is UnitStatus.READY]
    meta = {"vectorlay_gpu_mode": mode, "vectorlay_gpu_units_total": str(len(units))}
    if mode == "passthrough":
        meta["vectorlay_gpu_units_ready"] = str(len(ready))
        meta["vectorlay_gpu_units"] = ",".join(u.iommu_group or "" for u in ready)
        meta["vectorlay_gpu_addresses"] = ";".join(",".join(u.gpus) for u in ready)
    elif mode == "container" and inv is not None:
        meta["vectorlay_gpus"] = ",".join(g.address for g in inv.gpus)
    return meta


def _agent_yaml(common: dict[str, Any]) -> bytes:
    """node-agent.yaml, serialised by yaml.safe_dump: values from the enrollment answer and the
    settings cannot break the file or add keys to it."""
    import yaml

    d = common["identity_dir"]
    data = {
        "api": common["api"],
        "node_id": common["node_id"],
        "org_id": common["org_id"],
        "overlay_ip": common["overlay_ip"],
        "gpu_mode": common["gpu_mode"],
        "identity": {
            "certificate": f"{d}/node.crt",
            "key": f"{d}/node.key",
            "ca": f"{d}/ca.crt",
            "token_file": f"{d}/node-token",
        },
        "health": {"listen": "127.0.0.1:9181"},
    }
    header = f"{MARKER}\n# Rewritten from the enrollment on every install run.\n"
    return (header + yaml.safe_dump(data, sort_keys=False, width=4096)).encode()


def overlay_network(ident: Identity) -> str:
    """The overlay's network, as the node's nebula certificate gives it (e.g. 100.64.0.0/10)."""
    try:
        cert = parse_certificate_pem((ident.path / "nebula.crt").read_bytes())
    except (OSError, NebulaCertError) as e:
        raise IdentityError(f"{IDENTITY_DIR}/nebula.crt cannot be read: {e}", REENROLL_HINT) from None
    if not cert.ips:
        raise IdentityError(f"{IDENTITY_DIR}/nebula.crt names no overlay IP", REENROLL_HINT)
    return str(cert.ips[0].network)


def proxy_env(proxy: Proxy | None, overlay: str) -> bytes | None:
    """The agents' proxy environment: https_proxy and no_proxy exactly as the run has them, the
    overlay added to no_proxy (overlay traffic never goes through a proxy); None without a proxy."""
    if proxy is None:
        return None
    no_proxy = ",".join(x for x in (proxy.no_proxy.strip().strip(","), overlay) if x)
    for name, value in (("https_proxy", proxy.given), ("no_proxy", no_proxy)):
        bad = sorted({repr(c) for c in value if c in _ENV_UNSAFE})
        if bad:
            raise VectorlayError(
                f"{name} contains {', '.join(bad)}, which the agents' systemd environment cannot hold",
                f"set {name} without white space, quotes, backslashes, $, #, ; or control characters",
            )
    lines = [
        MARKER,
        "# The proxy of the node's HTTPS, for nomad, the node-agent and its updates; the overlay's",
        "# network is in no_proxy. Re-running the install one-liner rewrites this file.",
        *(f"{k}={proxy.given}" for k in ("https_proxy", "HTTPS_PROXY")),
        *(f"{k}={no_proxy}" for k in ("no_proxy", "NO_PROXY")),
    ]
    return ("\n".join(lines) + "\n").encode()


def desired(ctx: Context, ident: Identity, mode: str, facts: Facts | None = None) -> list[Change]:
    try:
        return _desired(ctx, ident, mode, facts or Facts())
    except (TypeError, AttributeError, ValueError, jinja2.TemplateError) as e:
        # The configs are rendered from the enrollment answer saved on disk: a damaged one (a list
        # where an object belongs, a number for a list of servers) is the identity's fault.
        raise IdentityError(
            f"{IDENTITY_DIR}/enrollment.json holds nebula/nomad settings of the wrong shape ({e})",
            REENROLL_HINT,
        ) from None


def _desired(ctx: Context, ident: Identity, mode: str, facts: Facts) -> list[Change]:
    host, settings = ctx.host, ctx.settings
    enrollment = ident.enrollment()
    nebula = enrollment.get("nebula") or {}
    nomad = enrollment.get("nomad") or {}
    common = {
        "identity_dir": IDENTITY_DIR,
        "node_id": ident.node_id,
        "org_id": ident.org_id,
        "overlay_ip": ident.overlay_ip,
        "gpu_mode": mode,
        "api": ident.api or ctx.api or settings.api,
        "disk_path": settings.disk_path,
    }
    changes: list[Change] = [
        FileChange(SETTINGS_PATH, settings_yaml(settings, api=common["api"], gpu_mode=mode)),
        FileChange(
            NEBULA_CONFIG,
            render_template("nebula-config.yml.j2", nebula=nebula, tun_device=TUN_DEVICE, **common).encode(),
            mode=0o600,
        ),
        FileChange(
            NOMAD_CONFIG,
            render_template(
                "nomad-client.hcl.j2",
                # The TLS material is in the identity dir's files; the config only names them.
                nomad={
                    **{k: v for k, v in nomad.items() if k not in ("certificate_pem", "ca_pem")},
                    "region": nomad.get("region") or "global",
                    "datacenter": nomad.get("datacenter") or "vectorlay",
                    "node_class": nomad.get("node_class") or mode,
                    "servers": nomad.get("servers") or [],
                    "meta": {**(nomad.get("meta") or {}), **_gpu_meta(facts.inventory, mode)},
                },
                **common,
            ).encode(),
            mode=0o600,
        ),
        FileChange(AGENT_CONFIG, _agent_yaml(common), mode=0o600),
    ]
    via = proxy(ctx)
    env = proxy_env(via, overlay_network(ident)) if via is not None else None
    # 0600: an authenticating proxy's URL holds its password.
    changes.append(FileChange(PROXY_ENV, env, mode=0o600) if env is not None else Removal(PROXY_ENV))
    for unit in UNIT_FILES:
        changes.append(FileChange(unit_path(unit), (units_dir() / unit).read_bytes()))
    if mode == "passthrough":
        changes.append(FileChange(NOMAD_VFIO_DROPIN, render_template("nomad-vfio.conf.j2").encode()))
    else:
        changes.append(Removal(NOMAD_VFIO_DROPIN))
    if mode == "container":
        changes.append(FileChange(DOCKER_DAEMON, _docker_daemon_json(host)))

    # Enabling is what `systemctl enable` does: a link in the target's .wants/ directory.
    for unit in SERVICES.values():
        changes.append(Symlink(wants_path(unit), unit_path(unit)))
    if settings.autoupdate:
        changes.append(Symlink(wants_path(UPDATE_TIMER), unit_path(UPDATE_TIMER)))
    else:
        changes.append(Removal(wants_path(UPDATE_TIMER)))

    unit_files = (*(unit_path(u) for u in UNIT_FILES), NOMAD_VFIO_DROPIN)
    links = tuple(wants_path(u) for u in (*SERVICES.values(), UPDATE_TIMER))
    changes.append(Command(("systemctl", "daemon-reload"), after=unit_files + links))
    if mode == "container":
        changes.append(Command(("systemctl", "reload-or-restart", "docker.service"), after=(DOCKER_DAEMON,)))

    # Agents whose binary changes are restarted by the version switch after this plan, with drain
    # and health check; the others are restarted here when their unit or config changed, and
    # started when found stopped.
    switching = {n for n, art in facts.targets.items() if artifacts.current_version(host, n) != art.version}
    for name, unit in SERVICES.items():
        if name in switching:
            continue
        triggers = (unit_path(unit), *CONFIGS[name])
        if services_really_run(host) and not is_active(host, unit):
            changes.append(Command(("systemctl", "start", unit), force=True, reason=f"{unit} is not running"))
        elif RESTART[name] == "in-place":
            # Never `systemctl restart nomad`, whose KillSignal=SIGINT drains the node: the agent
            # alone exits on IN_PLACE_SIGNAL and comes back on the new config, re-attached to the
            # running allocations (bootstrap.update says why). Restart=on-failure starts it again
            # when `start` came too early to see it gone.
            changes.append(
                Command(
                    ("systemctl", "kill", "--kill-who=main", f"--signal={IN_PLACE_SIGNAL}", unit),
                    after=triggers,
                )
            )
            changes.append(Command(("systemctl", "start", unit), after=triggers))
        else:
            changes.append(Command(("systemctl", "restart", unit), after=triggers))
    if settings.autoupdate:
        if services_really_run(host) and not is_active(host, UPDATE_TIMER):
            changes.append(
                Command(
                    ("systemctl", "start", UPDATE_TIMER), force=True, reason=f"{UPDATE_TIMER} is not running"
                )
            )
    elif services_really_run(host) and is_active(host, UPDATE_TIMER):
        changes.append(
            Command(("systemctl", "stop", UPDATE_TIMER), force=True, reason="auto-update opted out")
        )
    return changes


def owned_changes(host: Host) -> list[Change]:
    """What `uninstall` undoes of this stage. The identity and the releases stay, so that a later
    install keeps the node's ID; decommissioning is a separate, deliberate step."""
    installed = [u for u in UNIT_FILES if host.exists(unit_path(u))]
    changes: list[Change] = []
    if installed:
        changes.append(Command(("systemctl", "stop", *installed), force=True, reason="stop the agents"))
    changes += [Removal(wants_path(u)) for u in (*SERVICES.values(), UPDATE_TIMER)]
    changes += [Removal(unit_path(u)) for u in UNIT_FILES]
    changes += [
        Removal(p)
        for p in (NOMAD_VFIO_DROPIN, NEBULA_CONFIG, NOMAD_CONFIG, AGENT_CONFIG, SETTINGS_PATH, PROXY_ENV)
    ]
    changes.append(Command(("systemctl", "daemon-reload"), after=tuple(unit_path(u) for u in UNIT_FILES)))
    return changes


def plan(ctx: Context, facts: Facts) -> StagePlan[Identity]:
    host = ctx.host
    ident = facts.identity if facts.identity is not None else load_identity(host)
    mode = gpu_mode_of(ctx, facts)
    if ident is None:
        ctx.out("agents: not enrolled yet; the agents are configured after enrollment")
        # Their units and configs are rendered from the enrollment answer; what is known now is
        # that each agent goes from nothing to the version the manifest will offer.
        switches = [Switch(n, artifacts.current_version(host, n), None) for n in agent_names(mode)]
        changes = compute(host, switches if facts.would_enroll else [])
        return StagePlan(facts, StageResult(Outcome.PLANNED, "not enrolled"), changes)
    switches = [Switch(n, artifacts.current_version(host, n), a.version) for n, a in facts.targets.items()]
    changes = compute(host, [*desired(ctx, ident, mode, facts), *switches], ctx.state)
    ctx.out(
        f"agents: nebula, nomad, node-agent ({mode} mode; "
        f"auto-update {'on' if ctx.settings.autoupdate else 'off'})"
    )
    return StagePlan(facts, StageResult(Outcome.PLANNED), changes, carry=ident)


def apply(ctx: Context, sp: StagePlan[Identity]) -> tuple[StageResult, Facts]:
    host = ctx.host
    if sp.carry is None:
        return StageResult(Outcome.OK, sp.planned.message), sp.facts
    pending = [
        sp.facts.targets[i.change.name] for i in sp.plan.actions if i.changed and isinstance(i.change, Switch)
    ]
    for art in pending:
        old = artifacts.current_version(host, art.name)
        ctx.out(f"agents: switching {art.name} {old or '(none)'} -> {art.version}")
    plan_apply(
        host, sp.plan.without_actions(), log=lambda m: ctx.out(f"  {m}"), state=ctx.state, persist=ctx.persist
    )
    report = switch(host, pending, Timing.default(), log=lambda m: ctx.out(f"  {m}"))
    if report.rolled_back:
        bad = ", ".join(f"{n} {b} (back on {r})" for n, (b, r) in report.rolled_back.items())
        raise VectorlayError(
            f"agent update failed its health check and was rolled back: {bad}",
            "re-run later; journalctl -u node-agent shows why the new version did not come up",
        )
    return StageResult(Outcome.OK, f"{len(report.upgraded)} agent(s) switched"), sp.facts
