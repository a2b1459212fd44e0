"""`vectorlay-bootstrap decommission`: the CLI form of the provider docs' curl PATCH."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from bootstrap.api import ApiClient
from bootstrap.errors import VectorlayError

API_KEY_ENV = "VL_KEY"


def run_decommission(api_url: str, org: str, node_id: str, ca_file: Path | None) -> None:
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise VectorlayError(
            f"no API key: set {API_KEY_ENV} in the environment",
            f"export {API_KEY_ENV}=<your API key> (it is never taken on the command line)",
        )
    if ca_file is not None and not ca_file.is_file():
        raise VectorlayError(
            f"--ca-file {ca_file} does not exist", "give the control plane's CA certificate (PEM)"
        )
    api = ApiClient(api_url, ca_file=ca_file)
    try:
        result = api.request(
            "PATCH",
            f"/v1/orgs/{quote(org, safe='')}/provider/nodes/{quote(node_id, safe='')}",
            json={"status": "removed"},
            bearer=key,
        )
    finally:
        api.close()
    freed = result.get("units_freed") if isinstance(result, dict) else None
    suffix = f"; {freed} GPU unit(s) freed" if isinstance(freed, int) else ""
    print(f"node {node_id} removed{suffix}. Re-running the install one-liner on it brings it back.")
