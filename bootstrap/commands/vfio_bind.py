"""`vectorlay-bootstrap vfio-bind`: what vectorlay-vfio-bind.service runs at boot (and on restart)."""

from __future__ import annotations

from pathlib import Path

from bootstrap import platform
from bootstrap.discovery import discover
from bootstrap.errors import VectorlayError
from bootstrap.host import Host, open_host
from bootstrap.settings import load_settings
from bootstrap.vfio import DEFAULT_TIMEOUT, BindResult, bind_all


def run_bind(host: Host, *, timeout: float = DEFAULT_TIMEOUT) -> BindResult:
    inv = discover(host, load_settings(host), with_names=False)
    if (inv.gpus or inv.nvswitches) and not inv.iommu.active:
        raise VectorlayError(
            "the IOMMU is off: no GPU can be bound to vfio-pci",
            "reboot with the IOMMU arguments (vectorlay-bootstrap install --only gpu); if it stays off, "
            f"{platform.firmware_iommu_hint(inv.cpu.vendor or inv.iommu.vendor)}",
        )
    return bind_all(host, inv, timeout=timeout, log=lambda m: print(m, flush=True))


def run_vfio_bind(root: Path, *, timeout: float = DEFAULT_TIMEOUT, host: Host | None = None) -> int:
    host = host or open_host(root)
    result = run_bind(host, timeout=timeout)
    for s in result.skipped:
        print(f"not bound: {s.reason}")
    for addr in result.already:
        print(f"{addr}: on vfio-pci")
    for addr in result.bound:
        print(f"{addr}: bound to vfio-pci")
    for addr, why in result.failed:
        print(f"{addr}: FAILED: {why}")
    if result.failed:
        raise VectorlayError(
            f"{len(result.failed)} function(s) did not bind to vfio-pci",
            "see the lines above; 'sudo systemctl restart vectorlay-vfio-bind' retries, a reboot binds "
            "them before any host driver",
        )
    return 0
