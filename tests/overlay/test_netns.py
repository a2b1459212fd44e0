"""The real nebula over a real (namespaced) network: a lighthouse from `overlay-host`, nodes installed
by the real `vectorlay-bootstrap install` against the real control plane, each in its own namespace.

Underlay: namespaces joined by veth pairs to a bridge in a fifth namespace (192.0.2.0/24). Overlay:
the lighthouse (group vectorlay-control) at 100.64.0.1, nodes A, B and C (group vectorlay-node) at
the addresses the control plane gave them, with their own identity files and the config the install
run wrote (only the lighthouse's underlay address and the paths into each
tree changed). What the firewall must hold: the lighthouse and each node reach each other; node B
reaches neither node A's agent port nor node A itself, and node A reaches neither B's agent nor C.

Needs root (namespaces) and Debian's nebula; .ci/run provides both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from bootstrap.host import CommandResult, TreeHost
from bootstrap.identity import load_identity
from bootstrap.overlay import NEBULA_CONFIG, TUN_DEVICE
from bootstrap.paths import IDENTITY_DIR
from controlplane import cli as cp_cli
from doctor.checks import run_checks
from doctor.model import Status
from hostsim import build_host, load_topology
from hostsim.agents import publish_agents
from tests.install.helpers import FAST, install, stop_daemons

NEBULA = shutil.which("nebula")
IP = shutil.which("ip")
AGENT_PORT = 4646  # Nomad's HTTP API on the node's overlay address

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        (os.geteuid() != 0 or NEBULA is None or IP is None) and not os.environ.get("CI"),
        reason="needs root, nebula and iproute2 (.ci/run runs as root and installs them)",
    ),
]


def _sh(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {proc.stdout}{proc.stderr}")
    return proc


@dataclass
class Net:
    tag: str
    namespaces: list[str] = field(default_factory=list)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def ns(self, name: str) -> str:
        return f"vl{self.tag}-{name}"

    def add_namespace(self, name: str) -> str:
        ns = self.ns(name)
        _sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def exec(
        self, name: str, *argv: str, check: bool = True, timeout: float = 20
    ) -> subprocess.CompletedProcess[str]:
        return _sh("ip", "netns", "exec", self.ns(name), *argv, check=check, timeout=timeout)

    def start(self, name: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        out = log.open("wb")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(name), *argv], stdout=out, stderr=subprocess.STDOUT
        )
        out.close()
        self.procs.append((proc, log))
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for _, log in self.procs
        )


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net(tag=str(os.getpid() % 100000))
    try:
        bridge = n.add_namespace("br")
        _sh("ip", "-n", bridge, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", bridge, "link", "set", "br0", "up")
        yield n
    finally:
        for proc, _ in n.procs:
            proc.terminate()
        for proc, _ in n.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for ns in reversed(n.namespaces):
            _sh("ip", "netns", "del", ns, check=False)


def _attach(net: Net, name: str, address: str) -> None:
    """A namespace for `name` with one leg on the bridge, at underlay `address`/24."""
    ns = net.add_namespace(name)
    outer, inner = f"vl{net.tag}{name}o"[:15], f"vl{net.tag}{name}i"[:15]
    _sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
    _sh("ip", "link", "set", outer, "netns", net.ns("br"))
    _sh("ip", "link", "set", inner, "netns", ns)
    _sh("ip", "-n", net.ns("br"), "link", "set", outer, "master", "br0", "up")
    _sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inner)
    _sh("ip", "-n", ns, "link", "set", inner, "up")


def _wait_tun(net: Net, name: str, overlay_ip: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nebula in {name} exited with {proc.returncode}\n{net.logs()}")
        res = net.exec(name, "ip", "-j", "addr", "show", "dev", TUN_DEVICE, check=False)
        if res.returncode == 0:
            info = json.loads(res.stdout)[0]
            if "UP" in info["flags"] and any(a.get("local") == overlay_ip for a in info.get("addr_info", [])):
                return
        time.sleep(0.2)
    raise AssertionError(f"{TUN_DEVICE} in {name} never held {overlay_ip}\n{net.logs()}")


def _pings(net: Net, src: str, dst: str, *, tries: int) -> bool:
    # The first packets wait for nebula's handshake; a few tries cover it.
    for _ in range(tries):
        if net.exec(src, "ping", "-n", "-c", "1", "-W", "1", dst, check=False).returncode == 0:
            return True
    return False


def _connects(net: Net, src: str, dst: str, port: int) -> bool:
    code = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(({dst!r}, {port}), timeout=3).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    return net.exec(src, sys.executable, "-c", code, check=False).returncode == 0


@pytest.fixture
def short_base() -> Iterator[Path]:
    # Short: the trees' agents put their health sockets under them, and socket paths stop at 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="vln", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _installed_node(base: Path, control_plane: Any, org: str, lighthouse_underlay: str) -> Path:
    """A node tree installed by the real `vectorlay-bootstrap install` against the real control plane
    (enrolled, artifacts fetched, agents stage run): its own rendered nebula config and identity
    files. Changed for the namespaces, and nothing else: the lighthouse's underlay address, and the
    paths into the tree (nebula here runs outside it, as a chroot would see them)."""
    root = build_host(base / f"n{len(list(base.iterdir()))}", load_topology("cpu-only"))
    res = install(root, cp=control_plane, token=control_plane.token(org), env=FAST)
    stop_daemons(root)  # the tree's stand-in agents; the real nebula is started below
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    path = root / NEBULA_CONFIG.lstrip("/")
    config = yaml.safe_load(path.read_text())
    assert config["pki"]["cert"] == f"{IDENTITY_DIR}/nebula.crt"
    config["pki"] = {k: str(root / v.lstrip("/")) for k, v in config["pki"].items()}
    config["static_host_map"] = {ip: [f"{lighthouse_underlay}:4242"] for ip in config["static_host_map"]}
    path.write_text(yaml.safe_dump(config))
    return root


@dataclass
class NetnsRunner:
    """The doctor's commands (`ip`, `ping`) run inside a node's namespace: its kernel, its tun device."""

    ns: str
    executes: ClassVar[bool] = True

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def test_nodes_reach_the_lighthouse_and_only_the_control_group_reaches_a_node(
    net: Net, tmp_path: Path, short_base: Path, start_control_plane: Callable[..., Any]
) -> None:
    assert NEBULA is not None
    publish_agents(tmp_path / "artifacts")
    control_plane = start_control_plane(args=("--artifacts", str(tmp_path / "artifacts")))
    state = control_plane.state_dir  # the lighthouse's identity comes from the same nebula CA
    lh_out = tmp_path / "lighthouse"
    with pytest.raises(SystemExit) as done:
        cp_cli.main(
            ["overlay-host", "--state-dir", str(state), "--name", "lighthouse", "--overlay-ip", "100.64.0.1",
             "--out", str(lh_out), "--lighthouse"]
        )  # fmt: skip
    assert done.value.code in (0, None)

    underlay = {"lh": "192.0.2.1", "a": "192.0.2.2", "b": "192.0.2.3", "c": "192.0.2.4"}
    for name, address in underlay.items():
        _attach(net, name, address)
    org = control_plane.org("acme")
    configs = {"lh": lh_out / "config.yml"}
    overlay = {"lh": "100.64.0.1"}
    roots = {}
    for name in ("a", "b", "c"):
        roots[name] = _installed_node(short_base, control_plane, org, underlay["lh"])
        configs[name] = roots[name] / NEBULA_CONFIG.lstrip("/")
        ident = load_identity(TreeHost(roots[name]))
        assert ident is not None
        overlay[name] = ident.overlay_ip
    assert len(set(overlay.values())) == 4
    for name in ("lh", "a", "b", "c"):
        proc = net.start(name, [NEBULA, "-config", str(configs[name])], tmp_path / f"nebula-{name}.log")
        _wait_tun(net, name, overlay[name], proc)
    for name in ("a", "b"):  # an "agent" listening on the node's overlay address
        net.start(
            name,
            [sys.executable, "-c",
             "import socket\n"
             f"s = socket.create_server(({overlay[name]!r}, {AGENT_PORT}))\n"
             "while True:\n    s.accept()[0].close()\n"],
            tmp_path / f"agent-{name}.log",
        )  # fmt: skip
    time.sleep(0.3)

    for name in ("a", "b", "c"):
        assert _pings(net, name, overlay["lh"], tries=10), net.logs()
        assert _pings(net, "lh", overlay[name], tries=10), net.logs()
    assert _connects(net, "lh", overlay["a"], AGENT_PORT), net.logs()
    assert _connects(net, "lh", overlay["b"], AGENT_PORT), net.logs()

    # Node B, on the overlay (it reached the lighthouse), reaches neither node A's agent port nor A
    # itself, and A does not reach B's agent either.
    assert not _connects(net, "b", overlay["a"], AGENT_PORT)
    assert not _pings(net, "b", overlay["a"], tries=3)
    assert not _connects(net, "a", overlay["b"], AGENT_PORT)
    # A's ICMP to B is checked against a fresh pair (A, C): nebula's connection tracking keys ICMP
    # without ports, so once B has sent A an echo, B itself lets A's echoes in as its own replies.
    assert not _pings(net, "a", overlay["c"], tries=3)
    # The lighthouse still reaches A: the others were stopped by A's firewall, not by a broken overlay.
    assert _connects(net, "lh", overlay["a"], AGENT_PORT), net.logs()

    # The doctor's overlay check, on node A's tree with A's kernel answering.
    doctor_host = TreeHost(roots["a"], NetnsRunner(net.ns("a")))
    result = run_checks(doctor_host, env={}, only=["overlay"]).get("overlay")
    assert result.status is Status.PASS, result
    assert re.fullmatch(
        rf"overlay up: vectorlay0 holds {re.escape(overlay['a'])}, "
        r"lighthouse 100\.64\.0\.1 answered in [0-9.]+ ms",
        result.message,
    )
    # The lighthouse gone: the check says so within its bound instead of hanging.
    lighthouse_proc = net.procs[0][0]
    lighthouse_proc.terminate()
    lighthouse_proc.wait(timeout=10)
    result = run_checks(doctor_host, env={}, only=["overlay"]).get("overlay")
    assert result.status is Status.WARN, result
    assert (
        result.message
        == f"vectorlay0 holds {overlay['a']}, but lighthouse 100.64.0.1 did not answer within 2 s"
    )
