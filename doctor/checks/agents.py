"""The agents' systemd units: installed and running, and the auto-update timer."""

from __future__ import annotations

from bootstrap.paths import AGENT_SERVICES, SYSTEMD_UNITS, UPDATE_TIMER
from doctor.checks.registry import INSTALL, NO_SYSTEMD, REINSTALL, Context, check, systemctl_states
from doctor.model import CheckResult, Status

AGENTS = tuple(AGENT_SERVICES.values())


@check("agents", "Agents")
def check_agents(ctx: Context, name: str) -> CheckResult:
    present = [u for u in AGENTS if ctx.host.path(f"{SYSTEMD_UNITS}/{u}").exists()]
    if not present:
        return CheckResult(name, Status.FAIL, "vectorlay agents are not installed", INSTALL)
    missing = [u for u in AGENTS if u not in present]
    if missing:
        return CheckResult(name, Status.FAIL, f"unit(s) missing: {', '.join(missing)}", REINSTALL)
    states, why = systemctl_states(ctx, "is-active", AGENTS)
    if not states and not ctx.host.runs_commands:
        return CheckResult(name, Status.SKIP, NO_SYSTEMD.format("whether the agents are active"))
    if not states:
        return CheckResult(
            name,
            Status.FAIL,
            f"cannot ask systemd about the agents: {why}",
            "run the doctor on the node itself, booted with systemd",
        )
    down = [u for u in AGENTS if states[u] != "active"]
    if down:
        what = ", ".join(f"{u.removesuffix('.service')} is {states[u]}" for u in down)
        names = " ".join(u.removesuffix(".service") for u in down)
        return CheckResult(
            name,
            Status.FAIL,
            what,
            f"sudo systemctl restart {names}; if it fails again: journalctl -u {down[0]} -n 50",
        )
    return CheckResult(name, Status.PASS, "nebula, nomad and node-agent active")


@check("autoupdate", "Auto-update")
def check_autoupdate(ctx: Context, name: str) -> CheckResult:
    if not ctx.settings.autoupdate:
        return CheckResult(
            name,
            Status.WARN,
            "auto-update opted out (NODE_AGENT_AUTOUPDATE=0): node-agent will not update itself",
            "to turn it back on, re-run the install one-liner without NODE_AGENT_AUTOUPDATE=0",
        )
    if not ctx.host.path(f"{SYSTEMD_UNITS}/{UPDATE_TIMER}").exists():
        if not any(ctx.host.path(f"{SYSTEMD_UNITS}/{u}").exists() for u in AGENTS):
            return CheckResult(name, Status.SKIP, "agents not installed", INSTALL)
        return CheckResult(name, Status.FAIL, f"{UPDATE_TIMER} is not installed", REINSTALL)
    states, why = systemctl_states(ctx, "is-enabled", [UPDATE_TIMER])
    state = states.get(UPDATE_TIMER)
    if state is None and not ctx.host.runs_commands:
        return CheckResult(name, Status.SKIP, NO_SYSTEMD.format(f"whether {UPDATE_TIMER} is enabled"))
    if state is None:
        return CheckResult(
            name,
            Status.FAIL,
            f"cannot ask systemd about {UPDATE_TIMER}: {why}",
            "run the doctor on the node itself, booted with systemd",
        )
    if state != "enabled":
        return CheckResult(
            name,
            Status.WARN,
            f"auto-update is off: {UPDATE_TIMER} is {state}",
            f"to turn it back on: sudo systemctl enable --now {UPDATE_TIMER}",
        )
    return CheckResult(name, Status.PASS, f"{UPDATE_TIMER} enabled")
