"""`vectorlay-bootstrap enroll`: preflight the token, then enroll or re-enroll this node."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from bootstrap.api import ApiClient
from bootstrap.discovery import UnitStatus, discover
from bootstrap.errors import VectorlayError
from bootstrap.host import Host, open_host
from bootstrap.identity import IDENTITY_DIR, identity_path
from bootstrap.settings import load_settings

log = logging.getLogger(__name__)


def hardware_report(host: Host, settings_gpu_mode: str | None) -> tuple[str, dict[str, object]]:
    """The gpu mode to enroll with and what the control plane is told about the hardware.

    Refuses passthrough while no GPU unit can be passed through: the node is never enrolled
    advertising GPUs that cannot run a VM (the install command's gpu stage fixes that first).
    """
    inv = discover(host, load_settings(host))
    report: dict[str, object] = dict(inv.to_json())
    with contextlib.suppress(OSError, ValueError, RuntimeError):
        report["memory_bytes"] = host.memory_total_bytes()
    gpu_mode = settings_gpu_mode or ("passthrough" if inv.gpus else "none")
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
    return gpu_mode, report


def run_enroll(root: Path, api_url: str | None, ca_file: Path | None, token_file: Path | None) -> None:
    from rich.console import Console

    from bootstrap.enroll import enroll, introspect_token, read_token, token_refused

    console = Console(stderr=True)
    host = open_host(root)
    settings = load_settings(host)
    api_url = api_url or settings.api
    if not api_url:
        raise VectorlayError(
            "no control plane URL", "pass --api https://... or set api: in /etc/vectorlay/node.yaml"
        )
    if ca_file is not None and not ca_file.is_file():
        raise VectorlayError(
            f"--ca-file {ca_file} does not exist", "give the control plane's CA certificate (PEM)"
        )
    gpu_mode, hardware = hardware_report(host, settings.gpu_mode)
    token = read_token(token_file)
    api = ApiClient(api_url, ca_file=ca_file, pinned_ca=identity_path(host) / "ca.crt")
    try:
        info = introspect_token(api, token)
    finally:
        api.close()
    if not info.valid:
        raise token_refused(api.base_url, info.reason)
    if info.expires_at is not None:
        console.print(f"provisioning token valid until {info.expires_at.isoformat(timespec='seconds')}")
    result = enroll(host, api, token, gpu_mode=gpu_mode, hardware=hardware)
    verb = "re-enrolled" if result.reenrolled else "enrolled"
    print(f"{verb} node {result.node_id} (org {result.org_id}, overlay IP {result.overlay_ip})")
    console.print(f"identity written to {IDENTITY_DIR}")
