"""The node's load, read with psutil from the host's /proc and the disk VMs live on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from bootstrap.host import Host


@dataclass(frozen=True)
class CpuSample:
    busy: float
    total: float


@contextmanager
def _procfs(host: Host) -> Iterator[None]:
    old = psutil.PROCFS_PATH
    psutil.PROCFS_PATH = str(host.path("/proc"))
    try:
        yield
    finally:
        psutil.PROCFS_PATH = old


def cpu_sample(host: Host) -> CpuSample:
    with _procfs(host):
        t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t)
    return CpuSample(total - idle, total)


def cpu_percent(before: CpuSample | None, now: CpuSample) -> float:
    """Busy share since the previous sample, or since boot for the first one."""
    if before is not None and now.total > before.total:
        busy, total = now.busy - before.busy, now.total - before.total
    else:
        busy, total = now.busy, now.total
    return round(min(100.0, max(0.0, 100.0 * busy / total)), 1) if total > 0 else 0.0


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def read_resources(
    host: Host, disk_path: str, previous: CpuSample | None
) -> tuple[dict[str, float], CpuSample]:
    """cpu/memory/disk percentages and the sizes behind them; the CPU sample for the next call."""
    sample = cpu_sample(host)
    with _procfs(host):
        mem = psutil.virtual_memory()
    disk = psutil.disk_usage(str(_existing(host.path(disk_path))))
    return (
        {
            "cpu_percent": cpu_percent(previous, sample),
            "memory_percent": round(float(mem.percent), 1),
            "disk_percent": round(float(disk.percent), 1),
            "memory_total_bytes": float(mem.total),
            "memory_available_bytes": float(mem.available),
            "disk_free_bytes": float(disk.free),
        },
        sample,
    )
