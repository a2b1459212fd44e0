"""hostsim's simulating host: the test machinery's seams (sysfs hooks, a disk figure), outside the
product, and the factory that hands the real CLI such a host for a tree root only."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from bootstrap import host as host_module
from bootstrap.host import LiveHost, RecordingRunner, SubprocessRunner, TreeHost, open_host, set_host_factory
from hostsim import inject
from hostsim.host import SimHost


def test_the_simulating_host_factory_simulates_tree_roots_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_module, "_host_factory", host_module._host_factory)
    set_host_factory(inject.simulating_host)
    host = open_host(tmp_path)
    assert isinstance(host, SimHost) and isinstance(host.runner, RecordingRunner)
    assert "systemctl" in host.runner.handlers and "modprobe" in host.runner.handlers
    assert host.sysfs_hooks
    # A runner given explicitly is left alone.
    plain = TreeHost(tmp_path, RecordingRunner())
    assert isinstance(plain.runner, RecordingRunner) and plain.runner.handlers == {}
    # The real root never gets the simulator, whatever the factory: commands run for real
    # and sysfs writes reach the kernel. (Building the host reads and runs nothing.)
    monkeypatch.setattr(LiveHost, "__init__", inspect.unwrap(LiveHost.__init__))
    live = open_host("/")
    assert type(live) is LiveHost and isinstance(live.runner, SubprocessRunner)


def test_sysfs_hooks_receive_the_write_instead_of_the_file(tmp_path: Path) -> None:
    attr = tmp_path / "sys/bus/pci/drivers_probe"
    attr.parent.mkdir(parents=True)
    attr.write_text("")
    host = SimHost(tmp_path)
    host.sysfs_write("/sys/bus/pci/drivers_probe", "0000:01:00.0")
    assert attr.read_text() == "0000:01:00.0"  # no hook: the data lands, as in a plain tree
    seen: list[tuple[str, str]] = []
    host.sysfs_hooks.append(lambda p, data: seen.append((p, data)))
    host.sysfs_write("/sys/bus/pci/drivers_probe", "0000:02:00.0")
    assert seen == [("/sys/bus/pci/drivers_probe", "0000:02:00.0")]
    assert attr.read_text() == "0000:01:00.0"


def test_the_disk_figure_replaces_the_measured_one_only_when_set(tmp_path: Path) -> None:
    host = SimHost(tmp_path)
    measured = TreeHost(tmp_path).disk_free_bytes("/var/lib/vectorlay")
    host.disk_free_override = 7 * 1000**3
    assert host.disk_free_bytes("/var/lib/vectorlay") == 7 * 1000**3
    host.disk_free_override = None
    # The same filesystem measured twice moves with other writers: a loose bound, not equality.
    assert abs(host.disk_free_bytes("/var/lib/vectorlay") - measured) < 1 << 30
