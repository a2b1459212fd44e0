"""Load and footprint of the heartbeat (`make bench`, or this file with --benchmark-enable).

1. The reference control plane taking heartbeats from 200 enrolled nodes over 16 concurrent clients,
   each heartbeat with its node's own client certificate and token and the body a node-agent sends
   (the doctor's JSON, the load, the agents' versions). Every heartbeat opens a new TCP + TLS
   connection, which the server closes after the answer, as for a real node beating every 240 s.
   Like the node-agent (bootstrap.api), each node resumes its last TLS 1.3 session: after one full
   mTLS handshake per node in the warm-up, the figure is the cost of a resumed handshake plus a
   heartbeat, not of a full handshake. The server runs as it would on this machine's 2 cores:
   `serve --workers 2`, two processes on one port.
   The load generator runs on the same cores as the server, so it writes its HTTP/1.1 request and
   reads the answer itself, over a socket wrapped by the node's own SSL context from bootstrap.api
   (the same trust set, client certificate and resumption), rather than through requests or
   http.client, whose overhead per heartbeat is the agent's, once per interval, not the control
   plane's. Reported: heartbeats per second, p50/p99 latency, the server's CPU time per heartbeat
   (all its processes: its capacity per core, whatever the client) and the load generator's.
2. The real node-agent daemon (the artifact built from this repository) on the demo node, beating
   every second: its resident memory (VmHWM) and the CPU time one heartbeat costs it (doctor run,
   psutil, mTLS POST, status.json).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bootstrap.api import ApiClient, ClientCert
from bootstrap.enroll import enroll
from bootstrap.host import TreeHost
from bootstrap.identity import load_identity
from controlplane import testing

NODES = 200
CLIENTS = 16
ROUNDS = 10  # heartbeats per node
WORKERS = 2  # server processes: this machine's cores
BODY: dict[str, Any] = {
    "doctor": {
        "verdict": "PASS",
        "checks": [
            {"name": n, "status": "PASS", "message": f"{n} fine", "hint": None}
            for n in (
                "agents",
                "autoupdate",
                "kvm",
                "iommu",
                "gpu_units",
                "wedged",
                "disk",
                "memory",
                "identity",
            )
        ],
        "gpu_units": {"ready": 0, "total": 0},
    },
    "resources": {
        "cpu_percent": 12.5,
        "memory_percent": 40.0,
        "disk_percent": 30.0,
        "memory_total_bytes": 2.2e12,
        "memory_available_bytes": 1.3e12,
        "disk_free_bytes": 8e10,
        "thresholds": {"cpu_percent": 90, "memory_percent": 85, "disk_percent": 90},
    },
    "agents": {"nebula": "1.9.5", "nomad": "1.8.4", "node-agent": "1.0.0"},
    "draining": False,
    "interval_s": 240,
}


def _percentile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[idx]


def _run_load(cp: testing.RunningControlPlane, roots: list[Path]) -> dict[str, float]:
    url = urlsplit(cp.url)
    assert url.hostname is not None and url.port is not None
    host, port = url.hostname, url.port
    payload = json.dumps(BODY).encode()
    clients = []
    for r in roots:
        ident = load_identity(TreeHost(r))
        assert ident is not None
        api = ApiClient(cp.url, ca_file=cp.ca_file, client_cert=ClientCert(ident.cert_file, ident.key_file))
        head = (
            f"POST /v1/node/heartbeat HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            f"Authorization: Bearer {ident.node_token()}\r\n\r\n"
        )
        clients.append((api._context(), head.encode() + payload))
    resumed_before = sum(ctx.resumed for ctx, _ in clients)  # type: ignore[attr-defined]

    def beat(i: int) -> None:
        ctx, request = clients[i]
        with ctx.wrap_socket(socket.create_connection((host, port), timeout=30), server_hostname=host) as tls:
            tls.sendall(request)
            status, answer = _read_response(tls)
        assert status == 200 and answer["status"] == "active", answer

    # One warm-up heartbeat per node: its one full mTLS handshake, then a session to resume.
    for i in range(len(clients)):
        beat(i)
    resumed_warm = sum(ctx.resumed for ctx, _ in clients)  # type: ignore[attr-defined]
    server_cpu0 = _server_cpu_s(cp.proc.pid)
    client_cpu0 = _self_cpu_s()
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    work = iter([i for _ in range(ROUNDS) for i in range(len(clients))])
    busy = [threading.Lock() for _ in clients]

    def client() -> None:
        while True:
            with lock:
                i = next(work, None)
            if i is None:
                return
            with busy[i]:
                t0 = time.perf_counter()
                try:
                    beat(i)
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
    server_cpu = _server_cpu_s(cp.proc.pid) - server_cpu0
    client_cpu = _self_cpu_s() - client_cpu0
    resumed = sum(ctx.resumed for ctx, _ in clients) - resumed_warm  # type: ignore[attr-defined]
    assert not errors, errors[:3]
    lat = sorted(latencies)
    return {
        "heartbeats": len(lat),
        "wall_s": wall,
        "heartbeats_per_s": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * _percentile(lat, 0.99),
        "max_ms": 1000 * lat[-1],
        "server_cpu_ms_per_heartbeat": 1000 * server_cpu / len(lat),
        "client_cpu_ms_per_heartbeat": 1000 * client_cpu / len(lat),
        "resumed_handshakes": resumed,
        "warmup_resumed_handshakes": resumed_warm - resumed_before,
    }


@pytest.mark.benchmark(group="heartbeat")
def test_bench_heartbeats_from_200_nodes_over_16_concurrent_clients(benchmark: Any, tmp_path: Path) -> None:
    with testing.running(tmp_path / "cp", args=("--workers", str(WORKERS))) as cp:
        cp.org("load", node_quota=NODES)
        shm = Path("/dev/shm")
        nodes_dir = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else tmp_path))
        roots = [nodes_dir / f"node-{i}" for i in range(NODES)]
        try:
            for r in roots:
                r.mkdir()
                api = ApiClient(cp.url, ca_file=cp.ca_file, attempts=1)
                enroll(TreeHost(r), api, cp.token("load"), gpu_mode="none", hardware={})
                api.close()
            result = benchmark.pedantic(_run_load, args=(cp, roots), rounds=1, iterations=1)
        finally:
            shutil.rmtree(nodes_dir, ignore_errors=True)
        benchmark.extra_info.update(result)
        print(
            f"\n{result['heartbeats']:.0f} heartbeats from {NODES} nodes, {CLIENTS} clients: "
            f"{result['heartbeats_per_s']:.1f} heartbeats/s, p50 {result['p50_ms']:.1f} ms, "
            f"p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms; "
            f"{result['resumed_handshakes']:.0f} resumed TLS handshakes; "
            f"server CPU {result['server_cpu_ms_per_heartbeat']:.2f} ms per heartbeat, "
            f"load generator CPU {result['client_cpu_ms_per_heartbeat']:.2f} ms"
        )
        assert result["heartbeats"] == NODES * ROUNDS
        # Each heartbeat a new connection: every one resumed, none rode a kept-alive connection.
        assert result["resumed_handshakes"] == NODES * ROUNDS
        assert result["warmup_resumed_handshakes"] == 0


def _read_response(tls: ssl.SSLSocket) -> tuple[int, Any]:
    """Status and JSON body of the one HTTP/1.1 answer on `tls` (Content-Length framed, as the
    control plane sends it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, f"connection closed mid-answer: {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(":", 1) for line in lines[1:])
    length = int(next(v for k, v in headers.items() if k.lower() == "content-length"))
    while len(body) < length:
        chunk = tls.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), json.loads(body)


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _server_cpu_s(pid: int) -> float:
    """CPU time of the server process and of its worker processes (serve --workers)."""
    children = [
        int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()
    ]
    return _proc_cpu_s(pid) + sum(_proc_cpu_s(c) for c in children)


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@pytest.mark.benchmark(group="heartbeat")
def test_bench_node_agent_memory_and_cpu_per_heartbeat_on_the_demo_node(benchmark: Any) -> None:
    from hostsim import inject
    from tests.install.helpers import installed_demo_node

    base = Path(tempfile.mkdtemp(prefix="vlb", dir="/tmp"))
    try:
        with installed_demo_node(base) as (_cp, root, _token):
            # The installed daemon beats every 240 s; this one, the same release, every second.
            state = root / "run/hostsim/systemd/node-agent.service"
            os.kill(int(state.read_text().split()[1]), signal.SIGTERM)
            time.sleep(1)
            log_path = base / "agent.log"
            with log_path.open("wb") as log:
                agent = subprocess.Popen(
                    [
                        str(root / "opt/vectorlay/releases/node-agent/current/bin/node-agent"),
                        "--root",
                        str(root),
                    ],
                    env={**inject.env(), "VECTORLAY_ADVERTISE_INTERVAL": "1"},
                    stdout=log,
                    stderr=log,
                )
            # This process is node-agent.service now (the doctor's `agents` check asks the simulator).
            state.write_text(f"active {agent.pid}\n")
            try:

                def beats() -> int:
                    return log_path.read_text().count("heartbeat: active, 8 GPU unit(s) advertised")

                def measure() -> dict[str, float]:
                    deadline = time.monotonic() + 120
                    while beats() < 2:
                        assert time.monotonic() < deadline and agent.poll() is None, log_path.read_text()[
                            -2000:
                        ]
                        time.sleep(0.05)
                    n0, cpu0 = beats(), _proc_cpu_s(agent.pid)
                    while beats() < n0 + 10:
                        time.sleep(0.05)
                    n1, cpu1 = beats(), _proc_cpu_s(agent.pid)
                    return {
                        "heartbeats": n1 - n0,
                        "cpu_ms_per_heartbeat": 1000 * (cpu1 - cpu0) / (n1 - n0),
                        "rss_mb": _proc_kb(agent.pid, "VmRSS") / 1024,
                        "peak_rss_mb": _proc_kb(agent.pid, "VmHWM") / 1024,
                    }

                result = benchmark.pedantic(measure, rounds=1, iterations=1)
            finally:
                agent.send_signal(signal.SIGTERM)
                agent.wait(timeout=30)
            benchmark.extra_info.update(result)
            print(
                f"\nnode-agent on the demo node: {result['cpu_ms_per_heartbeat']:.1f} ms CPU per heartbeat "
                f"(over {result['heartbeats']:.0f}), RSS {result['rss_mb']:.1f} MB "
                f"(peak {result['peak_rss_mb']:.1f} MB)"
            )
            assert "Traceback" not in log_path.read_text()
    finally:
        shutil.rmtree(base, ignore_errors=True)
