"""Agent upgrades: switch, restart, check health, and roll back when the new version is sick.

Used by `vectorlay-bootstrap update` (what node-agent-update.timer runs) and by the install run's
artifacts stage. Health is what systemd says (the unit stays active through a settle window) and,
for an agent that serves one, its health socket (/run/vectorlay-<name>/health.sock answering `ok`).

Each agent is restarted the way its own program allows without harming the node's work (RESTART):

- node-agent (vectorlay's own) drains first: SIGUSR1 asks it to stop accepting and finish in-flight
  sessions; it announces the end by creating /run/vectorlay-node-agent/drained (and answering
  `drained`). The wait is bounded. Only the node-agent speaks this protocol.
- nebula is restarted (`systemctl restart`: SIGTERM, then the new binary). SIGHUP only reloads
  nebula's configuration, and an update changes the binary; the tunnels re-handshake within seconds
  (benchmarks/test_bench_nebula_restart.py measures it with the real nebula).
- nomad is restarted in place and never drained: an update must not stop a rented allocation.
  Nomad's upgrade guide (https://developer.hashicorp.com/nomad/docs/upgrade): "In Place: The Nomad
  binary can be updated on existing hosts. Running allocations will continue running
  uninterrupted." What would drain is a stop signal the client is configured to leave on
  (https://developer.hashicorp.com/nomad/docs/configuration#leave_on_interrupt: "If this value is
  set to true on a client agent and the client is configured with drain_on_shutdown, the client
  will drain its workloads before shutting down"). The node's client.hcl sets leave_on_interrupt
  (nomad.service's KillSignal=SIGINT, so `systemctl stop`, a shutdown and uninstall drain) and leaves
  leave_on_terminate at its default, false: on SIGTERM the agent "exit[s] after ensuring its internal
  state is committed to disk", the allocations keep running (KillMode=process leaves them to it).
  So the update sends SIGTERM to Nomad's main process only (`systemctl kill --kill-who=main`), the
  way the upgrade guide says to pick "the expected signal for your upgrade process", waits for it to
  exit, and starts the new binary, which re-attaches to the running allocations. Never
  `systemctl restart nomad`: its stop half is KillSignal=SIGINT, a drain. Never SIGUSR1 either: to
  Nomad that means "print its metrics"
  (https://developer.hashicorp.com/nomad/docs/deploy/nomad-agent#signal-handling).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bootstrap import artifacts
from bootstrap.host import Host
from bootstrap.manifest import Artifact
from bootstrap.paths import AGENT_SERVICES, SYSTEMD_BOOTED

SERVICES = AGENT_SERVICES

# How each agent moves to another release (see the module's docstring for why):
#   drain:    vectorlay's SIGUSR1 drain protocol, then `systemctl restart`
#   restart:  `systemctl restart`
#   in-place: the main process stopped with a signal it does not leave on, then started again
RESTART = {"node-agent": "drain", "nebula": "restart", "nomad": "in-place"}

# Artifacts that are no service of their own: runsc is docker's runtime in container-GPU mode.
CONTAINER_ONLY = ("runsc",)


def agent_names(gpu_mode: str) -> list[str]:
    """The artifacts a node in `gpu_mode` runs (bootstrap.resolve.gpu_mode: resolved by the caller)."""
    return [*SERVICES, *(CONTAINER_ONLY if gpu_mode == "container" else ())]


# How long a restarted unit must stay active before it counts as healthy, on a real box. hostsim
# shortens it for the trees it simulates, whose stand-in agents are healthy at once.
DEFAULT_SETTLE = 5.0


@dataclass
class Timing:
    settle: float = 5.0  # the unit must stay active this long after a restart
    healthy_timeout: float = 60.0
    drain_timeout: float = 120.0
    poll: float = 0.25
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic

    @classmethod
    def default(cls) -> Timing:
        """What the install run and `update` wait with: DEFAULT_SETTLE as it stands now."""
        return cls(settle=DEFAULT_SETTLE)


@dataclass
class UpdateReport:
    upgraded: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # name -> (old, new)
    rolled_back: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (bad, restored)
    unchanged: list[str] = field(default_factory=list)
    downloaded: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rolled_back


def health_socket(name: str) -> str:
    return f"/run/vectorlay-{name}/health.sock"


def probe(host: Host, name: str, timeout: float = 2.0) -> str | None:
    """The agent's own answer on its health socket (`ok ...`, `drained ...`), None when silent."""
    path = host.path(health_socket(name))
    if not path.exists():
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        data = s.recv(256)
    except OSError:
        return None
    finally:
        s.close()
    return data.decode(errors="replace").strip() or None


# What `systemctl is-system-running` says when no systemd manages the system (or none answered).
_NO_SYSTEMD = frozenset({"", "offline", "unknown"})


def services_really_run(host: Host) -> bool:
    """Whether a systemd runs the host's services, so that there is something to wait for.

    Booted with systemd when /run/systemd/system is a directory (systemd's own sd_booted() test,
    ansible's too). Otherwise what systemd itself says: a simulated one (hostsim) names its state, a
    tree whose commands are only recorded answers nothing, a box without systemd says "offline".
    """
    if host.path(SYSTEMD_BOOTED).is_dir():
        return True
    state = host.run(["systemctl", "is-system-running"], timeout=30).stdout.strip()
    return state not in _NO_SYSTEMD


def is_active(host: Host, unit: str) -> bool:
    return host.run(["systemctl", "is-active", "--quiet", unit], timeout=30).returncode == 0


def wait_healthy(host: Host, name: str, timing: Timing, needs_probe: bool) -> bool:
    """Active through the settle window and, where the agent serves one, answering `ok`."""
    if not services_really_run(host):
        return True
    unit = SERVICES[name]
    deadline = timing.monotonic() + timing.healthy_timeout
    active_since: float | None = None
    while timing.monotonic() < deadline:
        now = timing.monotonic()
        if not is_active(host, unit):
            active_since = None
            # A unit that failed outright will not recover by waiting (Restart= brings it back only
            # to fail again): give it one settle window, not the whole timeout.
            if now - (deadline - timing.healthy_timeout) > timing.settle:
                return False
        else:
            active_since = now if active_since is None else active_since
            answer = probe(host, name) if needs_probe else "ok"
            if answer is not None and answer.startswith("ok") and now - active_since >= timing.settle:
                return True
        timing.sleep(timing.poll)
    return False


def main_pid(host: Host, unit: str) -> int:
    """The main process systemd tracks for `unit`, 0 when there is none."""
    out = host.run(["systemctl", "show", "-p", "MainPID", "--value", unit], timeout=30).stdout.strip()
    return int(out) if out.isdigit() else 0


# The signal that stops Nomad without leaving: leave_on_terminate is false in client.hcl.
IN_PLACE_SIGNAL = "SIGTERM"


def restart_in_place(host: Host, unit: str, timing: Timing) -> None:
    """Stop the agent's main process with a signal it does not leave on, then start the new one.

    Nothing else in the unit is signalled, so the tasks it supervises run on and the next agent
    re-attaches to them. The unit's Restart=on-failure would bring the agent back by itself (Nomad
    exits 1 on a signal it does not leave on); `start` makes it now rather than after RestartSec, and
    is a no-op when systemd was quicker. `reset-failed` first: a unit that hit its start limit (a
    sick release now rolled back) refuses a plain start.
    """
    old = main_pid(host, unit) if services_really_run(host) else 0
    if old:
        host.run(["systemctl", "kill", "--kill-who=main", f"--signal={IN_PLACE_SIGNAL}", unit], timeout=30)
        deadline = timing.monotonic() + timing.healthy_timeout
        while main_pid(host, unit) == old and timing.monotonic() < deadline:
            timing.sleep(timing.poll)
    else:
        host.run(["systemctl", "reset-failed", unit], timeout=30)
    host.run(["systemctl", "start", unit], timeout=120)


def restart(host: Host, name: str, timing: Timing) -> None:
    """Bring agent `name` onto the release `current` points at (RESTART says how)."""
    if RESTART[name] == "in-place":
        restart_in_place(host, SERVICES[name], timing)
    else:
        host.run(["systemctl", "restart", SERVICES[name]], timeout=120)


def drain(host: Host, name: str, timing: Timing) -> bool:
    """Ask a running agent to drain; True once it says it has, False when the bounded wait ran out."""
    unit = SERVICES[name]
    if not services_really_run(host) or not is_active(host, unit):
        return True
    host.path(f"/run/vectorlay-{name}/drained").unlink(missing_ok=True)
    host.run(["systemctl", "kill", "--signal=SIGUSR1", unit], timeout=30)
    deadline = timing.monotonic() + timing.drain_timeout
    while timing.monotonic() < deadline:
        if host.path(f"/run/vectorlay-{name}/drained").exists():
            return True
        answer = probe(host, name)
        if answer is not None and answer.startswith("drained"):
            return True
        timing.sleep(timing.poll)
    return False


def switch(
    host: Host,
    arts: Iterable[Artifact],
    timing: Timing | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> UpdateReport:
    """Bring each agent, already installed and verified, to its version, one at a time: drain the
    node-agent, switch `current`, restart (nomad in place), check health, and roll back a version
    that is sick.
    An artifact without a service (runsc) is switched and used by the next container."""
    timing = timing or Timing()
    report = UpdateReport()
    order = list(SERVICES)
    # The overlay first, then the scheduler that listens on it, then the agent.
    for art in sorted(arts, key=lambda a: (order.index(a.name) if a.name in order else len(order), a.name)):
        name = art.name
        old = artifacts.current_version(host, name)
        if old == art.version:
            report.unchanged.append(name)
            continue
        if name not in SERVICES:
            artifacts.activate(host, name, art.version)
            artifacts.prune(host, name)
            report.upgraded[name] = (old, art.version)
            log(f"{name}: {old or 'none'} -> {art.version}")
            continue
        # node-agent is vectorlay's own and serves the health socket; nebula and nomad are judged
        # by systemd alone.
        needs_probe = name == "node-agent"
        if old is not None and RESTART[name] == "drain":
            drained = drain(host, name, timing)
            log(f"{name}: {'drained' if drained else 'drain timed out; switching anyway'}")
        artifacts.activate(host, name, art.version)
        restart(host, name, timing)
        if wait_healthy(host, name, timing, needs_probe):
            report.upgraded[name] = (old, art.version)
            artifacts.prune(host, name)
            log(f"{name}: {old or 'none'} -> {art.version}, healthy")
            continue
        if old is None:
            report.rolled_back[name] = (art.version, "none")
            log(f"{name}: {art.version} is not healthy and there is no earlier version to go back to")
            continue
        restored = artifacts.rollback(host, name)
        restart(host, name, timing)
        wait_healthy(host, name, timing, needs_probe)
        report.rolled_back[name] = (art.version, restored)
        log(f"{name}: {art.version} failed its health check; rolled back to {restored}")
    return report


def upgrade(
    host: Host,
    downloader: artifacts.Downloader,
    arts: Iterable[Artifact],
    timing: Timing | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> UpdateReport:
    """Download and verify what is missing, then `switch`."""
    arts = list(arts)
    downloaded = [a.name for a in arts if artifacts.install(host, downloader, a).downloaded]
    report = switch(host, arts, timing, log)
    report.downloaded = downloaded
    return report
