"""Real nebula processes in network namespaces this module creates and removes: an underlay of
namespaces joined by veth pairs to a bridge namespace (192.0.2.0/24), certificates from the real
`nebula-cert`, and a minimal config per host. For tests and benchmarks that need the tunnel itself
(the product's own configs are tested in tests/overlay/test_netns.py).

Needs root (namespaces), iproute2 and Debian's nebula.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NEBULA = shutil.which("nebula")
NEBULA_CERT = shutil.which("nebula-cert")
IP = shutil.which("ip")
MISSING = (
    "needs root, nebula, nebula-cert and iproute2"
    if os.geteuid() != 0 or None in (NEBULA, NEBULA_CERT, IP)
    else None
)
TUN = "vlbench0"
PORT = 4242


def sh(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {proc.stdout}{proc.stderr}")
    return proc


@dataclass
class Underlay:
    tag: str
    work: Path
    namespaces: list[str] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def ns(self, name: str) -> str:
        return f"vl{self.tag}-{name}"

    def _add(self, name: str) -> str:
        ns = self.ns(name)
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def attach(self, name: str, address: str) -> None:
        """A namespace for `name` with one leg on the bridge, at underlay `address`/24."""
        ns = self._add(name)
        outer, inner = f"vl{self.tag}{name}o"[:15], f"vl{self.tag}{name}i"[:15]
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", outer, "netns", self.ns("br"))
        sh("ip", "link", "set", inner, "netns", ns)
        sh("ip", "-n", self.ns("br"), "link", "set", outer, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inner)
        sh("ip", "-n", ns, "link", "set", inner, "up")

    def exec(
        self, name: str, *argv: str, check: bool = True, timeout: float = 20
    ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns(name), *argv, check=check, timeout=timeout)

    def log(self, name: str) -> Path:
        return self.work / f"nebula-{name}.log"

    def start_nebula(
        self, name: str, config: Path, overlay_ip: str, tun: str = TUN
    ) -> subprocess.Popen[bytes]:
        assert NEBULA is not None
        with self.log(name).open("ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(name), NEBULA, "-config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        self._wait_tun(name, overlay_ip, proc, tun)
        return proc

    def stop_nebula(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)  # systemd's stop of nebula.service (KillSignal's default)
        proc.wait(timeout=20)

    def reload_nebula(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGHUP)  # ExecReload of nebula.service

    def _wait_tun(self, name: str, overlay_ip: str, proc: subprocess.Popen[bytes], tun: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"nebula in {name} exited with {proc.returncode}\n{self.logs()}")
            addr = self.exec(name, "ip", "-o", "addr", "show", "dev", tun, check=False)
            link = self.exec(name, "ip", "-o", "link", "show", "dev", tun, check=False)
            if f" {overlay_ip}/" in addr.stdout and ",UP" in link.stdout:
                return
            time.sleep(0.05)
        raise AssertionError(f"{tun} in {name} never held {overlay_ip}\n{self.logs()}")

    def ping(self, src: str, dst: str, wait: float = 1.0) -> bool:
        return self.exec(src, "ping", "-n", "-c", "1", "-W", str(wait), dst, check=False).returncode == 0

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.work.glob("nebula-*.log"))
        )


@contextmanager
def underlay(work: Path) -> Iterator[Underlay]:
    """A bridge namespace; `attach` adds hosts. Everything it made is removed on the way out."""
    u = Underlay(tag=str(os.getpid() % 100000), work=work)
    try:
        br = u._add("br")
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", br, "link", "set", "br0", "up")
        yield u
    finally:
        for proc in u.procs.values():
            proc.terminate()
        for proc in u.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for ns in reversed(u.namespaces):
            sh("ip", "netns", "del", ns, check=False)


def make_ca(work: Path) -> None:
    assert NEBULA_CERT is not None
    sh(
        NEBULA_CERT,
        "ca",
        "-name",
        "bench",
        "-out-crt",
        str(work / "ca.crt"),
        "-out-key",
        str(work / "ca.key"),
    )


def sign(work: Path, name: str, overlay: str, groups: str = "") -> None:
    """`name`.crt/`name`.key, signed by make_ca's CA for `overlay` (address/prefix)."""
    assert NEBULA_CERT is not None
    args = [NEBULA_CERT, "sign", "-ca-crt", str(work / "ca.crt"), "-ca-key", str(work / "ca.key")]
    args += [
        "-name",
        name,
        "-ip",
        overlay,
        "-out-crt",
        str(work / f"{name}.crt"),
        "-out-key",
        str(work / f"{name}.key"),
    ]
    if groups:
        args += ["-groups", groups]
    sh(*args)


def host_config(
    work: Path,
    name: str,
    *,
    lighthouse: str | None,
    lighthouse_underlay: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A config for host `name`: a lighthouse when `lighthouse` is None, else a host that uses it."""
    config: dict[str, Any] = {
        "pki": {
            "ca": str(work / "ca.crt"),
            "cert": str(work / f"{name}.crt"),
            "key": str(work / f"{name}.key"),
        },
        "static_host_map": {} if lighthouse is None else {lighthouse: [f"{lighthouse_underlay}:{PORT}"]},
        "lighthouse": {
            "am_lighthouse": lighthouse is None,
            "interval": 60,
            "hosts": [] if lighthouse is None else [lighthouse],
        },
        "listen": {"host": "0.0.0.0", "port": PORT},
        "punchy": {"punch": True},
        "tun": {"dev": TUN, "mtu": 1300},
        "logging": {"level": "info", "format": "text"},
        "firewall": {
            "outbound": [{"port": "any", "proto": "any", "host": "any"}],
            "inbound": [{"port": "any", "proto": "any", "host": "any"}],
        },
        **(extra or {}),
    }
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
