"""The node's side of the overlay as the kernel sees it: nebula's tun device and what answers on it.

Read through the host's runner (`ip -j addr`, `ping`), so a tree host answers from its simulators
exactly as a booted box answers from its kernel. Nothing here imports `cryptography`: the doctor
calls it on every run.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass

from bootstrap.host import Host

TUN_DEVICE = "vectorlay0"
NEBULA_CONFIG = "/etc/vectorlay/nebula/config.yml"
NODE_GROUP = "vectorlay-node"
CONTROL_GROUP = "vectorlay-control"
PING_TIMEOUT_S = 2

_RTT = re.compile(r"\btime[=<]([0-9.]+) ?ms\b")


class OverlayProbeError(Exception):
    """The interface could not be asked about (no `ip`, unreadable answer)."""


@dataclass(frozen=True)
class Interface:
    name: str
    up: bool
    addresses: tuple[ipaddress.IPv4Interface, ...]

    def holds(self, ip: str) -> bool:
        return any(str(a.ip) == ip for a in self.addresses)


def interface(host: Host, dev: str = TUN_DEVICE) -> Interface | None:
    """The device's state, None when it does not exist."""
    res = host.run(["ip", "-j", "addr", "show", "dev", dev], timeout=5)
    if not res.ok:
        text = (res.stderr or res.stdout).strip()
        if "does not exist" in text:
            return None
        raise OverlayProbeError(f"ip addr show dev {dev}: {text or f'exit status {res.returncode}'}")
    try:
        entries = json.loads(res.stdout or "[]")
        if not entries:
            return None
        entry = entries[0]
        flags = entry.get("flags") or []
        addresses = tuple(
            ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
            for a in entry.get("addr_info") or []
            if a.get("family") == "inet"
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise OverlayProbeError(f"ip addr show dev {dev}: unreadable answer ({e})") from None
    return Interface(str(entry.get("ifname", dev)), "UP" in flags, addresses)


def ping_ms(host: Host, ip: str, *, dev: str = TUN_DEVICE, timeout_s: int = PING_TIMEOUT_S) -> float | None:
    """Round-trip time of one ICMP echo to `ip` through `dev`, None without an answer in time."""
    res = host.run(["ping", "-n", "-c", "1", "-W", str(timeout_s), "-I", dev, ip], timeout=timeout_s + 3)
    if not res.ok:
        return None
    m = _RTT.search(res.stdout)
    return float(m.group(1)) if m else None
