"""Artifact endpoints, and the install script that fetches the first of them.

The reference control plane serves what an operator (or the release pipeline, or the demo) put in
the `--artifacts DIR` given to `serve`: `DIR/<name>/<version>/<one file>`. The version it offers for
a name is the one `DIR/<name>/current` names (a symlink or a one-line file), else the highest by
natural order. The manifest listing them is built and signed here, with the control plane's own
Ed25519 key (`<state-dir>/manifest-signing.key`, created on first start); nodes pin its public half
from install.sh and from their enrollment, and refuse a manifest it did not sign.

A valid signature alone does not make a manifest current: an old one that was really signed can be
replayed by anything on the path the node trusts (rollback), or a fresh one withheld so the node
never learns of a fix (freeze). TUF's client rules answer both, and the manifest follows them: it
carries a `serial` that grows by one every time the set of served artifacts changes (persisted in
`<state-dir>/manifest-serial.json`, so a restart never goes back) and an `expires_at` a day after
its `issued_at`; a node never accepts a serial below the highest it has accepted, nor an expired
manifest (bootstrap/manifest.py).

Only the `installer` artifact, which install.sh fetches before the node has an identity, is public:
a request without node credentials gets a manifest listing that one alone. Everything else needs an
active node's client certificate and node token.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Flask, Response, request, send_file

from bootstrap.fsutil import atomic_write
from bootstrap.manifest import sign_manifest
from controlplane.clock import Clock, to_iso
from controlplane.errors import NotFound

_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
SIGNING_KEY = "manifest-signing.key"
SIGNING_PUB = "manifest-signing.pub"
SERIAL_FILE = "manifest-serial.json"
# How long a signed manifest may be believed. The update timer asks hourly, so a day leaves room for
# clock skew and outages while bounding how long a withheld update can go unnoticed.
MANIFEST_TTL = timedelta(days=1)
# What install.sh fetches before the node has credentials.
PUBLIC_ARTIFACTS = frozenset({"installer"})
_PLACEHOLDERS = ("@@VECTORLAY_API@@", "@@VECTORLAY_CA_PEM@@", "@@VECTORLAY_MANIFEST_KEY@@")


def load_or_create_signing_key(state_dir: Path) -> Ed25519PrivateKey:
    path = state_dir / SIGNING_KEY
    state_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write(path, pem, mode=0o600)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 key")
    pub = loaded.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not (state_dir / SIGNING_PUB).exists() or (state_dir / SIGNING_PUB).read_bytes() != pub:
        (state_dir / SIGNING_PUB).write_bytes(pub)
    return loaded


def _natural(version: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", version) if p]


class ManifestSerial:
    """The manifest's serial, bumped whenever the served artifact set changes; never goes back.

    Persisted as {"serial": N, "digest": "<hash of the set it numbers>"}, written atomically before
    a manifest with the new serial is handed out, so no node can have seen a serial the file lacks.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SERIAL_FILE
        self._lock = threading.Lock()
        self.serial, self.digest = self._read()

    def _read(self) -> tuple[int, str]:
        if not self.path.exists():
            return 0, ""
        try:
            data = json.loads(self.path.read_text())
            serial, digest = data["serial"], data["digest"]
        except (ValueError, KeyError, TypeError):
            serial = digest = None
        if not (isinstance(serial, int) and serial >= 0 and isinstance(digest, str)):
            raise ValueError(
                f"{self.path} is damaged; it must hold the last manifest serial handed out "
                '({"serial": N, "digest": "..."}); restore it from a backup, or write a serial '
                "higher than any a node has seen"
            )
        return serial, digest

    def for_digest(self, digest: str) -> int:
        # The file, not this process's memory, says where the serial is: the server's worker
        # processes (serve --workers) each hold one of these, and a worker that saw fewer changes
        # of the set than another must not hand out a lower serial for a newer set.
        with self._lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            on_file, stored = self._read()
            serial = max(on_file, self.serial) + (digest != stored)
            if (serial, digest) != (on_file, stored):
                data = json.dumps({"serial": serial, "digest": digest}) + "\n"
                atomic_write(self.path, data.encode(), mode=0o600)
            self.serial, self.digest = serial, digest
            return serial


@dataclass
class ArtifactStore:
    root: Path | None
    key: Ed25519PrivateKey
    serials: ManifestSerial | None = None
    clock: Clock = field(default_factory=Clock)
    _hashes: dict[tuple[str, int, int], str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def public_pem(self) -> str:
        return (
            self.key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def _file(self, name: str, version: str) -> Path | None:
        if (
            self.root is None
            or not (_SAFE.fullmatch(name) and _SAFE.fullmatch(version))
            or version == "current"
        ):
            return None
        files = sorted(p for p in (self.root / name / version).glob("*") if p.is_file())
        return files[0] if len(files) == 1 else None

    def _current(self, name: str) -> str | None:
        assert self.root is not None
        base = self.root / name
        pointer = base / "current"
        if pointer.is_symlink():
            return os.path.basename(os.readlink(pointer))
        if pointer.is_file():
            return pointer.read_text().strip() or None
        versions = [
            p.name for p in base.iterdir() if p.is_dir() and not p.is_symlink() and self._file(name, p.name)
        ]
        return max(versions, key=_natural) if versions else None

    def _sha256(self, path: Path) -> tuple[str, int]:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._hashes.get(key)
        if cached is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            cached = h.hexdigest()
            with self._lock:
                self._hashes[key] = cached
        return cached, st.st_size

    def manifest(self, public_only: bool = False) -> dict[str, Any]:
        """The signed manifest; `public_only`: the one for callers without node credentials."""
        if self.root is None or not self.root.is_dir():
            raise NotFound("this control plane publishes no artifacts")
        entries = []
        for base in sorted(p for p in self.root.iterdir() if p.is_dir() and _SAFE.fullmatch(p.name)):
            version = self._current(base.name)
            path = self._file(base.name, version) if version else None
            if version is None or path is None:
                continue
            sha, size = self._sha256(path)
            entries.append(
                {
                    "name": base.name,
                    "version": version,
                    "url": f"/v1/artifacts/{base.name}/{version}",
                    "sha256": sha,
                    "size": size,
                }
            )
        # Both views share the serial of the full set: a node compares serials, never views.
        digest = hashlib.sha256(
            repr([(e["name"], e["version"], e["sha256"]) for e in entries]).encode()
        ).hexdigest()
        serial = self.serials.for_digest(digest) if self.serials is not None else 1
        if public_only:
            entries = [e for e in entries if e["name"] in PUBLIC_ARTIFACTS]
        now = self.clock.now()
        doc = {
            "version": digest[:16],
            "serial": serial,
            "issued_at": to_iso(now),
            "expires_at": to_iso(now + MANIFEST_TTL),
            "artifacts": entries,
        }
        return sign_manifest(doc, self.key)


def install_script() -> str:
    """install.sh as shipped: beside this package in a checkout, inside it in the wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_data" / "install.sh", here.parent / "install.sh"):
        if candidate.is_file():
            return candidate.read_text()
    raise NotFound("this control plane ships no install.sh")


def render_install_script(api_url: str, ca_pem: str, manifest_key_pem: str) -> str:
    script = install_script()
    for placeholder, value in zip(
        _PLACEHOLDERS, (api_url, ca_pem.strip(), manifest_key_pem.strip()), strict=True
    ):
        if "'" in value:
            raise ValueError(f"refusing to embed a value with a quote for {placeholder}")
        script = script.replace(placeholder, value)
    return script


def register_artifacts(
    app: Flask,
    store: ArtifactStore,
    ca_pem: str,
    public_url: str | None,
    require_node: Callable[[], object],
    has_credentials: Callable[[], bool],
) -> None:
    """`require_node` raises the API's 401/403 unless the request carries an active node's
    credentials; `has_credentials` says whether it carries any at all."""

    @app.get("/v1/artifacts/manifest")
    def manifest() -> Response:
        # Credentials presented are always checked: a removed node is told so, not given the
        # public view.
        public_only = not has_credentials()
        if not public_only:
            require_node()
        return Response(
            json.dumps(store.manifest(public_only)),
            mimetype="application/json",
            headers={"Cache-Control": "no-store"},
        )

    @app.get("/v1/artifacts/<name>/<version>")
    def artifact(name: str, version: str) -> Response:
        if name not in PUBLIC_ARTIFACTS:
            require_node()
        path = store._file(name, version)
        if path is None:
            raise NotFound(f"no artifact {name} {version}")
        return send_file(path, mimetype="application/octet-stream", max_age=0)

    @app.get("/install.sh")
    def install_sh() -> Response:
        # Nodes are told the URL they reached this script at, unless the operator fixed one.
        url = public_url or request.host_url.rstrip("/")
        body = render_install_script(url, ca_pem, store.public_pem)
        return Response(body, mimetype="text/x-shellscript", headers={"Cache-Control": "no-store"})
