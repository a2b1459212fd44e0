"""What the control plane is told about the node's hardware at enrollment, and the passthrough gate
that keeps a node whose GPUs cannot run a VM from enrolling with them."""

from __future__ import annotations

import contextlib

from bootstrap.discovery import UnitStatus, discover
from bootstrap.errors import VectorlayError
from bootstrap.host import Host
from bootstrap.settings import load_settings


def hardware_report(host: Host, gpu_mode: str) -> dict[str, object]:
    """What the control plane is told about the hardware of a node enrolling in `gpu_mode` (the
    run's, bootstrap.resolve.gpu_mode).

    Refuses passthrough while no GPU unit can be passed through: the node is never enrolled
    advertising GPUs that cannot run a VM (the install command's gpu stage fixes that first).
    """
    inv = discover(host, load_settings(host))
    report: dict[str, object] = dict(inv.to_json())
    with contextlib.suppress(OSError, ValueError, RuntimeError):
        report["memory_bytes"] = host.memory_total_bytes()
    ready = sum(1 for u in inv.units if u.status is UnitStatus.READY)
    if gpu_mode == "passthrough" and inv.units and not ready:
        raise VectorlayError(
            f"GPU passthrough is not working yet: 0/{len(inv.units)} GPU unit(s) ready; not enrolling",
            "run the install one-liner (it sets up passthrough and asks for a reboot), "
            "or choose VECTORLAY_GPU_MODE=container or none",
        )
    if gpu_mode == "container":
        # Units are IOMMU groups, what passthrough rents; a container-mode node shares its GPUs
        # (listed under "gpus") through runsc and may have no IOMMU at all, and the control plane
        # keys units by group.
        report["units"], report["nvswitch_units"] = [], []
    return report
