"""Upgrades against real daemons started by the systemd simulator (the real node-agent built from
this repository, stand-ins for nebula and nomad): drain, switch, health check, roll back a version
that does not come up."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap import artifacts
from bootstrap.host import Host, RecordingRunner, TreeHost
from bootstrap.manifest import Manifest, verify_manifest
from bootstrap.resources import units_dir
from bootstrap.update import Timing, probe, upgrade
from hostsim.agents import agent_tarball
from hostsim.systemd import Systemd, active_state, install

from .artifact_helpers import DirectoryDownloader, manifest_for

FAST = Timing(settle=0.3, healthy_timeout=5.0, drain_timeout=2.0, poll=0.05)


@pytest.fixture
def env() -> Iterator[tuple[Host, Systemd, DirectoryDownloader]]:
    # Unix socket paths are limited to 108 bytes: keep the tree's path short.
    base = Path(tempfile.mkdtemp(prefix="vl", dir="/tmp"))
    root = base / "r"
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in ("nebula.service", "nomad.service", "node-agent.service"):
        shutil.copy(units_dir() / unit, root / "etc/systemd/system" / unit)
    sim = Systemd(spawn=True)
    host = TreeHost(root, install(RecordingRunner(), sim))
    try:
        yield host, sim, DirectoryDownloader(base / "mirror")
    finally:
        sim.stop_all(host)
        shutil.rmtree(base)


def _release(
    mirror: DirectoryDownloader, versions: dict[str, str], broken: frozenset[str] = frozenset()
) -> Manifest:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    blobs = {}
    for name, version in versions.items():
        blobs[(name, version)] = agent_tarball(name, version, broken=name in broken)
        mirror.put(name, version, blobs[(name, version)])
    return verify_manifest(manifest_for(blobs, key), [key.public_key()])


def test_first_install_starts_the_agent_and_it_answers_its_health_probe(
    env: tuple[Host, Systemd, DirectoryDownloader],
) -> None:
    host, _sim, mirror = env
    report = upgrade(host, mirror, _release(mirror, {"node-agent": "1.0.0"}).artifacts, FAST)
    assert report.ok and report.upgraded == {"node-agent": (None, "1.0.0")}
    assert active_state(host, "node-agent.service") == "active"
    assert (probe(host, "node-agent") or "").startswith("ok node-agent 1.0.0")
    log = host.path("/run/hostsim/systemd/node-agent.service.log").read_text()
    assert "vectorlay-node-agent 1.0.0 started" in log and "Traceback" not in log


@pytest.mark.slow
def test_an_upgrade_drains_the_old_agent_then_runs_the_new_one(
    env: tuple[Host, Systemd, DirectoryDownloader],
) -> None:
    host, _sim, mirror = env
    upgrade(host, mirror, _release(mirror, {"node-agent": "1.0.0"}).artifacts, FAST)
    logs: list[str] = []
    report = upgrade(host, mirror, _release(mirror, {"node-agent": "1.1.0"}).artifacts, FAST, logs.append)
    assert report.upgraded == {"node-agent": ("1.0.0", "1.1.0")}
    assert logs[0] == "node-agent: drained"
    assert ("systemctl", "kill", "--signal=SIGUSR1", "node-agent.service") in host.runner.commands  # type: ignore[attr-defined]
    assert (probe(host, "node-agent") or "").startswith("ok node-agent 1.1.0")
    assert artifacts.previous_version(host, "node-agent") == "1.0.0"
    log = host.path("/run/hostsim/systemd/node-agent.service.log").read_text()
    # The old agent drained (not enrolled: no heartbeat to send) and stopped cleanly on SIGTERM.
    assert log.index("INFO drained") < log.index("INFO stopped") < log.index("node-agent 1.1.0 started")


@pytest.mark.slow
def test_a_new_version_that_fails_its_health_check_is_rolled_back_and_the_old_one_runs_again(
    env: tuple[Host, Systemd, DirectoryDownloader],
) -> None:
    host, _sim, mirror = env
    upgrade(host, mirror, _release(mirror, {"node-agent": "1.0.0"}).artifacts, FAST)
    report = upgrade(
        host,
        mirror,
        _release(mirror, {"node-agent": "2.0.0"}, broken=frozenset({"node-agent"})).artifacts,
        FAST,
    )
    assert not report.ok and report.rolled_back == {"node-agent": ("2.0.0", "1.0.0")}
    assert artifacts.current_version(host, "node-agent") == "1.0.0"
    assert active_state(host, "node-agent.service") == "active"
    assert (probe(host, "node-agent") or "").startswith("ok node-agent 1.0.0")
    log = host.path("/run/hostsim/systemd/node-agent.service.log").read_text()
    assert "node-agent 2.0.0: fatal: cannot start" in log


def test_an_unchanged_manifest_restarts_nothing_and_downloads_nothing(
    env: tuple[Host, Systemd, DirectoryDownloader],
) -> None:
    host, _sim, mirror = env
    manifest = _release(mirror, {"nebula": "1.9.5", "nomad": "1.8.4", "node-agent": "1.0.0"})
    upgrade(host, mirror, manifest.artifacts, FAST)
    runner = host.runner
    assert isinstance(runner, RecordingRunner)
    before = len(runner.commands)
    fetched = len(mirror.fetched)
    report = upgrade(host, mirror, manifest.artifacts, FAST)
    assert report.unchanged == ["nebula", "nomad", "node-agent"] and not report.downloaded
    assert runner.commands[before:] == [] and len(mirror.fetched) == fetched
