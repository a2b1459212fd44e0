"""Load: 500 enrollments against the SQLite-backed control plane from 16 concurrent clients.

Each client does what a node does: generates its key pair and CSR, opens its own TLS connection,
enrolls, writes its identity atomically and confirms it over mTLS. Reported: enrollments per second
and latency percentiles (`make bench`, or this file with --benchmark-enable).

The 500 node roots live on tmpfs when there is one: real nodes fsync their identity to their own
disks, and 500 of them sharing this machine's one disk would measure that disk, not the control
plane. The control plane's database stays on the ordinary disk with synchronous=FULL.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bootstrap.api import ApiClient
from bootstrap.enroll import enroll
from bootstrap.host import TreeHost
from controlplane import testing

pytestmark = pytest.mark.slow

NODES = 500
CLIENTS = 16


def _percentile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[idx]


def _run_load(cp: testing.RunningControlPlane, roots: list[Path], tokens: list[str]) -> dict[str, float]:
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    work = iter(range(len(roots)))

    def client() -> None:
        while True:
            with lock:
                i = next(work, None)
            if i is None:
                return
            api = ApiClient(cp.url, ca_file=cp.ca_file, attempts=1)
            t0 = time.perf_counter()
            try:
                enroll(TreeHost(roots[i]), api, tokens[i], gpu_mode="none", hardware={})
            except BaseException as e:
                with lock:
                    errors.append(e)
                continue
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    assert not errors, errors[:3]
    lat = sorted(latencies)
    return {
        "enrollments": len(lat),
        "wall_s": wall,
        "enrollments_per_s": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * _percentile(lat, 0.99),
        "max_ms": 1000 * lat[-1],
    }


@pytest.mark.benchmark(group="enroll")
def test_bench_500_enrollments_from_16_concurrent_clients(benchmark: Any, tmp_path: Path) -> None:
    with testing.running(tmp_path / "cp") as cp:
        cp.org("load", node_quota=NODES)
        tokens = [cp.token("load") for _ in range(NODES)]
        shm = Path("/dev/shm")
        nodes_dir = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else tmp_path))
        roots = [nodes_dir / f"node-{i}" for i in range(NODES)]
        for r in roots:
            r.mkdir()
        try:
            result = benchmark.pedantic(_run_load, args=(cp, roots, tokens), rounds=1, iterations=1)
        finally:
            shutil.rmtree(nodes_dir, ignore_errors=True)
        benchmark.extra_info.update(result)
        print(
            f"\n{result['enrollments']:.0f} enrollments, {CLIENTS} clients: "
            f"{result['enrollments_per_s']:.1f} enrollments/s, p50 {result['p50_ms']:.1f} ms, "
            f"p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms"
        )
        assert result["enrollments"] == NODES
        assert len(cp.admin.org_summary("load")["nodes"]) == NODES
