"""The node-agent's watcher between heartbeats, on the demo node. Both benchmarks, with their
numbers printed: `.venv/bin/pytest -q -s --benchmark-enable benchmarks/test_bench_watch.py`.

The node is the demo's HGX H100, installed by the real installer against the real control plane on
loopback (tests.install.helpers.installed_demo_node); its node-agent is the installed release, run
by the systemd simulator as the service runs in production (its loop, a 240 s interval).

1. Idle: the agent's CPU (percent of one core) and resident memory over IDLE_S with nothing
   happening, the watcher polling the eight GPU units' sysfs and the kernel log.
2. Failure to withdrawal: a GPU falls off the bus (its config space reads all ones; on even runs the
   kernel log also gets the NVIDIA driver's Xid 79 line, on odd runs only sysfs tells), and the clock
   runs until the control plane's provider listing no longer advertises THAT GPU's unit (its
   `units[].advertised` false) while it still advertises the other seven: one unit withdrawn, not
   the node. Then the GPU comes back, the listing advertises all units again, and the next run
   waits out the debounce's refill so that each run is a first failure, not part of a flapping
   device's burst.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from bootstrap.host import TreeHost
from bootstrap.identity import load_identity
from hostsim import gpufault
from nodeagent import watch
from tests.install.helpers import installed_demo_node

pytestmark = pytest.mark.slow

RUNS = 20
IDLE_S = 30.0
DAEMON_LOG = "run/hostsim/systemd/node-agent.service.log"


class DemoNode:
    def __init__(self, cp: Any, root: Path) -> None:
        self.cp, self.root = cp, root
        self.key = cp.api_key("acme")
        ident = load_identity(TreeHost(root))
        assert ident is not None
        self.node_id = ident.node_id
        self.session = requests.Session()

    def listed(self) -> dict[str, Any]:
        r = self.session.get(
            f"{self.cp.url}/v1/orgs/acme/provider/nodes",
            headers={"Authorization": f"Bearer {self.key}"},
            verify=str(self.cp.ca_file),
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return dict(next(n for n in r.json()["nodes"] if n["node_id"] == self.node_id))

    def advertised(self) -> int:
        return int(self.listed()["gpu_units"]["advertised"])

    def advertised_units(self) -> dict[str, bool]:
        """Each unit's id (its IOMMU group) and whether the listing advertises it."""
        units = self.listed()["units"]
        assert units is not None, "the agent sent no per-unit state"
        return {u["id"]: u["advertised"] for u in units}

    def only_withdrawn(self, unit: str) -> bool:
        """The listing advertises every unit but `unit`."""
        units = self.advertised_units()
        return units[unit] is False and all(a for u, a in units.items() if u != unit)

    def all_advertised(self) -> bool:
        return all(self.advertised_units().values())

    def agent(self) -> psutil.Process:
        words = (self.root / "run/hostsim/systemd/node-agent.service").read_text().split()
        return psutil.Process(int(words[1]))

    def log(self) -> str:
        return (self.root / DAEMON_LOG).read_text()

    def gpus(self) -> dict[str, str]:
        """Each GPU's address and its IOMMU group: its unit's id in the listing."""
        devices = self.root / "sys/bus/pci/devices"
        return {
            d.name: os.readlink(d / "iommu_group").rsplit("/", 1)[-1]
            for d in sorted(devices.iterdir())
            if (d / "vendor").read_text().strip() == "0x10de"
            and (d / "class").read_text().startswith("0x0302")
        }


def _until(what: str, cond: Any, timeout: float = 60.0, step: float = 0.02) -> float:
    """Seconds until `cond()` holds, polled every `step`."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(step)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoNode]:
    base = Path(tempfile.mkdtemp(prefix="vlw", dir="/tmp"))
    try:
        with installed_demo_node(base) as (cp, root, _token):
            node = DemoNode(cp, root)
            _until("all units advertised", lambda: node.advertised() == 8 and node.all_advertised())
            yield node
            assert "Traceback" not in node.log()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.benchmark(group="watch")
def test_bench_node_agent_idle_cpu_and_memory_with_the_watcher(benchmark: Any, demo: DemoNode) -> None:
    agent = demo.agent()

    def measure() -> dict[str, float]:
        time.sleep(2)  # past the start-up heartbeat
        beats = demo.log().count("INFO heartbeat: ")
        t0, cpu0 = time.monotonic(), agent.cpu_times()
        time.sleep(IDLE_S)
        t1, cpu1 = time.monotonic(), agent.cpu_times()
        assert demo.log().count("INFO heartbeat: ") == beats, "a heartbeat during the idle window"
        used = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        return {
            "seconds": t1 - t0,
            "cpu_percent": 100 * used / (t1 - t0),
            "rss_mb": agent.memory_info().rss / 2**20,
        }

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(
        f"\nnode-agent idle with the watcher (8 GPU units, kernel log): "
        f"{result['cpu_percent']:.2f}% of one core over {result['seconds']:.0f} s, "
        f"RSS {result['rss_mb']:.1f} MB"
    )
    assert "cannot read the kernel log" not in demo.log()


@pytest.mark.benchmark(group="watch")
def test_bench_gpu_failure_to_withdrawal_latency(benchmark: Any, demo: DemoNode) -> None:
    gpus = demo.gpus()
    assert len(gpus) == 8 and sorted(gpus.values()) == sorted(demo.advertised_units())
    order = list(gpus)

    def measure() -> dict[str, Any]:
        by_kind: dict[str, list[float]] = {"config+kmsg": [], "config": []}
        rng = random.Random(20)
        for run in range(RUNS):
            gpu = order[run % len(order)]
            unit = gpus[gpu]
            kind = "config+kmsg" if run % 2 == 0 else "config"
            assert demo.all_advertised()
            healthy = gpufault.fall_off_the_bus(demo.root, gpu, kmsg=kind == "config+kmsg")
            by_kind[kind].append(_until("the withdrawal", lambda u=unit: demo.only_withdrawn(u)))
            listed = demo.listed()
            assert listed["verdict"] == "WARN" and listed["gpu_units"]["advertised"] == 7, listed
            gpufault.come_back(demo.root, gpu, healthy)
            _until("the units back", demo.all_advertised)
            # The debounce's bucket holds a heartbeat again: the next run is a first failure. The
            # jitter keeps the failures from falling in step with the agent's polls.
            time.sleep(watch.REFILL_S + rng.uniform(0, 2 * watch.POLL_S))
        every = sorted(by_kind["config+kmsg"] + by_kind["config"])
        return {"latencies": every, **{k: sorted(v) for k, v in by_kind.items()}}

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    every = result["latencies"]
    summary = {
        "runs": len(every),
        "median_s": statistics.median(every),
        "worst_s": max(every),
    }
    benchmark.extra_info.update(summary)
    lines = [
        f"\nGPU off the bus -> control plane stops advertising that unit, the other 7 still advertised "
        f"({len(every)} runs): "
        f"median {summary['median_s']:.2f} s, worst {summary['worst_s']:.2f} s"
    ]
    for kind in ("config+kmsg", "config"):
        v = result[kind]
        lines.append(
            f"  {kind:<12} ({len(v)} runs): median {statistics.median(v):.2f} s, worst {max(v):.2f} s, "
            f"all: {' '.join(f'{x:.2f}' for x in v)}"
        )
    print("\n".join(lines))
    assert demo.log().count("heartbeat now") >= 2 * RUNS
