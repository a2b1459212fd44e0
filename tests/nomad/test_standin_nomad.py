"""The stand-in nomad (hostsim.nomad_standin) pinned to Nomad's documentation, behaviour by behaviour,
and the node's own settings (client.hcl, nomad.service, the update's signal) read against the same
pages. Each test names the page and the sentence (hostsim.nomad_standin.DOCS) its behaviour comes
from, so that the stand-in cannot drift into what the product would like Nomad to do.

Pages (developer.hashicorp.com/nomad/...):
  docs/configuration             leave_on_interrupt, leave_on_terminate
  docs/configuration/client      "drain_on_shutdown Block"
  docs/deploy/nomad-agent        "Stop an agent", "Signal handling"
  docs/upgrade                   "In Place"
  docs/job-declare/exit-signals  the tasks' kill signal (SIGINT)
"""

from __future__ import annotations

import configparser
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bootstrap.host import Host
from bootstrap.identity import Identity
from bootstrap.resources import units_dir
from bootstrap.update import IN_PLACE_SIGNAL, RESTART
from hostsim import nomad_standin
from hostsim.agents import nomad_script
from hostsim.nomad_standin import DOCS, allocations, kill_tasks, place, running_tasks, settings

from .helpers import parse_hcl, render_nomad_config

DATA_DIR = "/var/lib/nomad"
DRAINING = (
    'client {\n  enabled = true\n  drain_on_shutdown {\n    deadline = "4m"\n    force = true\n  }\n}\n'
)


class Agent:
    """One stand-in nomad process on a tree, started like nomad.service starts it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None

    def configure(self, hcl: str) -> None:
        d = self.root / "etc/nomad.d"
        d.mkdir(parents=True, exist_ok=True)
        (d / "client.hcl").write_text(f'data_dir = "{DATA_DIR}"\n' + hcl)

    def start(self, version: str = "1.0.0") -> None:
        binary = self.root / f"bin/nomad-{version}"
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text(nomad_script(version))
        binary.chmod(0o755)
        self.out = self.root / f"nomad-{version}.out"
        self.err = self.root / f"nomad-{version}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [str(binary), "agent", "-config", "/etc/nomad.d", "--root", str(self.root)],
                stdout=out,
                stderr=err,
            )
        # Logged once its signal handlers are in place.
        _wait(lambda: "client started" in self.out.read_text(), "the agent to start")

    def signal(self, sig: int) -> tuple[int, str, str]:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=30)
        return rc, self.out.read_text(), self.err.read_text()

    def place(self, *allocs: str) -> dict[str, int]:
        return {a: place(str(self.root), DATA_DIR, a) for a in allocs}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _wait(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    try:
        yield a
    finally:
        a.stop()
        kill_tasks(str(tmp_path))


def _alive(pids: dict[str, int]) -> bool:
    return all(nomad_standin._alive(pid, alloc) for alloc, pid in pids.items())


def _none_alive(pids: dict[str, int]) -> bool:
    return not any(nomad_standin._alive(pid, alloc) for alloc, pid in pids.items())


# --- Stop signals ---------------------------------------------------------------------------------


def test_sigint_with_leave_on_interrupt_and_drain_on_shutdown_drains_every_allocation(agent: Agent) -> None:
    page, _default, leaving = DOCS["leave_on_interrupt"]
    assert page.endswith("/docs/configuration#leave_on_interrupt")
    assert "the client will drain its workloads before shutting down" in leaving
    agent.configure("leave_on_interrupt = true\n" + DRAINING)
    agent.start()
    pids = agent.place("vm-a", "vm-b")
    rc, out, _err = agent.signal(signal.SIGINT)
    assert rc == 0 and "drain complete" in out and "left the cluster" in out
    assert _none_alive(pids) and allocations(str(agent.root), DATA_DIR) == {}


def test_sigterm_without_leave_on_terminate_exits_and_leaves_the_allocations_running(agent: Agent) -> None:
    # "By default, any stop signal to an agent (interrupt or terminate) will cause the agent to exit
    # after ensuring its internal state is committed to disk as needed." Exit status 1: command/agent/
    # command.go handleSignals returns 1 for a signal it does not leave on.
    _page, default, _leaving = DOCS["leave_on_interrupt"]
    assert default.startswith("By default, any stop signal to an agent (interrupt or terminate)")
    agent.configure("leave_on_interrupt = true\nleave_on_terminate = false\n" + DRAINING)
    agent.start()
    pids = agent.place("vm-a", "vm-b")
    rc, out, _err = agent.signal(signal.SIGTERM)
    assert rc == 1 and "exiting without leaving" in out and "drain" not in out
    assert _alive(pids) and allocations(str(agent.root), DATA_DIR) == pids


def test_sigint_without_any_leave_setting_exits_without_draining(agent: Agent) -> None:
    # leave_on_interrupt `(bool: false)`: the default is to exit, not to leave.
    agent.configure(DRAINING)
    agent.start()
    pids = agent.place("vm-a")
    rc, out, _err = agent.signal(signal.SIGINT)
    assert rc == 1 and "drain" not in out and _alive(pids)


def test_leaving_without_a_drain_on_shutdown_block_stops_no_allocation(agent: Agent) -> None:
    page, default, _when = DOCS["drain_on_shutdown"]
    assert page.endswith("/docs/configuration/client#drain_on_shutdown-block")
    assert (
        default == "By default drain_on_shutdown is not configured and clients will not drain on any signal."
    )
    agent.configure("leave_on_interrupt = true\nclient {\n  enabled = true\n}\n")
    agent.start()
    pids = agent.place("vm-a")
    rc, out, _err = agent.signal(signal.SIGINT)
    assert rc == 0 and "left the cluster" in out and "drain" not in out and _alive(pids)


def test_the_drain_follows_the_signal_leave_on_is_set_for(agent: Agent) -> None:
    # "the node will drain itself when receiving the appropriate signal (SIGINT for
    # leave_on_interrupt or SIGTERM on leave_on_terminate)"
    _page, _default, when = DOCS["drain_on_shutdown"]
    assert "(SIGINT for leave_on_interrupt or SIGTERM on leave_on_terminate)" in when
    agent.configure("leave_on_terminate = true\n" + DRAINING)
    agent.start()
    pids = agent.place("vm-a")
    rc, out, _err = agent.signal(signal.SIGTERM)
    assert rc == 0 and "drain complete" in out and _none_alive(pids)


def test_the_drain_stops_each_task_with_its_kill_signal(agent: Agent) -> None:
    page, sentence = DOCS["task_kill_signal"]
    assert page.endswith("/docs/job-declare/exit-signals") and "SIGINT" in sentence
    agent.configure("leave_on_interrupt = true\n" + DRAINING)
    agent.start()
    pids = agent.place("vm-a")
    # A task that ignores SIGINT would be killed after kill_timeout; ours exits on it at once.
    started = time.monotonic()
    rc, _out, _err = agent.signal(signal.SIGINT)
    assert rc == 0 and _none_alive(pids)
    assert time.monotonic() - started < nomad_standin.KILL_TIMEOUT


# --- Other signals --------------------------------------------------------------------------------


def test_sighup_reloads_and_sigusr1_prints_metrics_and_neither_drains_or_writes_a_file(agent: Agent) -> None:
    page, hup, usr1 = DOCS["signals"]
    assert page.endswith("/docs/deploy/nomad-agent#signal-handling")
    assert hup == "SIGHUP causes Nomad to reload its configuration."
    assert usr1 == "SIGUSR1 causes Nomad to print its metrics without stopping the agent."
    agent.configure("leave_on_interrupt = true\n" + DRAINING)
    agent.start()
    pids = agent.place("vm-a")
    before = {p for p in agent.root.rglob("*")}
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    agent.proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    assert agent.proc.poll() is None and _alive(pids)
    # No `drained` file or anything else: Nomad knows nothing of vectorlay's node-agent protocol.
    assert {p for p in agent.root.rglob("*")} - before == set()
    _rc, out, err = agent.signal(signal.SIGINT)
    assert "reloaded configuration" in out and "nomad.client.allocations.running: 1" in err


# --- Restarting in place --------------------------------------------------------------------------


def test_a_new_agent_re_attaches_to_the_allocations_the_previous_one_left_running(agent: Agent) -> None:
    page, sentence = DOCS["in_place_upgrade"]
    assert (
        page.endswith("/docs/upgrade")
        and "Running allocations will continue running uninterrupted." in sentence
    )
    agent.configure("leave_on_interrupt = true\nleave_on_terminate = false\n" + DRAINING)
    agent.start("1.0.0")
    pids = agent.place("vm-a", "vm-b", "vm-c")
    assert agent.signal(signal.SIGTERM)[0] == 1
    agent.start("1.1.0")
    assert agent.proc is not None
    _wait(lambda: allocations(str(agent.root), DATA_DIR) == pids, "the new agent's state")
    assert _alive(pids) and running_tasks(str(agent.root)) == pids
    # The new agent owns them: its drain stops them.
    rc, out, _err = agent.signal(signal.SIGINT)
    assert rc == 0 and all(f"alloc {a}: re-attached to pid {p}" in out for a, p in pids.items())
    assert _none_alive(pids)


# --- The node's settings, read against the same pages ---------------------------------------------


def _identity(tmp_path: Path) -> Identity:
    path = tmp_path / "identity"
    path.mkdir()
    nomad: dict[str, Any] = {"region": "global", "servers": ["100.64.0.1:4647"], "meta": {}}
    (path / "enrollment.json").write_text(json.dumps({"nomad": nomad}))
    return Identity(path=path, node_id="node_test", org_id="org_test", overlay_ip="100.64.0.9", api=None)


def _service() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((units_dir() / "nomad.service").read_text())
    return unit["Service"]


@pytest.mark.parametrize("mode", ["none", "passthrough", "container"])
def test_the_stand_in_reads_the_nodes_client_hcl_as_an_hcl_parser_does(
    make_host: Callable[..., Host], tmp_path: Path, mode: str
) -> None:
    text = render_nomad_config(make_host("cpu-only"), _identity(tmp_path), mode)
    parsed = parse_hcl(text)
    (client,) = parsed["client"]
    assert settings(text) == {
        "leave_on_interrupt": parsed.get("leave_on_interrupt", False),
        "leave_on_terminate": parsed.get("leave_on_terminate", False),
        "drain_on_shutdown": "drain_on_shutdown" in client,
        "data_dir": parsed["data_dir"],
    }


def test_stopping_the_unit_drains_and_the_updates_signal_does_not(
    make_host: Callable[..., Host], tmp_path: Path
) -> None:
    conf = settings(render_nomad_config(make_host("cpu-only"), _identity(tmp_path), "passthrough"))
    leave_on = {"SIGINT": "leave_on_interrupt", "SIGTERM": "leave_on_terminate"}
    service = _service()
    # systemctl stop, a shutdown, uninstall: KillSignal, which the client leaves and drains on.
    assert conf[leave_on[service.get("KillSignal", "SIGTERM")]] is True and conf["drain_on_shutdown"]
    # The update: a signal the client does not leave on, so it exits and nothing is drained.
    assert RESTART["nomad"] == "in-place" and conf[leave_on[IN_PLACE_SIGNAL]] is False
    # Only the agent is signalled: the tasks are not systemd's to stop (systemd.kill(5) KillMode=).
    assert service["KillMode"] == "process"
    # Nomad exits 1 on a signal it does not leave on; systemd brings it back even if nothing else does.
    assert service["Restart"] == "on-failure"


def test_the_stand_in_is_what_the_release_ships_as_bin_nomad() -> None:
    script = nomad_script("9.9.9")
    assert script.startswith("#!/usr/bin/env python3\n") and "'nomad', '9.9.9', False" in script
    out = subprocess.run(
        ["python3", "-c", script, "--version"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),
    )
    assert out.stdout == "Nomad v9.9.9\n"
