"""`vectorlay-bootstrap wait-overlay`: nomad.service's ExecStartPre, until nebula's tun holds the overlay IP.

Nomad binds the node's overlay address; started before nebula has configured its device it fails
to bind. nebula 1.6 does not tell systemd when it is ready (no sd_notify), so nomad's unit waits for
the condition itself: the device up and holding the address node.json names. The wait is bounded;
at the deadline the unit fails and systemd's Restart= tries again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bootstrap.errors import VectorlayError
from bootstrap.host import Host, open_host
from bootstrap.identity import IdentityError, load_identity
from bootstrap.overlay import TUN_DEVICE, Interface, OverlayProbeError, interface

POLL_S = 0.25


def _state(found: Interface | None, ip: str) -> str:
    if found is None:
        return f"{TUN_DEVICE} does not exist"
    if not found.up:
        return f"{TUN_DEVICE} is down"
    if not found.holds(ip):
        held = ", ".join(str(a) for a in found.addresses) or "no IPv4 address"
        return f"{TUN_DEVICE} holds {held}, not {ip}"
    return f"{TUN_DEVICE} is up with {ip}"


def wait_overlay(
    host: Host,
    *,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Return once the tun device is up with the overlay IP; VectorlayError at the timeout."""
    try:
        ident = load_identity(host)
    except IdentityError as e:
        raise VectorlayError(e.message, e.hint) from None
    if ident is None:
        raise VectorlayError("not enrolled: no overlay IP to wait for", "run the install one-liner")
    deadline = clock() + timeout
    while True:
        try:
            found = interface(host)
        except OverlayProbeError as e:
            raise VectorlayError(str(e), "install iproute2 (the `ip` command)") from None
        state = _state(found, ident.overlay_ip)
        if found is not None and found.up and found.holds(ident.overlay_ip):
            return state
        left = deadline - clock()
        if left <= 0:
            raise VectorlayError(
                f"overlay not ready after {timeout:g}s: {state}",
                "systemctl status nebula; journalctl -u nebula -n 50",
            )
        sleep(min(POLL_S, left))


def run_wait_overlay(root: Path, *, timeout: float, host: Host | None = None) -> int:
    print(wait_overlay(host or open_host(root), timeout=timeout), flush=True)
    return 0
