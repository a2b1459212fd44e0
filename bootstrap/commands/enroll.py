"""`vectorlay-bootstrap enroll`: preflight the token, then enroll or re-enroll this node."""

from __future__ import annotations

import logging
from pathlib import Path

from bootstrap.api import ApiClient, proxy_from_env
from bootstrap.errors import VectorlayError
from bootstrap.hardware import hardware_report
from bootstrap.host import open_host
from bootstrap.identity import identity_path
from bootstrap.paths import IDENTITY_DIR
from bootstrap.settings import load_settings

log = logging.getLogger(__name__)


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
    api = ApiClient(
        api_url,
        ca_file=ca_file,
        pinned_ca=identity_path(host) / "ca.crt",
        proxy=proxy_from_env(fallback=settings.proxy),
    )
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
