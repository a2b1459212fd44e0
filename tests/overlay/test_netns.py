"""The real nebula over a real (namespaced) network: a lighthouse from `overlay-host`, nodes from the
product's own files, each in its own network namespace.

Underlay: namespaces joined by veth pairs to a bridge in a fourth namespace (192.0.2.0/24). Overlay:
the lighthouse (group vectorlay-control) at 100.64.0.1, node A at .2 and node B at .3 (group
vectorlay-node), their configs rendered from the product's template and their keys made by the
node-side code. What the firewall must hold: the lighthouse and each node reach each other; node B
reaches neither node A's agent port nor node A itself, and node A does not reach B.

Needs root (namespaces) and Debian's nebula; .ci/run provides both.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bootstrap import nebula
from bootstrap.host import CommandResult, Host
from bootstrap.identity import IDENTITY_DIR, REQUIRED_FILES
from bootstrap.overlay import NEBULA_CONFIG, NODE_GROUP, TUN_DEVICE
from bootstrap.templating import render
from controlplane import cli as cp_cli
from doctor.checks import run_checks
from doctor.model import Status

NEBULA = shutil.which("nebula")
IP = shutil.which("ip")
AGENT_PORT = 4646  # Nomad's HTTP API on the node's overlay address

pytestmark = pytest.mark.skipif(
    (os.geteuid() != 0 or NEBULA is None or IP is None) and not os.environ.get("CI"),
    reason="needs root, nebula and iproute2 (.ci/run runs as root and installs them)",
)


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


def _node_root(tmp: Path, ca_state: Path, name: str, overlay_ip: str, lighthouse_underlay: str) -> Path:
    """A host tree holding a node's identity and nebula config as the product makes them: the key
    pair made by the node-side code, the certificate from the control plane's CA, the config from
    the agents stage's template (pointing at the tree's real paths, since nebula runs for real)."""
    from controlplane.nebula_ca import NebulaCA

    ca = NebulaCA.load_or_create(ca_state, datetime.now(timezone.utc))
    root = tmp / name
    identity = root / IDENTITY_DIR.lstrip("/")
    identity.mkdir(parents=True, mode=0o700)
    for placeholder in REQUIRED_FILES:  # the X.509 and Nomad files the doctor's overlay check ignores
        (identity / placeholder).write_text("placeholder\n")
        (identity / placeholder).chmod(0o600)
    (identity / "node.json").write_text(
        json.dumps({"node_id": name, "org_id": "org", "overlay_ip": overlay_ip})
    )
    private, public = nebula.generate_keypair()
    (identity / "nebula.key").write_bytes(private)
    (identity / "nebula.key").chmod(0o600)
    (identity / "nebula.crt").write_text(
        ca.sign(
            public.decode(),
            name=name,
            ip=ipaddress.IPv4Interface(f"{overlay_ip}/10"),
            groups=[NODE_GROUP],
            now=datetime.now(timezone.utc),
        )
    )
    (identity / "nebula-ca.crt").write_text(ca.ca_pem)
    answer = {
        "overlay_cidr": "100.64.0.0/10",
        "overlay_ip": overlay_ip,
        "lighthouses": [{"overlay_ip": "100.64.0.1", "endpoints": [f"{lighthouse_underlay}:4242"]}],
        "groups": [NODE_GROUP],
        "listen_port": 4242,
    }
    config = root / NEBULA_CONFIG.lstrip("/")
    config.parent.mkdir(parents=True)
    config.write_text(
        render("nebula-config.yml.j2", nebula=answer, identity_dir=str(identity), tun_device=TUN_DEVICE)
    )
    return root


@dataclass
class NetnsRunner:
    """The doctor's commands (`ip`, `ping`) run inside a node's namespace: its kernel, its tun device."""

    ns: str

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
    net: Net, tmp_path: Path
) -> None:
    assert NEBULA is not None
    state = tmp_path / "cp-state"
    lh_out = tmp_path / "lighthouse"
    with pytest.raises(SystemExit) as done:
        cp_cli.main(
            ["overlay-host", "--state-dir", str(state), "--name", "lighthouse", "--overlay-ip", "100.64.0.1",
             "--out", str(lh_out), "--lighthouse"]
        )  # fmt: skip
    assert done.value.code in (0, None)

    underlay = {"lh": "192.0.2.1", "a": "192.0.2.2", "b": "192.0.2.3", "c": "192.0.2.4"}
    overlay = {"lh": "100.64.0.1", "a": "100.64.0.2", "b": "100.64.0.3", "c": "100.64.0.4"}
    for name, address in underlay.items():
        _attach(net, name, address)
    configs = {"lh": lh_out / "config.yml"}
    roots = {}
    for name in ("a", "b", "c"):
        roots[name] = _node_root(tmp_path, state, f"node-{name}", overlay[name], underlay["lh"])
        configs[name] = roots[name] / NEBULA_CONFIG.lstrip("/")
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
    doctor_host = Host(roots["a"], NetnsRunner(net.ns("a")))
    result = run_checks(doctor_host, env={}, only=["overlay"]).get("overlay")
    assert result.status is Status.PASS, result
    assert re.fullmatch(
        r"overlay up: vectorlay0 holds 100\.64\.0\.2, lighthouse 100\.64\.0\.1 answered in [0-9.]+ ms",
        result.message,
    )
    # The lighthouse gone: the check says so within its bound instead of hanging.
    lighthouse_proc = net.procs[0][0]
    lighthouse_proc.terminate()
    lighthouse_proc.wait(timeout=10)
    result = run_checks(doctor_host, env={}, only=["overlay"]).get("overlay")
    assert result.status is Status.WARN, result
    assert (
        result.message == "vectorlay0 holds 100.64.0.2, but lighthouse 100.64.0.1 did not answer within 2 s"
    )
