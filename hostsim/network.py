"""`ip` and `ping` simulators for host trees: nebula's tun device and the overlay behind it.

The tree plays the kernel the way real nebula would make it: while nebula.service is active and its
config (/etc/vectorlay/nebula/config.yml) names a readable certificate, the config's tun device
exists, is up, and holds the certificate's address (nebula takes the address from the certificate,
never from the config). `ip link set dev D down|up` changes the link as on a real box.

Behind the device, the hosts of the config's `static_host_map` (the lighthouses) answer pings
unless `block_underlay` has cut them off: what a firewall dropping UDP to the lighthouse looks like.
Link and underlay state live under /run/hostsim/net/, lost at a simulated reboot like all of /run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bootstrap.host import CommandResult, Host, RecordingRunner
from bootstrap.overlay import NEBULA_CONFIG
from bootstrap.paths import IDENTITY_DIR, IDENTITY_FILES, IDENTITY_SECRETS
from hostsim.systemd import Systemd, active_state

STATE_DIR = "/run/hostsim/net"
LIGHTHOUSE_RTT_MS = 12.3


def _state(host: Host, name: str) -> Path:
    return host.path(f"{STATE_DIR}/{name}")


def block_underlay(host: Host, blocked: bool = True) -> None:
    """Drop (or again pass) every packet to the overlay's peers: no lighthouse answers."""
    path = _state(host, "underlay-blocked")
    if blocked:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("1\n")
    else:
        path.unlink(missing_ok=True)


def _nebula_config(host: Host) -> dict[str, Any]:
    try:
        # libyaml's loader where PyYAML has it: the simulated ping reads this on every call, and the
        # pure-Python loader was a quarter of a simulated node-agent heartbeat's CPU.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        data = yaml.load(host.path(NEBULA_CONFIG).read_text(), Loader=loader)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _tun(host: Host) -> tuple[str, str] | None:
    """(device, address/prefix) of the running nebula, None when nebula has no device up."""
    sim = host.runner.handlers.get("systemctl") if isinstance(host.runner, RecordingRunner) else None
    if active_state(host, "nebula.service", sim if isinstance(sim, Systemd) else None) != "active":
        return None
    config = _nebula_config(host)
    dev = (config.get("tun") or {}).get("dev")
    cert_path = (config.get("pki") or {}).get("cert")
    if not isinstance(dev, str) or not isinstance(cert_path, str) or not cert_path.startswith("/"):
        return None
    from bootstrap.nebula import NebulaCertError, parse_certificate_pem

    try:
        cert = parse_certificate_pem(host.path(cert_path).read_bytes())
    except (OSError, NebulaCertError):
        return None  # real nebula exits on an unreadable certificate: no device
    if not cert.ips:
        return None
    return dev, str(cert.ips[0])


def _link_down(host: Host, dev: str) -> bool:
    return _state(host, f"{dev}.down").exists()


def ip(host: Host, argv: tuple[str, ...]) -> CommandResult:
    args = [a for a in argv[1:] if a != "-j"]
    if args[:2] == ["link", "set"] and len(args) >= 5 and args[2] == "dev" and args[4] in ("up", "down"):
        dev, updown = args[3], args[4]
        path = _state(host, f"{dev}.down")
        if updown == "down":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("1\n")
        else:
            path.unlink(missing_ok=True)
        return CommandResult(argv, 0)
    if args[:2] in (["addr", "show"], ["address", "show"]) and len(args) == 4 and args[2] == "dev":
        dev = args[3]
        tun = _tun(host)
        if tun is None or tun[0] != dev:
            return CommandResult(argv, 1, "", f'Device "{dev}" does not exist.\n')
        local, prefix = tun[1].split("/")
        up = not _link_down(host, dev)
        flags = ["POINTOPOINT", "MULTICAST", "NOARP", *(["UP", "LOWER_UP"] if up else [])]
        entry = {
            "ifindex": 7,
            "ifname": dev,
            "flags": flags,
            "mtu": 1300,
            "operstate": "UNKNOWN" if up else "DOWN",
            "link_type": "none",
            "addr_info": [
                {"family": "inet", "local": local, "prefixlen": int(prefix), "scope": "global", "label": dev}
            ],
        }
        return CommandResult(argv, 0, json.dumps([entry]) + "\n")
    return CommandResult(argv, 1, "", f"hostsim ip: unsupported: {' '.join(argv[1:])}\n")


def ping(host: Host, argv: tuple[str, ...]) -> CommandResult:
    args = list(argv[1:])
    dev = args[args.index("-I") + 1] if "-I" in args else None
    target = args[-1]
    header = f"PING {target} ({target}) 56(84) bytes of data.\n"
    lost = (
        f"\n--- {target} ping statistics ---\n"
        "1 packets transmitted, 0 received, 100% packet loss, time 0ms\n\n"
    )
    tun = _tun(host)
    if tun is None or (dev is not None and dev != tun[0]):
        return CommandResult(argv, 2, "", f"ping: SO_BINDTODEVICE {dev}: No such device\n")
    peers = _nebula_config(host).get("static_host_map") or {}
    if _link_down(host, tun[0]) or _state(host, "underlay-blocked").exists() or target not in peers:
        return CommandResult(argv, 1, header + lost)
    rtt = LIGHTHOUSE_RTT_MS
    return CommandResult(
        argv,
        0,
        header
        + f"64 bytes from {target}: icmp_seq=1 ttl=64 time={rtt} ms\n\n"
        + f"--- {target} ping statistics ---\n1 packets transmitted, 1 received, 0% packet loss, time 0ms\n"
        + f"rtt min/avg/max/mdev = {rtt}/{rtt}/{rtt}/0.000 ms\n",
    )


def install(runner: RecordingRunner) -> RecordingRunner:
    """Register the simulators on `runner` (returned for chaining)."""
    runner.handlers["ip"] = ip
    runner.handlers["ping"] = ping
    return runner


def enroll_overlay(
    host: Host,
    *,
    overlay_ip: str = "100.64.0.2",
    lighthouses: dict[str, list[str]] | None = None,
    nebula_running: bool = True,
) -> None:
    """An enrolled node's overlay side in a tree, without a control plane: the identity files
    (real nebula ones, from a throw-away CA), the product's nebula config, nebula.service's state."""
    import ipaddress
    import os
    from datetime import datetime, timezone

    from bootstrap.nebula import generate_keypair
    from bootstrap.overlay import NODE_GROUP, TUN_DEVICE
    from bootstrap.templating import render
    from controlplane.nebula_ca import NebulaCA
    from hostsim.systemd import set_active_state

    now = datetime.now(timezone.utc)
    ca = NebulaCA.load_or_create(host.path("/var/lib/hostsim/nebula-ca"), now)
    private, public = generate_keypair()
    cert = ca.sign(
        public.decode(),
        name="node",
        ip=ipaddress.IPv4Interface(f"{overlay_ip}/10"),
        groups=[NODE_GROUP],
        now=now,
    )
    ident = host.path(IDENTITY_DIR)
    ident.mkdir(parents=True, exist_ok=True)
    os.chmod(ident, 0o700)
    files = {
        "nebula.key": private,
        "nebula.crt": cert.encode(),
        "nebula-ca.crt": ca.ca_pem.encode(),
        "node.json": json.dumps({"node_id": "node_1", "org_id": "org_1", "overlay_ip": overlay_ip}).encode(),
    }
    for name in {*IDENTITY_FILES, *files}:
        path = ident / name
        path.write_bytes(files.get(name, b"placeholder\n"))
        os.chmod(path, 0o600 if name in IDENTITY_SECRETS or name == "nebula.key" else 0o644)
    lighthouses = {"100.64.0.1": ["203.0.113.10:4242"]} if lighthouses is None else lighthouses
    nebula = {
        "lighthouses": [{"overlay_ip": ip, "endpoints": eps} for ip, eps in lighthouses.items()],
        "listen_port": 4242,
    }
    config = host.path(NEBULA_CONFIG)
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        render("nebula-config.yml.j2", nebula=nebula, identity_dir=IDENTITY_DIR, tun_device=TUN_DEVICE)
    )
    set_active_state(host, "nebula.service", "active" if nebula_running else "inactive")
