"""Artifact endpoints: the manifest and the files it names.

The reference control plane serves whatever an operator (or the artifact builder) put in the
`--artifacts DIR` given to `serve`: `DIR/manifest.json` verbatim and `DIR/<name>/<version>/<file>`
as bytes. Without a directory, or before a manifest exists, the manifest is 404.
"""

from __future__ import annotations

import re
from pathlib import Path

from flask import Flask, Response, send_file

from controlplane.service import ApiError

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def register_artifacts(app: Flask, artifacts_dir: Path | None) -> None:
    @app.get("/v1/artifacts/manifest")
    def manifest() -> Response:
        if artifacts_dir is None or not (artifacts_dir / "manifest.json").is_file():
            raise ApiError(404, "NOT_FOUND", "this control plane publishes no artifacts")
        return send_file(artifacts_dir / "manifest.json", mimetype="application/json", max_age=0)

    @app.get("/v1/artifacts/<name>/<version>")
    def artifact(name: str, version: str) -> Response:
        if artifacts_dir is None or not (_SAFE.match(name) and _SAFE.match(version)):
            raise ApiError(404, "NOT_FOUND", f"no artifact {name} {version}")
        files = sorted(p for p in (artifacts_dir / name / version).glob("*") if p.is_file())
        if len(files) != 1:
            raise ApiError(404, "NOT_FOUND", f"no artifact {name} {version}")
        return send_file(files[0], mimetype="application/octet-stream", max_age=0)
