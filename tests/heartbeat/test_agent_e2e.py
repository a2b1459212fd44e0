"""The real node-agent (the artifact built from this repository, installed by the real installer and
run as a real process) against the real control plane: what the control plane's listing advertises
follows the node's health, load, draining and status, and a bad control plane never kills the agent.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests

from bootstrap.agent_status import STATUS_PATH
from bootstrap.host import TreeHost
from bootstrap.identity import load_identity
from bootstrap.paths import IDENTITY_DIR
from bootstrap.update import probe
from controlplane import testing
from controlplane.units import NOT_ENROLLED
from hostsim import build_host, gpufault, inject, load_topology
from tests.install.helpers import FAST, gpus_on_vfio, install, installed_demo_node

pytestmark = pytest.mark.slow

AGENT_BIN = "/opt/vectorlay/releases/node-agent/current/bin/node-agent"
DAEMON_LOG = "run/hostsim/systemd/node-agent.service.log"


def agent_once(root: Path) -> subprocess.CompletedProcess[str]:
    """`node-agent --once` as installed in the tree: the release's launcher, code and the node's venv."""
    return subprocess.run(
        [str(root / AGENT_BIN.lstrip("/")), "--once", "--root", str(root)],
        env=inject.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def nodes(cp: testing.RunningControlPlane, key: str) -> dict[str, dict[str, Any]]:
    r = requests.get(
        f"{cp.url}/v1/orgs/acme/provider/nodes",
        headers={"Authorization": f"Bearer {key}"},
        verify=str(cp.ca_file),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return {n["node_id"]: n for n in r.json()["nodes"]}


def doctor(root: Path) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-m", "doctor.cli", "--root", str(root), "--json"],
        env=inject.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    data = json.loads(res.stdout)
    return {c["name"]: c for c in data["checks"]}


def node_id(root: Path) -> str:
    ident = load_identity(TreeHost(root))
    assert ident is not None
    return ident.node_id


def status(root: Path) -> dict[str, Any]:
    return dict(json.loads((root / STATUS_PATH.lstrip("/")).read_text()))


def daemon_pid(root: Path) -> int:
    words = (root / "run/hostsim/systemd/node-agent.service").read_text().split()
    return int(words[1])


def wait_for(what: str, cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@contextlib.contextmanager
def short_base() -> Iterator[Path]:
    # Unix socket paths stop at 108 bytes: the agents' health sockets live under the tree.
    base = Path(tempfile.mkdtemp(prefix="vla", dir="/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _gpu_configs(root: Path) -> list[Path]:
    """The config space files of the tree's NVIDIA 3D controllers."""
    devices = root / "sys/bus/pci/devices"
    return [
        dev / "config"
        for dev in sorted(devices.iterdir())
        if (dev / "vendor").read_text().strip() == "0x10de"
        and (dev / "class").read_text().startswith("0x0302")
    ]


def test_the_listing_follows_the_agents_heartbeats_health_load_hardware_drain_and_clock() -> None:
    with short_base() as base, installed_demo_node(base) as (cp, root, _token):
        key = cp.api_key("acme")
        me = node_id(root)

        # First heartbeats (the running agent's, and the installer's own): all 8 ready units advertised.
        seen = nodes(cp, key)[me]
        assert seen["status"] == "active" and seen["verdict"] == "PASS" and seen["reason"] is None
        assert seen["gpu_units"] == {"ready": 8, "total": 8, "enrolled": 8, "advertised": 8}
        assert seen["agents"] == {"nebula": "1.0.0", "nomad": "1.0.0", "node-agent": "1.0.0"}
        assert set(seen["resources"]) >= {"cpu_percent", "memory_percent", "disk_percent"}
        log = (root / DAEMON_LOG).read_text()
        assert "vectorlay-node-agent 1.0.0 started" in log
        assert "heartbeat: active, 8 GPU unit(s) advertised" in log
        once = agent_once(root)
        assert once.returncode == 0, once.stderr
        assert once.stdout == "heartbeat: active, 8 GPU unit(s) advertised\n"
        assert status(root)["status"] == "active" and status(root)["advertised_units"] == 8
        check = doctor(root)["control_plane"]
        assert check["status"] == "PASS" and check["message"].startswith(
            "8 GPU unit(s) advertised (heartbeat "
        )

        # The running agent is paused here, so that what the listing shows is the --once heartbeats'
        # (its watcher would send its own as the GPUs change; test_watch.py shows that). Nothing it
        # watches differs from its baseline when it resumes below.
        os.kill(daemon_pid(root), signal.SIGSTOP)
        try:
            # A GPU falls off the bus: its unit alone is withheld, the node's verdict is WARN.
            configs = _gpu_configs(root)
            healthy = {c: c.read_bytes() for c in configs}
            configs[0].write_bytes(b"\xff" * len(healthy[configs[0]]))
            once = agent_once(root)
            lost = os.readlink(configs[0].parent / "iommu_group").rsplit("/", 1)[-1]
            wedged = "fell off the bus (D3cold reset bug)"
            assert once.returncode == 0 and once.stdout == (
                f"heartbeat: active, 7 GPU unit(s) advertised; withheld: {lost} ({wedged})\n"
            )
            seen = nodes(cp, key)[me]
            assert seen["verdict"] == "WARN" and seen["reason"] is None
            assert seen["gpu_units"] == {"ready": 7, "total": 8, "enrolled": 8, "advertised": 7}
            assert [u["id"] for u in seen["units"] if not u["advertised"]] == [lost]

            # Every GPU off the bus: no unit is left, the wedged check FAILs, nothing is advertised.
            for c in configs:
                c.write_bytes(b"\xff" * len(healthy[c]))
            once = agent_once(root)
            assert once.returncode == 0 and once.stdout.startswith(
                "heartbeat: active, 0 GPU unit(s) advertised (verdict FAIL)"
            )
            seen = nodes(cp, key)[me]
            assert (
                seen["verdict"] == "FAIL"
                and seen["gpu_units"]["advertised"] == 0
                and seen["reason"] == "verdict FAIL"
            )
            for c in configs:
                c.write_bytes(healthy[c])
        finally:
            os.kill(daemon_pid(root), signal.SIGCONT)

        # Memory at 90%: over the 85% threshold.
        meminfo = root / "proc/meminfo"
        original = meminfo.read_text()
        total_kb = int(original.split()[1])
        lines = [
            f"MemAvailable:   {total_kb // 10} kB" if ln.startswith("MemAvailable:") else ln
            for ln in original.splitlines()
        ]
        meminfo.write_text("\n".join(lines) + "\n")
        assert agent_once(root).returncode == 0
        seen = nodes(cp, key)[me]
        assert seen["resources"]["memory_percent"] == 90.0
        assert seen["gpu_units"]["advertised"] == 0 and seen["reason"] == "memory 90% over 85%"
        meminfo.write_text(original)
        assert agent_once(root).stdout == "heartbeat: active, 8 GPU unit(s) advertised\n"

        # The same box speaking with the identity of a node that enrolled without GPUs: capped at 0.
        small = build_host(base / "small", load_topology("cpu-only"))
        assert cp.enroll(small, "acme", gpu_mode="none").returncode == 0
        link = root / IDENTITY_DIR.lstrip("/")
        own = os.readlink(link)
        borrowed = Path(os.readlink(small / IDENTITY_DIR.lstrip("/"))).name
        shutil.copytree(small / "etc/vectorlay" / borrowed, link.parent / borrowed, symlinks=True)
        link.unlink()
        os.symlink(borrowed, link)
        once = agent_once(root)
        # Per unit: none of the eight groups it reports is among those it enrolled with (none).
        groups = ", ".join(str(g) for g in range(24, 32))
        assert once.stdout.startswith(
            f"heartbeat: active, 0 GPU unit(s) advertised (8 ready unit(s) {NOT_ENROLLED} ({groups}));"
            f" withheld: 24 ({NOT_ENROLLED}), "
        )
        assert once.stdout.endswith(" and 4 more\n")
        seen = nodes(cp, key)[node_id(small)]
        assert seen["gpu_units"] == {"ready": 8, "total": 8, "enrolled": 0, "advertised": 0}
        assert {(u["advertised"], tuple(u["reasons"])) for u in seen["units"]} == {(False, (NOT_ENROLLED,))}
        link.unlink()
        os.symlink(own, link)

        # SIGUSR1 (what `vectorlay-bootstrap update` sends): the agent says draining, then drained.
        drained = root / "run/vectorlay-node-agent/drained"
        os.kill(daemon_pid(root), signal.SIGUSR1)
        wait_for("the drained file", drained.exists)
        assert (probe(TreeHost(root), "node-agent") or "").startswith("drained node-agent 1.0.0")
        seen = nodes(cp, key)[me]
        assert (
            seen["draining"] is True and seen["gpu_units"]["advertised"] == 0 and seen["reason"] == "draining"
        )
        log = (root / DAEMON_LOG).read_text()
        assert "heartbeat: active, 0 GPU unit(s) advertised (draining)" in log and "INFO drained" in log
        assert "Traceback" not in log

        # No heartbeat for three intervals, by the control plane's clock: nothing advertised.
        testing.stop(cp)
        later = testing.start(
            cp.db_path.parent, args=("--artifacts", str(base / "artifacts")),
            env={"VECTORLAY_CP_CLOCK_OFFSET": str(3 * 240 + 60)},
        )  # fmt: skip
        try:
            seen = nodes(later, key)[me]
            assert seen["gpu_units"]["advertised"] == 0 and seen["reason"].startswith("stale heartbeat (")
        finally:
            testing.stop(later)


def _gpus(root: Path) -> dict[str, str]:
    """The tree's NVIDIA 3D controllers, each with its IOMMU group: the unit's id in the listing."""
    devices = root / "sys/bus/pci/devices"
    return {
        d.name: os.readlink(d / "iommu_group").rsplit("/", 1)[-1]
        for d in sorted(devices.iterdir())
        if (d / "vendor").read_text().strip() == "0x10de" and (d / "class").read_text().startswith("0x0302")
    }


def test_one_gpu_off_the_bus_withdraws_its_own_unit_at_once_and_a_degraded_link_stays_advertised() -> None:
    """The running agent (its watcher, no --once) sends the doctor's `units`; the control plane
    withdraws the one unit that lost its GPU and keeps the node's other seven for rent."""
    with short_base() as base, installed_demo_node(base) as (cp, root, _token):
        key = cp.api_key("acme")
        me = node_id(root)
        gpus = _gpus(root)
        assert len(gpus) == 8 and len(set(gpus.values())) == 8
        wait_for("the running agent's per-unit heartbeat", lambda: nodes(cp, key)[me]["units"] is not None)
        seen = nodes(cp, key)[me]
        assert seen["verdict"] == "PASS" and seen["gpu_units"]["advertised"] == 8
        assert sorted(u["id"] for u in seen["units"]) == sorted(gpus.values())
        assert all(u["advertised"] and u["reasons"] == [] for u in seen["units"])
        slow, lost = list(gpus)[:2]

        # A riser trained down to x8 Gen1: only the doctor's next run sees it (the watcher watches
        # what changes at once). Then another GPU falls off the bus, with the driver's Xid 79: the
        # watcher's heartbeat carries both.
        inject.train_link(root, slow, width=8, speed="2.5 GT/s PCIe")
        beats = (root / DAEMON_LOG).read_text().count("INFO heartbeat: ")
        healthy = gpufault.fall_off_the_bus(root, lost)

        def withdrawn() -> bool:
            units = {u["id"]: u for u in nodes(cp, key)[me]["units"]}
            return not units[gpus[lost]]["advertised"]

        wait_for("the lost GPU's unit withdrawn", withdrawn)
        seen = nodes(cp, key)[me]
        assert seen["verdict"] == "WARN" and seen["reason"] is None
        assert seen["gpu_units"] == {"ready": 7, "total": 8, "enrolled": 8, "advertised": 7}
        units = {u["id"]: u for u in seen["units"]}
        assert units.pop(gpus[lost]) == {
            "id": gpus[lost],
            "status": "not_ready",
            "advertised": False,
            "reasons": ["fell off the bus (D3cold reset bug)"],
        }
        assert units.pop(gpus[slow]) == {
            "id": gpus[slow],
            "status": "degraded",
            "advertised": True,
            "reasons": ["PCIe link x8 of x16 (2.5 GT/s of 32.0 GT/s): Gen1 on a Gen5 device"],
        }
        assert all(u["status"] == "ready" and u["advertised"] and u["reasons"] == [] for u in units.values())
        log = (root / DAEMON_LOG).read_text()
        assert f"INFO watch: kernel log: {gpufault.xid79(lost)}: heartbeat now" in log or (
            f"INFO watch: {lost} config space reads 0xffff (fell off the bus): heartbeat now" in log
        )
        assert (
            "heartbeat: active, 7 GPU unit(s) advertised; "
            f"withheld: {gpus[lost]} (fell off the bus (D3cold reset bug))" in log
        )
        assert log.count("INFO heartbeat: ") == beats + 1  # one heartbeat, not a withdrawal per source
        answer = status(root)
        assert answer["advertised_units"] == 7 and answer["withheld"] == [
            {"id": gpus[lost], "reasons": ["fell off the bus (D3cold reset bug)"]}
        ]
        # The node's own view agrees: the wedged check WARNs (seven units are left to rent).
        checks = doctor(root)
        assert checks["wedged"]["status"] == "WARN" and lost in checks["wedged"]["message"]
        assert checks["control_plane"]["status"] == "PASS"

        # The GPU answers again (after a power cycle): its unit is back, the slow link still degraded.
        gpufault.come_back(root, lost, healthy)
        wait_for("the unit back", lambda: nodes(cp, key)[me]["gpu_units"]["advertised"] == 8)
        seen = nodes(cp, key)[me]
        # The degraded link keeps the verdict at WARN.
        assert seen["verdict"] == "WARN" and seen["reason"] is None
        checks = doctor(root)
        assert checks["wedged"]["status"] == "PASS", checks["wedged"]
        assert {n for n, c in checks.items() if c["status"] != "PASS"} == {"gpu_units"}, checks
        units = {u["id"]: u for u in seen["units"]}
        assert units[gpus[lost]]["advertised"] and units[gpus[lost]]["reasons"] == []
        assert units[gpus[slow]]["status"] == "degraded" and units[gpus[slow]]["advertised"]
        assert "withheld" not in status(root) or status(root)["withheld"] == []
        assert "Traceback" not in (root / DAEMON_LOG).read_text()


def test_a_decommissioned_node_hears_removed_stays_removed_and_comes_back_with_a_new_token() -> None:
    with short_base() as base, installed_demo_node(base) as (cp, root, _token):
        key = cp.api_key("acme")
        me = node_id(root)
        r = requests.patch(
            f"{cp.url}/v1/orgs/acme/provider/nodes/{me}",
            json={"status": "removed"},
            headers={"Authorization": f"Bearer {key}"},
            verify=str(cp.ca_file),
            timeout=30,
        )
        assert r.status_code == 200, r.text

        once = agent_once(root)
        assert once.returncode == 0, once.stderr
        assert "the control plane says this node was removed" in once.stdout
        assert status(root)["status"] == "removed" and status(root)["advertised_units"] == 0
        check = doctor(root)["control_plane"]
        assert check["status"] == "FAIL"
        assert check["hint"] == "re-run the install one-liner with a new token to bring it back"
        for _ in range(2):
            assert agent_once(root).returncode == 0
        seen = nodes(cp, key)[me]
        assert (
            seen["status"] == "removed"
            and seen["gpu_units"]["advertised"] == 0
            and seen["reason"] == "removed"
        )

        # The one-liner again, with a new token: the same node, active and advertised again.
        again = install(root, cp=cp, token=cp.token("acme"), env=FAST)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr
        assert "node-agent: heartbeat: active, 8 GPU unit(s) advertised" in again.stdout
        seen = nodes(cp, key)[me]
        assert seen["status"] == "active" and seen["gpu_units"]["advertised"] == 8 and seen["reason"] is None
        assert status(root)["status"] == "active"
        assert doctor(root)["control_plane"]["status"] == "PASS"


class _BadControlPlane(http.server.BaseHTTPRequestHandler):
    """Answers each heartbeat with the next of a list of bad answers."""

    answers: ClassVar[list[str]] = []
    served: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        kind = self.answers[len(self.served) % len(self.answers)]
        self.served.append(kind)
        if kind == "hang up":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        status, ctype, body = {
            "html": (200, "text/html", b"<html><body>Welcome to nginx!</body></html>"),
            "500": (500, "application/json", b'{"error": {"code": "INTERNAL", "message": "internal error"}}'),
            "garbage json": (200, "application/json", b'{"status": "maybe", "advertised_units": "lots"'),
            "wrong json": (200, "application/json", b"[1, 2, 3]"),
        }[kind]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_html_500_garbage_json_or_no_answer_never_kill_the_agent_and_it_backs_off(
    control_plane: testing.RunningControlPlane,
) -> None:
    control_plane.org("acme")
    with short_base() as base:
        desc = load_topology("hgx-h100")
        gpus_on_vfio(desc)
        root = build_host(base / "r", desc)
        assert control_plane.enroll(root, "acme", gpu_mode="passthrough").returncode == 0
        token = load_identity(TreeHost(root)).node_token()  # type: ignore[union-attr]

        _BadControlPlane.answers = ["html", "500", "garbage json", "wrong json", "hang up"]
        _BadControlPlane.served = []
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadControlPlane)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        state = control_plane.state_dir
        tls.load_cert_chain(str(state / "server.crt"), str(state / "server.key"))
        server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        config = root / "etc/vectorlay/node-agent.yaml"
        config.write_text(f"api: https://127.0.0.1:{server.server_address[1]}\n")

        log_path = base / "agent.log"
        with log_path.open("wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "nodeagent", "--root", str(root)],
                env={**os.environ, "VECTORLAY_ADVERTISE_INTERVAL": "1"},
                stdout=log,
                stderr=log,
            )
        try:
            wait_for("every bad answer twice", lambda: len(_BadControlPlane.served) >= 10, timeout=90)
            # Then no answer at all: nothing listens there any more.
            server.shutdown()
            server.server_close()
            refused = log_path.read_text().count("could not reach")
            wait_for(
                "a refused connection", lambda: log_path.read_text().count("could not reach") > refused + 1
            )
            assert agent.poll() is None, "the agent died"
            assert (probe(TreeHost(root), "node-agent") or "").startswith("ok node-agent")
        finally:
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(timeout=15)
        text = log_path.read_text()
        assert code == 0, text
        assert "Traceback" not in text and token not in text
        assert "returned 200 without a JSON body" in text  # html and the truncated JSON
        assert "returned 500" in text
        assert "not one this agent understands" in text  # JSON of the wrong shape
        assert "could not reach" in text  # hung up, then refused
        assert text.count("heartbeat not delivered") >= 10
        assert "next attempt in" in text and text.rstrip().endswith("INFO stopped")
        last = status(root)
        assert last["last_error"] and "heartbeat_at" not in last
