"""A renewal of a node's nebula certificate while traffic crosses the tunnel, with the real nebula.

Two namespaces joined by a bridge (tests/overlay/test_netns.py's helpers): the control plane's
lighthouse, from `overlay-host`, and a node installed by the real `vectorlay-bootstrap install`. A ping
runs from the lighthouse to the node while the node-agent's renewal switches the identity and tells
nebula to reload, as nebula.service's `ExecReload=/bin/kill -HUP $MAINPID` does. nebula re-reads
pki.cert and pki.key on SIGHUP and keeps its tunnels (slackhq/nebula pki.go: the reload callback
registered in NewPKIFromConfig swaps the certificate state, refusing only a certificate whose
networks changed). The ping loses at most a few packets; the node's nebula, never restarted, then
presents the new certificate (same IP, later expiry) to a peer that handshakes anew.

Needs root (namespaces) and Debian's nebula; .ci/run provides both.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from bootstrap.host import CommandResult, TreeHost
from bootstrap.identity import load_identity
from bootstrap.nebula import parse_certificate_pem
from bootstrap.overlay import NEBULA_CONFIG
from controlplane import cli as cp_cli
from hostsim.agents import publish_agents
from nodeagent.renewal import Renewer
from tests.overlay.test_netns import (
    NEBULA,
    Net,
    _attach,
    _installed_node,
    _pings,
    _wait_tun,
    net,  # noqa: F401 - the fixture
    pytestmark,  # noqa: F401 - the same requirements
    short_base,  # noqa: F401 - the fixture
)

PINGS = 100
INTERVAL = "0.1"


@dataclass
class NebulaUnit:
    """systemctl for nebula.service as systemd runs it here: active while the process lives, and
    `reload` is the unit's ExecReload (kill -HUP $MAINPID). Nomad is not running in this test."""

    proc: subprocess.Popen[bytes]
    executes: ClassVar[bool] = True
    commands: list[tuple[str, ...]] = field(default_factory=list)

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        cmd = tuple(argv)
        self.commands.append(cmd)
        running = self.proc.poll() is None
        if cmd[:1] == ("systemctl",) and cmd[-1] == "nebula.service":
            if cmd[1] == "is-active":
                return CommandResult(cmd, 0 if running else 3, "", "")
            if cmd[1] == "reload" and running:
                os.kill(self.proc.pid, signal.SIGHUP)
                return CommandResult(cmd, 0, "", "")
        if cmd[:2] == ("systemctl", "is-active"):
            return CommandResult(cmd, 3, "", "")
        return CommandResult(cmd, 1, "", f"unexpected command {cmd}")


def _fingerprints(log: str) -> list[str]:
    return re.findall(r"fingerprint=([0-9a-f]{64})", log)


def test_a_nebula_certificate_renewed_under_traffic_is_loaded_without_dropping_the_tunnel(
    net: Net,  # noqa: F811
    tmp_path: Path,
    short_base: Path,  # noqa: F811
    start_control_plane: Callable[..., Any],
) -> None:
    assert NEBULA is not None
    publish_agents(tmp_path / "artifacts")
    cp = start_control_plane(args=("--artifacts", str(tmp_path / "artifacts"), "--cert-days", "30"))
    lh_out = tmp_path / "lighthouse"
    with pytest.raises(SystemExit) as done:
        cp_cli.main(
            ["overlay-host", "--state-dir", str(cp.state_dir), "--name", "lighthouse", "--overlay-ip",
             "100.64.0.1", "--out", str(lh_out), "--lighthouse"]
        )  # fmt: skip
    assert done.value.code in (0, None)
    _attach(net, "lh", "192.0.2.1")
    _attach(net, "a", "192.0.2.2")
    org = cp.org("acme")
    root = _installed_node(short_base, cp, org, "192.0.2.1")
    ident = load_identity(TreeHost(root))
    assert ident is not None
    old_cert = parse_certificate_pem((ident.path / "nebula.crt").read_bytes())
    # nebula logs every handshake's peer certificate fingerprint: how we see which one is in use.
    for config in (lh_out / "config.yml", root / NEBULA_CONFIG.lstrip("/")):
        data = yaml.safe_load(config.read_text())
        assert data["logging"]["level"] == "info"

    lh_log, a_log = tmp_path / "nebula-lh.log", tmp_path / "nebula-a.log"
    lighthouse = net.start("lh", [NEBULA, "-config", str(lh_out / "config.yml")], lh_log)
    _wait_tun(net, "lh", "100.64.0.1", lighthouse)
    node = net.start("a", [NEBULA, "-config", str(root / NEBULA_CONFIG.lstrip("/"))], a_log)
    _wait_tun(net, "a", ident.overlay_ip, node)
    assert _pings(net, "lh", ident.overlay_ip, tries=10), net.logs()
    assert old_cert.fingerprint in _fingerprints(lh_log.read_text()), net.logs()

    ping = subprocess.Popen(
        ["ip", "netns", "exec", net.ns("lh"), "ping", "-n", "-q", "-i", INTERVAL, "-W", "1", "-c",
         str(PINGS), ident.overlay_ip],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        time.sleep(2)
        unit = NebulaUnit(node)
        new = Renewer(TreeHost(root, unit), lambda _i: str(cp.url)).renew()
        out, _ = ping.communicate(timeout=60)
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait()
    assert ("systemctl", "reload", "nebula.service") in unit.commands
    assert node.poll() is None, "nebula was restarted or died"
    sent, received = (int(n) for n in re.search(r"(\d+) packets transmitted, (\d+) received", out).groups())  # type: ignore[union-attr]
    print(out)  # the ping summary, for whoever runs this with -s
    assert sent == PINGS and sent - received <= 3, out

    new_cert = parse_certificate_pem((new.path / "nebula.crt").read_bytes())
    assert new_cert.ips == old_cert.ips and new_cert.fingerprint != old_cert.fingerprint
    assert new_cert.not_after >= old_cert.not_after and new_cert.public_key != old_cert.public_key
    # The node's nebula took the new certificate from disk on SIGHUP...
    deadline = time.monotonic() + 10
    while "refreshed from disk" not in a_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "refreshed from disk" in a_log.read_text(), net.logs()
    assert f"Fingerprint: {new_cert.fingerprint}" in a_log.read_text()
    # ...and presents it: the node's running nebula (same process, never restarted) handshakes with a
    # lighthouse started afresh, which sees the new certificate, not the old one.
    lighthouse.terminate()
    lighthouse.wait(timeout=10)
    lh_log2 = tmp_path / "nebula-lh2.log"
    lighthouse = net.start("lh", [NEBULA, "-config", str(lh_out / "config.yml")], lh_log2)
    _wait_tun(net, "lh", "100.64.0.1", lighthouse)
    assert _pings(net, "a", "100.64.0.1", tries=15), net.logs()
    seen = _fingerprints(lh_log2.read_text())
    assert new_cert.fingerprint in seen and old_cert.fingerprint not in seen, net.logs()
    assert node.poll() is None


def _cp_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_during_a_ca_rotation_nodes_on_the_old_and_the_new_nebula_ca_share_the_overlay(
    net: Net,  # noqa: F811
    tmp_path: Path,
    short_base: Path,  # noqa: F811
) -> None:
    """A node enrolled before `ca introduce` (old nebula CA) and one enrolled after (new CA) both
    reach a lighthouse set up during the overlap; the old node then renews under a running ping and
    moves to the new CA with its nebula reloaded, not restarted."""
    from controlplane import testing

    assert NEBULA is not None
    publish_agents(tmp_path / "artifacts")
    work = tmp_path / "cp"
    args = ("--artifacts", str(tmp_path / "artifacts"), "--cert-days", "30")
    _attach(net, "lh", "192.0.2.1")
    _attach(net, "a", "192.0.2.2")
    _attach(net, "b", "192.0.2.3")
    cp = testing.start(work, args=args)
    try:
        org = cp.org("acme")
        roots = {"a": _installed_node(short_base, cp, org, "192.0.2.1")}
    finally:
        testing.stop(cp)
    introduced = _cp_cli("ca", "introduce", "--state-dir", str(work / "state"))
    assert introduced.returncode == 0, introduced.stderr
    old_ca, new_ca = (json.loads(introduced.stdout)[k]["sha256"] for k in ("nebula_ca", "next_nebula_ca"))
    cp = testing.start(work, args=args)
    procs = {}
    try:
        roots["b"] = _installed_node(short_base, cp, org, "192.0.2.1")
        lh_out = tmp_path / "lighthouse"
        made = _cp_cli(
            "overlay-host", "--state-dir", str(cp.state_dir), "--name", "lighthouse", "--overlay-ip",
            "100.64.0.1", "--out", str(lh_out), "--lighthouse",
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        overlay = {"lh": "100.64.0.1"}
        for name, root in roots.items():
            ident = load_identity(TreeHost(root))
            assert ident is not None
            overlay[name] = ident.overlay_ip
        issuers = {
            name: parse_certificate_pem((root / "etc/vectorlay/identity/nebula.crt").read_bytes()).issuer
            for name, root in roots.items()
        }
        assert issuers == {"a": old_ca, "b": new_ca}
        configs = {
            "lh": lh_out / "config.yml",
            **{n: r / NEBULA_CONFIG.lstrip("/") for n, r in roots.items()},
        }
        for name in ("lh", "a", "b"):
            procs[name] = net.start(
                name, [NEBULA, "-config", str(configs[name])], tmp_path / f"nebula-{name}.log"
            )
            _wait_tun(net, name, overlay[name], procs[name])
        for name in ("a", "b"):
            assert _pings(net, name, overlay["lh"], tries=10), net.logs()
            assert _pings(net, "lh", overlay[name], tries=10), net.logs()

        # The old node's next renewal moves it to the new CA; nebula reloads certificate and CAs.
        ping = subprocess.Popen(
            ["ip", "netns", "exec", net.ns("lh"), "ping", "-n", "-q", "-i", INTERVAL, "-W", "1", "-c",
             str(PINGS), overlay["a"]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            time.sleep(2)
            Renewer(TreeHost(roots["a"], NebulaUnit(procs["a"])), lambda _i: str(cp.url)).renew()
            out, _ = ping.communicate(timeout=60)
        finally:
            if ping.poll() is None:
                ping.kill()
                ping.wait()
        print(out)  # the ping summary, for whoever runs this with -s
        found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert found is not None, out
        sent, received = int(found.group(1)), int(found.group(2))
        assert sent == PINGS and sent - received <= 3, out
        renewed = parse_certificate_pem((roots["a"] / "etc/vectorlay/identity/nebula.crt").read_bytes())
        assert renewed.issuer == new_ca and procs["a"].poll() is None
        assert _pings(net, "a", overlay["lh"], tries=5) and _pings(net, "b", overlay["lh"], tries=5)
    finally:
        testing.stop(cp)
