"""Builds real artifact tarballs and signed manifests for the tests."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bootstrap.manifest import sign_manifest

DAEMON = """#!/usr/bin/env python3
# A stand-in agent: prints its version, or serves until killed.
import sys, time
VERSION = {version!r}
if "--version" in sys.argv:
    print(VERSION)
    sys.exit(0)
while True:
    time.sleep(3600)
"""


def make_tarball(name: str, version: str, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        files = {f"bin/{name}": DAEMON.format(version=version).encode(), **(extra or {})}
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def manifest_for(
    blobs: dict[tuple[str, str], bytes],
    key: Ed25519PrivateKey,
    version: str = "1",
    *,
    serial: int = 1,
    expires_in: timedelta = timedelta(days=1),
) -> dict[str, Any]:
    arts = [
        {
            "name": name,
            "version": ver,
            "url": f"/v1/artifacts/{name}/{ver}",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
        for (name, ver), data in sorted(blobs.items())
    ]
    now = datetime.now(timezone.utc)
    doc = {
        "version": version,
        "serial": serial,
        "issued_at": _iso(min(now, now + expires_in) - timedelta(seconds=1)),
        "expires_at": _iso(now + expires_in),
        "artifacts": arts,
    }
    return sign_manifest(doc, key)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


class DirectoryDownloader:
    """Serves /v1/artifacts/<name>/<version> from a directory: a local mirror, counting fetches."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fetched: list[str] = []

    def put(self, name: str, version: str, data: bytes) -> None:
        p = self.root / name / version
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    @contextmanager
    def stream(self, url: str, *, size: int | None = None) -> Iterator[Iterable[bytes]]:
        self.fetched.append(url)
        path = self.root / url.removeprefix("/v1/artifacts/")
        with open(path, "rb") as f:
            yield iter(lambda: f.read(4096), b"")
