"""`vectorlay-bootstrap wait-overlay`: nomad starts only once nebula's device holds the overlay IP."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bootstrap.commands.wait_overlay import wait_overlay
from bootstrap.errors import VectorlayError
from bootstrap.host import Host, RecordingRunner, TreeHost
from hostsim import inject, network, systemd
from hostsim.systemd import set_active_state


def _host(make_tree: Callable[..., Path]) -> Host:
    return TreeHost(make_tree("cpu-only"), network.install(systemd.install(RecordingRunner())))


class FakeClock:
    def __init__(self, on_sleep: Callable[[int], None] = lambda n: None) -> None:
        self.t = 0.0
        self.sleeps = 0
        self.on_sleep = on_sleep

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s
        self.sleeps += 1
        self.on_sleep(self.sleeps)


def test_returns_once_nebula_brings_the_device_up_with_the_ip(make_tree: Callable[..., Path]) -> None:
    host = _host(make_tree)
    network.enroll_overlay(host, nebula_running=False)

    def nebula_starts(n: int) -> None:
        if n == 3:
            set_active_state(host, "nebula.service", "active")

    clock = FakeClock(nebula_starts)
    assert (
        wait_overlay(host, timeout=90, clock=clock, sleep=clock.sleep) == "vectorlay0 is up with 100.64.0.2"
    )
    assert clock.sleeps == 3


def test_times_out_with_what_it_saw_and_where_to_look(make_tree: Callable[..., Path]) -> None:
    host = _host(make_tree)
    network.enroll_overlay(host)
    host.run(["ip", "link", "set", "dev", "vectorlay0", "down"])
    clock = FakeClock()
    with pytest.raises(VectorlayError) as e:
        wait_overlay(host, timeout=5, clock=clock, sleep=clock.sleep)
    assert e.value.message == "overlay not ready after 5s: vectorlay0 is down"
    assert e.value.hint == "systemctl status nebula; journalctl -u nebula -n 50"
    assert clock.t == 5


def test_a_device_with_another_address_is_not_ready(make_tree: Callable[..., Path]) -> None:
    host = _host(make_tree)
    network.enroll_overlay(host, overlay_ip="100.64.0.7")
    node_json = host.path("/etc/vectorlay/identity/node.json")
    node_json.write_text(node_json.read_text().replace("100.64.0.7", "100.64.0.2"))
    clock = FakeClock()
    with pytest.raises(VectorlayError, match=r"vectorlay0 holds 100\.64\.0\.7/10, not 100\.64\.0\.2"):
        wait_overlay(host, timeout=1, clock=clock, sleep=clock.sleep)


def test_not_enrolled_fails_at_once(make_tree: Callable[..., Path]) -> None:
    clock = FakeClock()
    with pytest.raises(VectorlayError, match="not enrolled"):
        wait_overlay(_host(make_tree), timeout=90, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == 0


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = inject.env(forbid_live=False)
    return subprocess.run(
        [sys.executable, "-m", "bootstrap.cli", "wait-overlay", "--root", str(root), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_the_command_exits_0_when_ready_and_1_with_a_message_at_the_timeout(
    make_tree: Callable[..., Path],
) -> None:
    host = _host(make_tree)
    network.enroll_overlay(host)
    ok = _cli(host.root, "--timeout", "5")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "vectorlay0 is up with 100.64.0.2\n", "")
    set_active_state(host, "nebula.service", "inactive")
    late = _cli(host.root, "--timeout", "0.3")
    assert late.returncode == 1
    assert late.stderr == (
        "error: overlay not ready after 0.3s: vectorlay0 does not exist\n"
        "  fix: systemctl status nebula; journalctl -u nebula -n 50\n"
    )
