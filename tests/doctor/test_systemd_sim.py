from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bootstrap.host import Host, RecordingRunner, TreeHost
from bootstrap.resources import units_dir
from hostsim import systemd


@pytest.fixture
def host(tmp_path: Path) -> Host:
    """The shipped units: a service wanted by multi-user.target, a timer wanted by timers.target and
    the static (no [Install]) service the timer starts."""
    root = tmp_path / "root"
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in ("nomad.service", "node-agent-update.timer", "node-agent-update.service"):
        shutil.copyfile(units_dir() / name, units / name)
    return TreeHost(root, systemd.install(RecordingRunner()))


def links(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): os.readlink(p)
        for p in sorted(root.rglob("*"))
        if p.is_symlink() and "run/" not in str(p.relative_to(root))
    }


def test_enable_creates_the_wants_symlink_and_is_enabled_reads_it(host: Host) -> None:
    assert host.run(["systemctl", "is-enabled", "nomad"]).stdout == "disabled\n"
    res = host.run(["systemctl", "enable", "nomad.service", "node-agent-update.timer"])
    assert res.ok
    assert links(host.root) == {
        "etc/systemd/system/multi-user.target.wants/nomad.service": "/etc/systemd/system/nomad.service",
        "etc/systemd/system/timers.target.wants/node-agent-update.timer": (
            "/etc/systemd/system/node-agent-update.timer"
        ),
    }
    assert (
        host.run(["systemctl", "is-enabled", "nomad", "node-agent-update.timer"]).stdout
        == "enabled\nenabled\n"
    )
    assert host.run(["systemctl", "disable", "nomad"]).ok
    assert host.run(["systemctl", "is-enabled", "nomad"]).stdout == "disabled\n"


def test_is_enabled_knows_static_masked_and_missing_units(host: Host) -> None:
    assert host.run(["systemctl", "is-enabled", "node-agent-update.service"]).stdout == "static\n"
    missing = host.run(["systemctl", "is-enabled", "nebula.service"])
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == "Failed to get unit file state for nebula.service: No such file or directory\n"
    assert host.run(["systemctl", "mask", "nebula.service"]).ok
    assert host.run(["systemctl", "is-enabled", "nebula.service"]).stdout == "masked\n"
    assert host.run(["systemctl", "start", "nebula.service"]).returncode == 1


def test_activity_lives_under_run_and_follows_start_stop_and_enable_now(host: Host) -> None:
    assert host.run(["systemctl", "is-active", "nomad"]).returncode == systemd.EXIT_INACTIVE
    assert host.run(["systemctl", "enable", "--now", "nomad"]).ok
    assert host.path("/run/hostsim/systemd/nomad.service").read_text() == "active\n"
    res = host.run(["systemctl", "is-active", "nomad", "node-agent-update.timer"])
    assert (res.returncode, res.stdout) == (0, "active\ninactive\n")
    host.run(["systemctl", "stop", "nomad"])
    assert host.run(["systemctl", "is-active", "--quiet", "nomad"]).returncode == systemd.EXIT_INACTIVE
    assert host.run(["systemctl", "try-restart", "nomad"]).ok
    assert host.run(["systemctl", "is-active", "nomad"]).stdout == "inactive\n"


def test_starting_a_unit_that_does_not_exist_fails_like_systemctl(host: Host) -> None:
    res = host.run(["systemctl", "restart", "vectorlay-vfio-bind"])
    assert res.returncode == systemd.EXIT_NOT_LOADED
    assert (
        res.stderr
        == "Failed to restart vectorlay-vfio-bind.service: Unit vectorlay-vfio-bind.service not found.\n"
    )


def test_an_unsimulated_verb_fails_loudly(host: Host) -> None:
    res = host.run(["systemctl", "isolate", "rescue.target"])
    assert res.returncode == 1 and "not simulated" in res.stderr


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="needs systemd's systemctl")
def test_the_simulator_agrees_with_real_systemctl_offline_on_enablement(host: Host, tmp_path: Path) -> None:
    # `systemctl --root=DIR` edits and reads unit enablement inside DIR without a running systemd:
    # the real implementation to hold the simulator to.
    real = tmp_path / "real"
    shutil.copytree(host.root, real, symlinks=True)
    units = ["nomad.service", "node-agent-update.timer", "node-agent-update.service"]

    def real_ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemctl", f"--root={real}", *args], capture_output=True, text=True, check=False
        )

    for u in units:
        assert host.run(["systemctl", "is-enabled", u]).stdout == real_ctl("is-enabled", u).stdout
    assert real_ctl("enable", "nomad.service", "node-agent-update.timer").returncode == 0
    assert host.run(["systemctl", "enable", "nomad.service", "node-agent-update.timer"]).ok
    assert links(host.root) == links(real)
    for u in units:
        assert host.run(["systemctl", "is-enabled", u]).stdout == real_ctl("is-enabled", u).stdout
    real_ctl("disable", "nomad.service")
    host.run(["systemctl", "disable", "nomad.service"])
    assert links(host.root) == links(real)
    assert host.run(["systemctl", "is-enabled", "nomad"]).stdout == real_ctl("is-enabled", "nomad").stdout
