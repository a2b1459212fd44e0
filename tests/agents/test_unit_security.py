"""How exposed each shipped service is, as `systemd-analyze security --offline=true` rates the unit
files a node gets (rendered by the agents stage, drop-ins included, under a tree given as --root).
Each score must stay at or under its bound: the node-agent is network-facing and sandboxed, the
update service as far as replacing binaries allows, and the bind service and nomad keep the root
they need (their unit files say what and why). For scale: Debian's prometheus.service rates 4.0.
The bounds and scores are in docs/operating.md ("Least privilege")."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from bootstrap.identity import load_identity
from bootstrap.plan import FileChange
from bootstrap.resources import units_dir
from bootstrap.settings import Settings
from bootstrap.stages.agents import desired
from bootstrap.stages.contract import Context
from bootstrap.stages.gpu import UNIT_NAME as BIND_SERVICE
from bootstrap.state import RunState
from tests.hardening.helpers import enrolled_host

BOUNDS = {
    # /dev/kmsg with CAP_SYSLOG for the watcher (0.3 of it): docs/operating.md says why.
    "node-agent.service": 2.8,
    "node-agent-update.service": 2.5,
    "vectorlay-vfio-bind.service": 6.5,
    "nebula.service": 7.0,
    "nomad.service": 9.6,
}
_SCORE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d)")


def _rendered(tmp_path: Path) -> Path:
    """A tree holding /etc/systemd/system as a passthrough node's install writes it."""
    host = enrolled_host(
        tmp_path / "node",
        {"nebula": {"lighthouses": [], "groups": []}, "nomad": {"region": "global", "servers": []}},
    )
    ident = load_identity(host)
    assert ident is not None
    ctx = Context(host=host, settings=Settings(), state=RunState(), out=lambda _m: None)
    for change in desired(ctx, ident, "passthrough"):
        if isinstance(change, FileChange) and change.path.startswith("/etc/systemd/system/"):
            target = host.path(change.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(change.content)
    # The gpu stage writes the bind service as shipped (tests/test_gpu_stage.py holds it to that).
    host.path(f"/etc/systemd/system/{BIND_SERVICE}").write_bytes((units_dir() / BIND_SERVICE).read_bytes())
    return host.root


def test_every_shipped_service_is_rated_and_within_its_bound(tmp_path: Path) -> None:
    shipped = sorted(p.name for p in units_dir().glob("*.service"))
    assert shipped == sorted(BOUNDS)
    root = _rendered(tmp_path)
    assert sorted(p.name for p in (root / "etc/systemd/system").glob("*.service")) == shipped
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", f"--root={root}", "--no-pager", *shipped],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    scores = {unit: float(score) for unit, score in _SCORE.findall(res.stdout + res.stderr)}
    assert sorted(scores) == shipped, res.stdout[-2000:] + res.stderr
    over = {u: (s, BOUNDS[u]) for u, s in scores.items() if s > BOUNDS[u]}
    assert over == {}
    # What the sandbox of the network-facing agent must keep holding, whatever the score.
    agent = (root / "etc/systemd/system/node-agent.service").read_text()
    for line in (
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "SystemCallFilter=@system-service",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/kvm rw",
        "DeviceAllow=char-vfio rw",
        "DeviceAllow=/dev/kmsg r",
    ):
        assert line in agent.splitlines(), line


def test_the_agents_sandbox_lets_it_write_its_state_and_read_the_kernel_log() -> None:
    # ProtectSystem=strict makes every path read-only but the ones the unit names: a file the agent
    # writes elsewhere fails with EROFS on a real node only (host trees have no sandbox), and the
    # heartbeat that writes it fails with it.
    from bootstrap.paths import UNIT_HEALTH_STATE
    from nodeagent.renewal import RELOADED_FILE
    from nodeagent.watch import KMSG

    lines = (units_dir() / "node-agent.service").read_text().splitlines()
    values: dict[str, list[str]] = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            values.setdefault(key, []).extend(value.split())
    writable = [
        *values["ReadWritePaths"],
        *(f"/var/lib/{d}" for d in values["StateDirectory"]),
        *(f"/run/{d}" for d in values["RuntimeDirectory"]),
    ]
    for path in (UNIT_HEALTH_STATE, RELOADED_FILE):
        assert any(path.startswith(w.rstrip("/") + "/") for w in writable), (path, writable)
    # The watcher's /dev/kmsg (systemd.exec(5): ProtectKernelLogs=yes makes it inaccessible; the
    # kernel wants CAP_SYSLOG to read it when kernel.dmesg_restrict is 1).
    assert values.get("ProtectKernelLogs", ["no"]) == ["no"]
    assert "CAP_SYSLOG" in values["CapabilityBoundingSet"]
    assert f"DeviceAllow={KMSG} r" in lines
