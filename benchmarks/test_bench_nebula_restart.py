"""How long the overlay is down when an update restarts nebula on a node, with the real nebula.

Two nebula processes in network namespaces created (and removed) here: the control plane's side
(a lighthouse, as the Nomad servers reach a node) and a node. An update changes nebula's binary, so
the node's nebula is restarted (`systemctl restart nebula`: SIGTERM, then the new process); SIGHUP,
nebula's reload, re-reads the configuration and certificates but cannot change the binary. Measured,
per round: from the SIGTERM to the first echo reply that crosses the tunnel again, pinged from the
control plane's side (every ping waits at most 0.2 s), and the same for a SIGHUP reload, which must
not drop the tunnel at all. Reported in extra_info (`make bench`, or this file with
--benchmark-enable); without --benchmark-enable each is run once as a test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.overlay.nebula_pair import MISSING, Underlay, host_config, make_ca, sign, underlay

pytestmark = pytest.mark.skipif(
    MISSING is not None, reason=f"{MISSING} (.ci/run runs as root and installs them)"
)

LH, NODE = "100.64.0.1", "100.64.0.2"
UNDERLAY = {"lh": "192.0.2.1", "node": "192.0.2.2"}
ROUNDS = 5


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Underlay, Path]]:
    work = tmp_path_factory.mktemp("nebula")
    make_ca(work)
    sign(work, "lh", f"{LH}/10")
    sign(work, "node", f"{NODE}/10")
    configs = {
        "lh": host_config(work, "lh", lighthouse=None, lighthouse_underlay=UNDERLAY["lh"]),
        "node": host_config(work, "node", lighthouse=LH, lighthouse_underlay=UNDERLAY["lh"]),
    }
    with underlay(work) as u:
        for name, address in UNDERLAY.items():
            u.attach(name, address)
        u.start_nebula("lh", configs["lh"], LH)
        u.start_nebula("node", configs["node"], NODE)
        assert _until_reply(u, deadline_s=20) is not None, u.logs()
        yield u, configs["node"]


def _until_reply(u: Underlay, deadline_s: float = 60) -> float | None:
    """Seconds until an echo from the control plane's side crosses the tunnel; None if never."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if u.ping("lh", NODE, wait=0.2):
            return time.monotonic() - start
    return None


def _outage(u: Underlay, node_config: Path, how: str) -> float:
    assert u.ping("lh", NODE), u.logs()
    start = time.monotonic()
    if how == "restart":
        u.stop_nebula("node")
        u.start_nebula("node", node_config, NODE)
    else:
        u.reload_nebula("node")
    waited = _until_reply(u)
    assert waited is not None, f"the tunnel never came back after a {how}\n{u.logs()}"
    return time.monotonic() - start


@pytest.mark.parametrize("how", ["restart", "reload"])
def test_bench_nebula_tunnel_outage(benchmark: Any, pair: tuple[Underlay, Path], how: str) -> None:
    u, node_config = pair
    outages: list[float] = []
    benchmark.pedantic(lambda: outages.append(_outage(u, node_config, how)), rounds=ROUNDS, iterations=1)
    benchmark.extra_info["outage_s"] = [round(o, 3) for o in outages]
    benchmark.extra_info["max_outage_s"] = round(max(outages), 3)
