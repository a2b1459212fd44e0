"""The node-agent's watcher between heartbeats (nodeagent.watch): a GPU falling off the bus (its
config space, the kernel log's Xid 79) or leaving its driver sends a heartbeat at once, a flapping
device cannot make a heartbeat storm, and a node without a readable /dev/kmsg still watches sysfs.

The agent runs as it does in production (its loop, as a process) against the real control plane on
loopback; the interval is the default 240 s, so every heartbeat after the first is the watcher's.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from bootstrap.host import TreeHost
from bootstrap.identity import load_identity
from bootstrap.settings import Settings
from controlplane import testing
from hostsim import build_host, gpufault, load_topology
from nodeagent import watch
from tests.heartbeat.test_agent_e2e import short_base, wait_for
from tests.install.helpers import gpus_on_vfio


@dataclass
class Node:
    cp: testing.RunningControlPlane
    root: Path
    log: Path
    agent: subprocess.Popen[bytes]
    node_id: str
    key: str

    def heartbeats(self) -> int:
        row = (
            self.cp.admin.db.conn()
            .execute("SELECT heartbeats FROM node_heartbeats WHERE node_id = ?", (self.node_id,))
            .fetchone()
        )
        return int(row["heartbeats"]) if row else 0

    def listing(self) -> dict[str, Any]:
        r = requests.get(
            f"{self.cp.url}/v1/orgs/acme/provider/nodes",
            headers={"Authorization": f"Bearer {self.key}"},
            verify=str(self.cp.ca_file),
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return next(n for n in r.json()["nodes"] if n["node_id"] == self.node_id)

    def ready(self) -> int:
        """The ready units the node's last heartbeat reported, as the control plane lists them (the
        tree has no agents installed, so its verdict is FAIL and nothing is advertised: the
        benchmark on the installed demo node measures the advertised count)."""
        return int(self.listing()["gpu_units"]["ready"])

    def text(self) -> str:
        return self.log.read_text()


def gpu_addresses(root: Path) -> list[str]:
    """The tree's NVIDIA 3D controllers."""
    devices = root / "sys/bus/pci/devices"
    return [
        d.name
        for d in sorted(devices.iterdir())
        if (d / "vendor").read_text().strip() == "0x10de" and (d / "class").read_text().startswith("0x0302")
    ]


@pytest.fixture
def node(control_plane: testing.RunningControlPlane, request: pytest.FixtureRequest) -> Iterator[Node]:
    """An HGX H100 on vfio-pci, enrolled, its agent running; `kmsg` (indirect) says what /dev/kmsg
    is: "file" (the tree's), "missing" or "directory" (unreadable as a log)."""
    kind = getattr(request, "param", "file")
    control_plane.org("acme")
    with short_base() as base:
        desc = load_topology("hgx-h100")
        gpus_on_vfio(desc)
        root = build_host(base / "r", desc)
        kmsg = root / "dev/kmsg"
        if kind != "file":
            kmsg.unlink()
        if kind == "directory":
            kmsg.mkdir()
        assert control_plane.enroll(root, "acme", gpu_mode="passthrough").returncode == 0
        ident = load_identity(TreeHost(root))
        assert ident is not None
        log_path = base / "agent.log"
        with log_path.open("wb") as out:
            agent = subprocess.Popen(
                [sys.executable, "-m", "nodeagent", "--root", str(root)], stdout=out, stderr=out
            )
        n = Node(control_plane, root, log_path, agent, ident.node_id, control_plane.api_key("acme"))
        try:
            wait_for("the first heartbeat", lambda: "INFO heartbeat: " in n.text(), timeout=60)
            yield n
        finally:
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(timeout=15)
            text = n.text()
            assert code == 0 and "Traceback" not in text and text.rstrip().endswith("INFO stopped"), text


@pytest.mark.slow
def test_a_gpu_falling_off_the_bus_leaving_its_driver_or_in_the_kernel_log_sends_a_heartbeat_at_once(
    node: Node,
) -> None:
    assert node.ready() == 8 and node.heartbeats() == 1
    gpu = gpu_addresses(node.root)[0]

    # Its config space reads all ones: the doctor says wedged, that unit is not ready.
    healthy = gpufault.fall_off_the_bus(node.root, gpu, kmsg=False)
    wait_for("the unit not ready", lambda: node.ready() < 8)
    assert f"INFO watch: {gpu} config space reads 0xffff (fell off the bus): heartbeat now" in node.text()
    assert node.heartbeats() == 2
    gpufault.come_back(node.root, gpu, healthy)
    wait_for("the unit back", lambda: node.ready() == 8)
    assert f"INFO watch: {gpu} config space answers again: heartbeat now" in node.text()

    # Unbound from vfio-pci: that unit is no longer ready.
    target = gpufault.unbind(node.root, gpu)
    wait_for("the unit not ready", lambda: node.ready() < 8)
    assert f"INFO watch: {gpu} driver vfio-pci -> none: heartbeat now" in node.text()
    gpufault.rebind(node.root, gpu, target)
    wait_for("the unit back", lambda: node.ready() == 8)

    # Xid 79 in the kernel log, the config space still answering: a heartbeat all the same.
    before = node.heartbeats()
    gpufault.log_kernel(node.root, "nvme nvme0: a line about something else")
    gpufault.log_kernel(node.root, gpufault.xid79(gpu))
    wait_for("a heartbeat", lambda: node.heartbeats() == before + 1)
    assert f"INFO watch: kernel log: {gpufault.xid79(gpu)}: heartbeat now" in node.text()
    assert "something else" not in node.text()
    assert "cannot read the kernel log" not in node.text()


@pytest.mark.slow
def test_a_flapping_gpu_gets_a_bounded_number_of_heartbeats(node: Node) -> None:
    gpu = gpu_addresses(node.root)[0]
    healthy = gpufault.config_path(node.root, gpu).read_bytes()
    started = time.monotonic()
    flips = 0
    while time.monotonic() - started < 8:
        gpufault.fall_off_the_bus(node.root, gpu, kmsg=flips % 2 == 0)
        time.sleep(0.1)
        gpufault.come_back(node.root, gpu, healthy)
        time.sleep(0.1)
        flips += 1
    # A change still waiting for the bucket has gone by now; then every heartbeat asked for is in.
    time.sleep(watch.REFILL_S + 2)
    wait_for(
        "the heartbeats asked for",
        lambda: node.text().count(": heartbeat now") == node.heartbeats() - 1,
    )
    elapsed = time.monotonic() - started
    beats = node.heartbeats() - 1
    # The debounce's bound over that time: a burst, then one per refill.
    bound = watch.BURST + int(elapsed / watch.REFILL_S) + 1
    assert flips >= 30 and 2 <= beats <= bound, (flips, beats, bound)
    assert node.ready() == 8  # the last heartbeat says healthy again


@pytest.mark.slow
@pytest.mark.parametrize("node", ["missing", "directory"], indirect=True)
def test_without_a_readable_kernel_log_the_agent_says_so_once_and_watches_sysfs(node: Node) -> None:
    gpu = gpu_addresses(node.root)[0]
    healthy = gpufault.fall_off_the_bus(node.root, gpu, kmsg=False)
    wait_for("the unit not ready", lambda: node.ready() < 8)
    gpufault.come_back(node.root, gpu, healthy)
    wait_for("the unit back", lambda: node.ready() == 8)
    text = node.text()
    assert text.count("cannot read the kernel log") == 1
    assert "watching the GPUs' sysfs only" in text
    assert f"INFO watch: {gpu} config space reads 0xffff (fell off the bus): heartbeat now" in text


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_debounce_lets_one_heartbeat_a_second_then_one_per_refill() -> None:
    clock = _Clock()
    d = watch.Debounce(gap=1.0, burst=3, refill=10.0, clock=clock)
    sent = []
    # A change every 0.1 s for 60 s: each time the debounce allows, one heartbeat goes.
    for _ in range(600):
        if d.ready_in() == 0:
            d.spend()
            d.beat()
            sent.append(clock.t - 1000.0)
        clock.t += 0.1
    # Three a second apart, then one per 10 s as the bucket refills: 8 in a minute, not 600.
    assert sent[:3] == pytest.approx([0.0, 1.0, 2.0]), sent
    # After the third the bucket holds 0.2: the fourth at 10 s, then one per refill.
    refills = [b - a for a, b in itertools.pairwise(sent[3:])]
    assert sent[3] == pytest.approx(10.0, abs=0.15), sent
    assert len(sent) == 8 and all(10.0 - 1e-6 <= r <= 10.2 for r in refills), sent


def test_kernel_log_records_are_read_from_the_end_and_matched_on_their_message(tmp_path: Path) -> None:
    root = build_host(tmp_path / "r", load_topology("cpu-only"))
    gpufault.log_kernel(root, gpufault.xid79("0000:18:00.0"))  # before the agent: not news
    kmsg = watch.KernelLog.open(TreeHost(root))
    assert kmsg is not None and not kmsg.pollable
    try:
        assert kmsg.matches() == []
        with (root / "dev/kmsg").open("ab") as f:
            f.write(gpufault.kmsg_record("pcieport 0000:17:00.0: AER: Corrected error"))
            f.write(b" SUBSYSTEM=pci\n DEVICE=+pci:0000:17:00.0\n")
            # A record cut in the middle: the rest comes with the next write.
            rec = gpufault.kmsg_record("NVRM: GPU at PCI:0000:19:00: GPU has fallen off the bus.")
            f.write(rec[:20])
            f.flush()
            assert kmsg.matches() == []
            f.write(rec[20:])
        assert kmsg.matches() == ["NVRM: GPU at PCI:0000:19:00: GPU has fallen off the bus."]
        assert kmsg.matches() == []
    finally:
        kmsg.close()


def test_the_watched_devices_are_the_reports_units_or_else_the_detected_gpus_and_nvswitches(
    tmp_path: Path,
) -> None:
    desc = load_topology("hgx-h100")
    gpus_on_vfio(desc)
    host = TreeHost(build_host(tmp_path / "r", desc))
    passthrough = Settings(gpu_mode="passthrough")
    # Today's doctor report has no per-unit list: the units come from detection, 8 GPUs, 4 NVSwitches.
    detected = watch.watched_devices(
        {"verdict": "PASS", "gpu_units": {"ready": 8, "total": 8}}, host, passthrough
    )
    assert len(detected) == 12 and all(d.config for d in detected)
    assert {d.address for d in detected} >= set(gpu_addresses(host.root))
    assert watch.watched_devices(None, host, Settings(gpu_mode="none")) == ()
    # A report with `units` (docs/contracts.md): exactly their devices; config space for GPUs and
    # NVSwitches, the driver link for every function.
    report = {
        "units": [
            {
                "id": "17",
                "status": "ready",
                "devices": [
                    {"address": "0000:18:00.0", "role": "gpu"},
                    {"address": "0000:18:00.1", "role": "function"},
                ],
            },
            {"id": "18", "status": "not_ready", "devices": [{"address": "0000:05:00.0", "role": "nvswitch"}]},
            {"id": "19", "status": "ready", "devices": "garbage"},
            "garbage",
        ]
    }
    assert watch.watched_devices(report, host, passthrough) == (
        watch.Device("0000:05:00.0", True),
        watch.Device("0000:18:00.0", True),
        watch.Device("0000:18:00.1", False),
    )


def test_the_watcher_names_each_change_since_the_mark_and_reads_sysfs_at_most_every_poll(
    tmp_path: Path,
) -> None:
    desc = load_topology("hgx-h100")
    gpus_on_vfio(desc)
    root = build_host(tmp_path / "r", desc)
    host = TreeHost(root)
    clock = _Clock()
    watcher = watch.Watcher(host, clock=clock)
    try:
        watcher.watch(watch.watched_devices(None, host, Settings(gpu_mode="passthrough")))
        gpu = gpu_addresses(root)[0]
        assert watcher.poll() is None
        healthy = gpufault.fall_off_the_bus(root, gpu, kmsg=False)
        assert watcher.poll() is None  # sysfs was read 0 s ago
        clock.t += watch.POLL_S
        assert watcher.poll() == f"{gpu} config space reads 0xffff (fell off the bus)"
        watcher.mark()  # a heartbeat reports it
        clock.t += watch.POLL_S
        assert watcher.poll() is None
        gpufault.come_back(root, gpu, healthy)
        target = gpufault.unbind(root, gpu)
        clock.t += watch.POLL_S
        assert watcher.poll() == f"{gpu} config space answers again"
        watcher.mark()
        gpufault.rebind(root, gpu, target)
        watcher.mark()
        target = gpufault.unbind(root, gpu)
        clock.t += watch.POLL_S
        assert watcher.poll() == f"{gpu} driver vfio-pci -> none"
        gpufault.rebind(root, gpu, target)
        # The kernel log is read every time, sysfs or not.
        gpufault.log_kernel(root, gpufault.xid79(gpu))
        assert watcher.poll() == f"kernel log: {gpufault.xid79(gpu)}"
        assert watcher.poll() is None
    finally:
        watcher.close()
