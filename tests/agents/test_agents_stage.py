"""The artifacts and agents stages against the real reference control plane serving real tarballs:
install, re-run without downloads or restarts, upgrade, tampered artifact, tampered signature,
rolled-back upgrade, auto-update opt-out, and systemd-analyze on what was written."""

from __future__ import annotations

import configparser
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from bootstrap import artifacts, update
from bootstrap.commands.runner import step
from bootstrap.errors import VectorlayError
from bootstrap.host import Host, RecordingRunner, TreeHost
from bootstrap.settings import load_settings
from bootstrap.stages.contract import Context, Facts
from bootstrap.stages.registry import BY_NAME
from bootstrap.state import load_state
from bootstrap.update import probe
from hostsim import build_host, inject, load_topology
from hostsim.agents import agent_tarball, publish, publish_agents
from hostsim.nomad_standin import kill_tasks, place, running_tasks
from hostsim.snapshot import snapshot
from hostsim.systemd import Systemd, active_state, enabled_state, install

pytestmark = pytest.mark.slow

VERSIONS = {"nebula": "1.9.5", "nomad": "1.8.4", "node-agent": "1.0.0"}


@dataclass
class Node:
    root: Path
    cp: Any
    art_dir: Path
    sim: Systemd

    def host(self) -> Host:
        return TreeHost(self.root, install(RecordingRunner(), self.sim))

    def run_stages(self, *, plan_only: bool = False, env: dict[str, str] | None = None) -> tuple[Host, str]:
        host = self.host()
        out = io.StringIO()
        old = dict(os.environ)
        os.environ.update(env or {})
        try:
            ctx = Context(
                host=host,
                settings=load_settings(host),
                state=load_state(host),
                api=self.cp.url,
                ca_file=self.cp.ca_file,
                out=lambda line: print(line, file=out),
            )
            facts = Facts()
            for name in ("artifacts", "agents"):
                _result, facts = step(ctx, BY_NAME[name], facts, plan_only)
        finally:
            os.environ.clear()
            os.environ.update(old)
        return host, out.getvalue()


@pytest.fixture
def node(
    start_control_plane: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Node]:
    monkeypatch.setattr(update, "DEFAULT_SETTLE", 0.3)
    art_dir = tmp_path / "artifacts"
    publish_agents(art_dir, VERSIONS)
    cp = start_control_plane(args=("--artifacts", str(art_dir)))
    cp.org("acme", provider=True)
    # Unix socket paths (the agents' health sockets) are limited to 108 bytes: a short root.
    base = Path(tempfile.mkdtemp(prefix="vl", dir="/tmp"))
    root = build_host(base / "r", load_topology("cpu-only"))
    res = cp.enroll(root, "acme")
    assert res.returncode == 0, res.stderr
    n = Node(root, cp, art_dir, Systemd(spawn=True))
    try:
        yield n
    finally:
        n.sim.stop_all(n.host())
        shutil.rmtree(base)


def _snapshot(root: Path) -> dict[str, tuple[str, int, int, str]]:
    # /run is a tmpfs on a real box (daemons' sockets, the simulator's unit states); /proc is the kernel's.
    return snapshot(root, skip=("run", "proc"))


def test_install_writes_units_and_configs_and_starts_the_agents(node: Node) -> None:
    host, out = node.run_stages()
    for name, version in VERSIONS.items():
        assert artifacts.current_version(host, name) == version
        unit = f"{name}.service"
        assert active_state(host, unit) == "active", out
        assert enabled_state(host, unit) == "enabled"
    assert enabled_state(host, "node-agent-update.timer") == "enabled"
    assert (probe(host, "node-agent") or "").startswith("ok node-agent 1.0.0")
    hcl = host.read_text("/etc/vectorlay/nomad.d/client.hcl")
    node_id = json.loads(host.read_text("/etc/vectorlay/identity/node.json"))["node_id"]
    assert f'name       = "{node_id}"' in hcl
    assert 'plugin "qemu"' in hcl and 'plugin "docker"' not in hcl  # CPU VMs run under QEMU
    assert '"vectorlay_gpu_mode" = "none"' in hcl
    assert host.path("/etc/vectorlay/nomad.d/client.hcl").stat().st_mode & 0o777 == 0o600
    nebula = yaml.safe_load(host.read_text("/etc/vectorlay/nebula/config.yml"))
    assert nebula["lighthouse"]["am_lighthouse"] is False
    assert nebula["pki"]["key"] == "/etc/vectorlay/identity/nebula.key"
    assert nebula["lighthouse"]["hosts"] == list(nebula["static_host_map"]) == ["100.64.0.1"]
    assert host.read_text("/etc/vectorlay/node.yaml").startswith("# Managed by vectorlay-bootstrap")
    assert not host.exists("/etc/systemd/system/nomad.service.d/10-vectorlay-vfio.conf")  # not passthrough


def test_a_second_install_downloads_nothing_writes_nothing_and_restarts_nothing(node: Node) -> None:
    node.run_stages()
    before = _snapshot(node.root)
    host, out = node.run_stages()
    assert _snapshot(node.root) == before
    runner = host.runner
    assert isinstance(runner, RecordingRunner)
    queries = {("systemctl", "is-active"), ("systemctl", "is-system-running")}
    changing = [c for c in runner.commands if c[:2] not in queries]
    assert changing == [], out
    assert "downloaded" not in out
    assert "present and verified" in out


def test_an_upgrade_switches_only_the_agent_whose_binary_changed(node: Node) -> None:
    node.run_stages()
    publish(node.art_dir, "node-agent", "1.1.0", agent_tarball("node-agent", "1.1.0"))
    host, out = node.run_stages()
    assert artifacts.current_version(host, "node-agent") == "1.1.0"
    assert artifacts.previous_version(host, "node-agent") == "1.0.0"
    assert (probe(host, "node-agent") or "").startswith("ok node-agent 1.1.0")
    runner = host.runner
    assert isinstance(runner, RecordingRunner)
    restarts = [c for c in runner.commands if c[1:2] in (("restart",), ("start",))]
    assert restarts == [("systemctl", "restart", "node-agent.service")], out
    assert "node-agent: drained" in out


def test_an_install_run_that_rewrites_nomads_config_restarts_it_in_place_and_keeps_its_allocations(
    node: Node,
) -> None:
    host, _ = node.run_stages()
    root = str(node.root)
    try:
        pids = {a: place(root, "/var/lib/vectorlay/nomad", a) for a in ("vm-a", "vm-b")}
        # The config drifted (an operator's edit): the run rewrites it and must bring nomad onto it.
        config = host.path("/etc/vectorlay/nomad.d/client.hcl")
        config.write_text(config.read_text() + "\n# edited by hand\n")
        host, out = node.run_stages()
        runner = host.runner
        assert isinstance(runner, RecordingRunner)
        nomad = [c for c in runner.commands if "nomad.service" in c and c[1] not in ("is-active", "show")]
        assert nomad == [
            ("systemctl", "kill", "--kill-who=main", "--signal=SIGTERM", "nomad.service"),
            ("systemctl", "start", "nomad.service"),
        ], out
        # The `start` may come while the old agent is still on its way out (a no-op then): its exit
        # status 1 is a failure, and Restart=on-failure starts the new one, as on a real box.
        log_path = host.path("/run/hostsim/systemd/nomad.service.log")
        deadline = time.monotonic() + 20
        while log_path.read_text().count("client started") < 2:
            assert time.monotonic() < deadline, log_path.read_text()
            host.run(["systemctl", "is-active", "nomad.service"])
            time.sleep(0.05)
        log = log_path.read_text()
        assert "caught SIGTERM; exiting without leaving" in log and "drain" not in log
        assert all(f"alloc {a}: re-attached to pid {p}" in log for a, p in pids.items()), log
        assert running_tasks(root) == pids
    finally:
        kill_tasks(root)


def test_an_upgrade_that_fails_its_health_check_is_rolled_back(node: Node) -> None:
    node.run_stages()
    publish(node.art_dir, "node-agent", "2.0.0", agent_tarball("node-agent", "2.0.0", broken=True))
    with pytest.raises(VectorlayError, match=re.escape("rolled back: node-agent 2.0.0 (back on 1.0.0)")):
        node.run_stages()
    host = node.host()
    assert artifacts.current_version(host, "node-agent") == "1.0.0"
    assert active_state(host, "node-agent.service") == "active"
    assert (probe(host, "node-agent") or "").startswith("ok node-agent 1.0.0")


def test_a_tampered_artifact_is_refused_and_the_running_version_is_untouched(node: Node) -> None:
    node.run_stages()
    good = publish(node.art_dir, "nomad", "1.9.0", agent_tarball("nomad", "1.9.0"))
    node.run_stages()  # 1.9.0 installed and running
    bad = publish(node.art_dir, "nomad", "1.10.0", agent_tarball("nomad", "1.10.0"))
    # The control plane signs the genuine bytes' hash, then the file on its disk is swapped for one
    # of the same size and time (a corrupted mirror): what is served no longer matches the signature.
    requests.get(node.cp.url + "/v1/artifacts/manifest", verify=str(node.cp.ca_file), timeout=30)
    st = bad.path.stat()
    data = bytearray(bad.path.read_bytes())
    data[-10] ^= 0xFF
    bad.path.write_bytes(bytes(data))
    os.utime(bad.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(VectorlayError) as e:
        node.run_stages()
    assert e.value.message.startswith("checksum mismatch / 502 ARTIFACT: nomad 1.10.0")
    host = node.host()
    assert artifacts.current_version(host, "nomad") == good.version
    assert active_state(host, "nomad.service") == "active"
    assert not host.exists("/opt/vectorlay/releases/nomad/1.10.0")


def test_a_manifest_signed_by_another_key_is_refused(node: Node) -> None:
    node.run_stages()
    before = _snapshot(node.root)
    # Another control plane key: the node pinned the first one at enrollment.
    (node.cp.state_dir / "manifest-signing.key").unlink()
    from controlplane import testing

    testing.stop(node.cp)
    node.cp = testing.start(node.cp.db_path.parent, args=("--artifacts", str(node.art_dir)))
    try:
        with pytest.raises(VectorlayError, match="does not carry a valid signature of the pinned key"):
            node.run_stages()
    finally:
        testing.stop(node.cp)  # started here, so not the fixture's to stop
    assert _snapshot(node.root) == before


def test_opting_out_of_auto_update_disables_the_timer_and_re_runs_keep_that_choice(node: Node) -> None:
    node.run_stages()
    host, _ = node.run_stages(env={"NODE_AGENT_AUTOUPDATE": "0"})
    assert enabled_state(host, "node-agent-update.timer") == "disabled"
    assert active_state(host, "node-agent-update.timer") == "inactive"
    assert "autoupdate: false" in host.read_text("/etc/vectorlay/node.yaml")
    host, _ = node.run_stages()  # no NODE_AGENT_AUTOUPDATE this time: node.yaml remembers
    assert enabled_state(host, "node-agent-update.timer") == "disabled"
    runner = host.runner
    assert isinstance(runner, RecordingRunner)
    assert not [c for c in runner.commands if c[1:2] in (("restart",), ("start",))]


def test_plan_only_shows_the_changes_and_writes_nothing(node: Node) -> None:
    before = _snapshot(node.root)
    _host, out = node.run_stages(plan_only=True)
    assert _snapshot(node.root) == before
    for name, version in VERSIONS.items():
        assert re.search(
            rf"^  changed  fetch +{name} {re.escape(version)} \(\d+ bytes, sha256 ", out, re.M
        ), name
        assert re.search(rf"^  changed  switch +{name} none -> {re.escape(version)}$", out, re.M), name
    # Each new unit is listed as a change and shown as a diff against nothing (unified diff headers).
    for unit in ("nebula.service", "nomad.service", "node-agent.service", "node-agent-update.timer"):
        path = f"/etc/systemd/system/{unit}"
        assert re.search(rf"^  changed  file +{re.escape(path)} \(0644\)  \[create\]$", out, re.M), unit
        assert f"--- /dev/null\n    +++ b{path}\n" in out, unit
    assert re.search(r"^  changed  run +systemctl daemon-reload ", out, re.M)


def test_every_unit_passes_systemd_analyze_verify_and_the_timer_fires_hourly_with_jitter(node: Node) -> None:
    host, _ = node.run_stages()
    shutil.copytree("/usr/lib/systemd/system", node.root / "usr/lib/systemd/system", symlinks=True)
    venv = node.root / "opt/vectorlay/venv"
    if venv.is_symlink():  # the simulator's stand-in for the node's venv: this test's Python
        venv.unlink()
    exe = venv / "bin/vectorlay-bootstrap"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    for kill in ("bin/kill",):
        if not (node.root / kill).exists():
            (node.root / kill).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f"/{kill}", node.root / kill)
    units = [
        "nebula.service",
        "nomad.service",
        "node-agent.service",
        "node-agent-update.service",
        "node-agent-update.timer",
    ]
    res = subprocess.run(
        ["systemd-analyze", "verify", f"--root={node.root}", *units],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")

    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.optionxform = str  # type: ignore[assignment,method-assign]
    timer.read_string(host.read_text("/etc/systemd/system/node-agent-update.timer"))
    assert timer["Timer"]["OnCalendar"] == "hourly"
    assert timer["Timer"]["RandomizedDelaySec"] == "20min"
    assert timer["Timer"]["Persistent"] == "true"
    assert "OnUnitActiveSec" not in timer["Timer"]
    # systemd itself reads the calendar spec as every hour on the hour.
    cal = subprocess.run(
        ["systemd-analyze", "calendar", "hourly"], capture_output=True, text=True, check=True
    )
    assert "Normalized form: *-*-* *:00:00" in cal.stdout


def test_the_update_command_upgrades_and_rolls_back_with_the_durable_identity(node: Node) -> None:
    node.run_stages()
    publish(node.art_dir, "node-agent", "1.1.0", agent_tarball("node-agent", "1.1.0"))
    env = inject.env(settle=0.3, forbid_live=False)
    cmd = [sys.executable, "-m", "bootstrap.cli", "update", "--root", str(node.root)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "update: node-agent: drained" in res.stdout
    assert "update: done: node-agent 1.1.0" in res.stdout
    host = node.host()
    assert (probe(host, "node-agent") or "").startswith("ok node-agent 1.1.0")

    publish(node.art_dir, "node-agent", "1.2.0", agent_tarball("node-agent", "1.2.0", broken=True))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 1
    assert "update: FAILED: node-agent 1.2.0 did not pass its health check; running 1.1.0 again" in res.stdout
    assert (probe(host, "node-agent") or "").startswith("ok node-agent 1.1.0")

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert "Traceback" not in res.stderr


def test_container_mode_installs_runsc_and_registers_it_with_docker_keeping_foreign_settings(
    node: Node,
) -> None:
    publish(node.art_dir, "runsc", "20241118", agent_tarball("runsc", "20241118"))
    daemon = node.root / "etc/docker/daemon.json"
    daemon.parent.mkdir(parents=True)
    foreign = b'{"log-driver": "journald", "runtimes": {"kata": {"path": "/usr/bin/kata-runtime"}}}\n'
    daemon.write_bytes(foreign)
    unit = node.root / "usr/lib/systemd/system/docker.service"  # docker.io is installed
    unit.parent.mkdir(parents=True)
    unit.write_text("[Unit]\nDescription=Docker\n[Service]\nExecStart=/usr/bin/dockerd\n")
    host, _out = node.run_stages(env={"VECTORLAY_GPU_MODE": "container"})
    assert artifacts.current_version(host, "runsc") == "20241118"
    data = json.loads(daemon.read_text())
    assert data["log-driver"] == "journald"
    assert data["runtimes"]["kata"] == {"path": "/usr/bin/kata-runtime"}
    assert data["runtimes"]["runsc"] == {
        "path": "/opt/vectorlay/releases/runsc/current/bin/runsc",
        "runtimeArgs": ["--nvproxy=true"],
    }
    assert (node.root / "var/lib/vectorlay/backup/etc/docker/daemon.json").read_bytes() == foreign
    hcl = host.read_text("/etc/vectorlay/nomad.d/client.hcl")
    assert 'plugin "docker"' in hcl and 'allow_runtimes = ["runc", "runsc"]' in hcl
    runner = host.runner
    assert isinstance(runner, RecordingRunner)
    assert ("systemctl", "reload-or-restart", "docker.service") in runner.commands
    assert "gpu_mode: container" in host.read_text("/etc/vectorlay/node.yaml")


def test_the_update_command_probes_the_units_no_vm_attach_probe_has_proven(
    start_control_plane: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node updated to a release with the probe has no records: its units would stay unadvertised
    # (`not_probed`) until someone ran --probe-units, so the update probes them.
    from tests.install.helpers import gpus_on_vfio

    monkeypatch.setattr(update, "DEFAULT_SETTLE", 0.3)
    art_dir = tmp_path / "artifacts"
    publish_agents(art_dir, VERSIONS)
    cp = start_control_plane(args=("--artifacts", str(art_dir)))
    cp.org("acme", provider=True)
    base = Path(tempfile.mkdtemp(prefix="vl", dir="/tmp"))
    desc = load_topology("hgx-h100")
    gpus_on_vfio(desc)
    root = build_host(base / "r", desc)
    node = Node(root, cp, art_dir, Systemd(spawn=True))
    try:
        assert cp.enroll(root, "acme", gpu_mode="passthrough").returncode == 0
        node.run_stages()
        env = inject.env(settle=0.3, forbid_live=False)
        cmd = [sys.executable, "-m", "bootstrap.cli", "update", "--root", str(root)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        probed = [ln for ln in res.stdout.splitlines() if ln.startswith("update: probe: unit ")]
        # On a host tree QEMU is recorded, not run: one probe per GPU unit of the HGX board.
        assert len(probed) == 8, res.stdout
        assert all(ln.endswith("recorded, not run (host tree)") for ln in probed)
    finally:
        node.sim.stop_all(node.host())
        shutil.rmtree(base)
