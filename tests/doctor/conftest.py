from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap.host import Host, RecordingRunner
from bootstrap.resources import units_dir
from hostsim import network, systemd
from hostsim.host import SimHost
from hostsim.runsc import run_in_tree

# The units the agents stage installs, as it finds them (the wheel's package data, or units/ in a
# checkout): the doctor is judged against what ships, not against a stand-in.
UNIT_FILES = (
    "nebula.service",
    "nomad.service",
    "node-agent.service",
    "node-agent-update.service",
    "node-agent-update.timer",
)
AGENT_UNITS = ("nebula.service", "nomad.service", "node-agent.service", "node-agent-update.timer")

GB = 1000**3


def install_agents(host: Host, *, start: bool = True, timer: bool = True) -> None:
    """Write the agent units into the tree and enable (and start) them through the simulator."""
    unit_dir = host.path("/etc/systemd/system")
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name in UNIT_FILES:
        shutil.copyfile(units_dir() / name, unit_dir / name)
    host.run(["systemctl", "daemon-reload"])
    units = list(AGENT_UNITS if timer else AGENT_UNITS[:-1])
    res = host.run(["systemctl", "enable", *(["--now"] if start else []), *units])
    assert res.ok, res.stderr


def to_vfio(desc: dict[str, Any]) -> None:
    """The same topology after the passthrough stage: every GPU and NVSwitch on vfio-pci."""
    for d in desc["devices"]:
        if str(d["id"]).startswith("10de:"):
            d["driver"] = "vfio-pci"
    desc.setdefault("loaded_drivers", ["pcieport"]).append("vfio-pci")


@pytest.fixture
def sim_host(make_tree: Callable[..., Path]) -> Callable[..., SimHost]:
    """A host tree whose runner answers systemctl and nebula's device (`ip`, `ping`) from the tree and
    runs the runsc installed in it, with a fixed free-disk figure."""

    def _make(name: str, edit: Callable[[dict[str, Any]], None] | None = None, **kw: Any) -> SimHost:
        runner = network.install(systemd.install(RecordingRunner()))
        runner.handlers["runsc"] = run_in_tree
        host = SimHost(make_tree(name, edit), runner)
        host.disk_free_override = kw.get("disk_free", 500 * GB)
        return host

    return _make


@pytest.fixture
def agents() -> Callable[..., None]:
    return install_agents


@pytest.fixture
def vfio() -> Callable[[dict[str, Any]], None]:
    return to_vfio
