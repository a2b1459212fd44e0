"""An update never stops a rented allocation; taking the node offline drains it.

The agents run as daemons under the systemd simulator (which follows each unit's KillSignal=,
KillMode=process and Restart=): the real node-agent built from this repository, the stand-in nomad
that behaves as Nomad documents (tests/nomad/test_standin_nomad.py pins it) with the node's own
client.hcl, holding allocations that are real processes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bootstrap import artifacts
from bootstrap.host import RecordingRunner, TreeHost
from bootstrap.identity import Identity
from bootstrap.resources import units_dir
from bootstrap.stages.agents import NOMAD_CONFIG
from bootstrap.update import upgrade
from hostsim.nomad_standin import allocations, kill_tasks, place, running_tasks
from hostsim.systemd import Systemd, active_state, install
from tests.nomad.helpers import render_nomad_config

from .artifact_helpers import DirectoryDownloader
from .test_update import FAST, _release

pytestmark = pytest.mark.slow

DATA_DIR = "/var/lib/vectorlay/nomad"
FIRST = {"nebula": "1.9.5", "nomad": "1.8.4", "node-agent": "1.0.0"}
NEXT = {"nebula": "1.9.6", "nomad": "1.9.0", "node-agent": "1.1.0"}


class Node:
    def __init__(self, base: Path) -> None:
        self.root = base / "r"
        (self.root / "etc/systemd/system").mkdir(parents=True)
        for unit in ("nebula.service", "nomad.service", "node-agent.service"):
            shutil.copy(units_dir() / unit, self.root / "etc/systemd/system" / unit)
        self.sim = Systemd(spawn=True)
        self.runner = install(RecordingRunner(), self.sim)
        self.host = TreeHost(self.root, self.runner)
        self.mirror = DirectoryDownloader(base / "mirror")
        self._write_nomad_config(base)

    def _write_nomad_config(self, base: Path) -> None:
        # The node's client.hcl exactly as the agents stage renders it from an enrollment.
        ident_dir = base / "identity"
        ident_dir.mkdir()
        nomad = {"region": "global", "servers": ["100.64.0.1:4647"], "meta": {}}
        (ident_dir / "enrollment.json").write_text(json.dumps({"nomad": nomad}))
        ident = Identity(path=ident_dir, node_id="node_t", org_id="org_t", overlay_ip="100.64.0.9", api=None)
        config = self.host.path(NOMAD_CONFIG)
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(render_nomad_config(self.host, ident, "passthrough"))

    def tasks(self) -> dict[str, int]:
        return running_tasks(str(self.root))

    def nomad_log(self) -> str:
        return self.host.path("/run/hostsim/systemd/nomad.service.log").read_text()


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def node() -> Iterator[Node]:
    # Unix socket paths are limited to 108 bytes: keep the tree's path short.
    base = Path(tempfile.mkdtemp(prefix="vl", dir="/tmp"))
    n = Node(base)
    try:
        yield n
    finally:
        n.sim.stop_all(n.host)
        kill_tasks(str(n.root))
        shutil.rmtree(base)


@pytest.fixture
def rented(node: Node) -> dict[str, int]:
    """The node runs FIRST, with three VMs placed on it."""
    report = upgrade(node.host, node.mirror, _release(node.mirror, FIRST).artifacts, FAST)
    assert report.ok and set(report.upgraded) == set(FIRST)
    pids = {a: place(str(node.root), DATA_DIR, a) for a in ("vm-a", "vm-b", "vm-c")}
    assert node.tasks() == pids
    return pids


@pytest.mark.parametrize("agent", ["nomad", "nebula", "node-agent"])
def test_an_update_leaves_every_allocation_running_in_the_same_process(
    node: Node, rented: dict[str, int], agent: str
) -> None:
    before = len(node.runner.commands)
    logs: list[str] = []
    release = _release(node.mirror, {**FIRST, agent: NEXT[agent]})
    report = upgrade(node.host, node.mirror, release.artifacts, FAST, logs.append)
    assert report.ok and report.upgraded == {agent: (FIRST[agent], NEXT[agent])}, logs
    assert artifacts.current_version(node.host, agent) == NEXT[agent]
    assert active_state(node.host, f"{agent}.service", node.sim) == "active"
    # Same VMs, same processes, still the client's.
    assert node.tasks() == rented
    assert allocations(str(node.root), DATA_DIR) == rented
    commands = node.runner.commands[before:]
    # Nothing in the update path signals Nomad with what drains it or what it does not understand.
    assert ("systemctl", "restart", "nomad.service") not in commands
    assert not [
        c
        for c in commands
        if c[:2] == ("systemctl", "kill") and "nomad.service" in c and c[-2] != "--signal=SIGTERM"
    ]
    assert "drain" not in node.nomad_log()
    if agent == "nomad":
        assert ("systemctl", "kill", "--kill-who=main", "--signal=SIGTERM", "nomad.service") in commands
        # systemd calls the new agent active once it runs; it re-attaches as soon as it has started.
        reattached = [f"nomad 1.9.0: alloc {a}: re-attached to pid {p}" for a, p in rented.items()]
        _wait_for(lambda: all(line in node.nomad_log() for line in reattached), "the new nomad to re-attach")
        assert "nomad 1.8.4: caught SIGTERM; exiting without leaving" in node.nomad_log()


def test_an_update_then_stopping_nomad_drains_the_allocations(node: Node, rented: dict[str, int]) -> None:
    upgrade(node.host, node.mirror, _release(node.mirror, NEXT).artifacts, FAST)
    assert node.tasks() == rented
    res = node.host.run(["systemctl", "stop", "nomad.service"])
    assert res.returncode == 0
    assert node.tasks() == {} and allocations(str(node.root), DATA_DIR) == {}
    assert "nomad 1.9.0: caught SIGINT; gracefully shutting down agent" in node.nomad_log()
    assert "nomad 1.9.0: drain complete" in node.nomad_log()


def test_taking_the_node_offline_as_the_documentation_says_drains_first(
    node: Node, rented: dict[str, int]
) -> None:
    # "sudo systemctl stop nomad nebula node-agent" (and uninstall's `systemctl stop` of every agent).
    res = node.host.run(["systemctl", "stop", "nomad", "nebula", "node-agent"])
    assert res.returncode == 0 and node.tasks() == {}
    assert "drain complete" in node.nomad_log()


def test_a_systemctl_restart_of_nomad_would_drain_which_is_why_the_update_never_runs_it(
    node: Node, rented: dict[str, int]
) -> None:
    # The simulator follows KillSignal=SIGINT for the stop half of a restart, as systemd does.
    node.host.run(["systemctl", "restart", "nomad.service"])
    assert node.tasks() == {} and "drain complete" in node.nomad_log()


def test_a_sick_nomad_release_is_rolled_back_in_place_and_the_allocations_run_on(
    node: Node, rented: dict[str, int]
) -> None:
    release = _release(node.mirror, {**FIRST, "nomad": "2.0.0"}, broken=frozenset({"nomad"}))
    # A settle window longer than a loaded machine takes to start the Python stand-in and see it
    # exit (a real node waits 5 s).
    timing = dataclasses.replace(FAST, settle=2.0, healthy_timeout=10.0)
    report = upgrade(node.host, node.mirror, release.artifacts, timing)
    assert report.rolled_back == {"nomad": ("2.0.0", "1.8.4")}
    assert artifacts.current_version(node.host, "nomad") == "1.8.4"
    assert active_state(node.host, "nomad.service", node.sim) == "active"
    assert node.tasks() == rented
    assert "nomad 2.0.0: fatal: cannot start" in node.nomad_log()
