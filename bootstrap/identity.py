"""The node's durable identity under /etc/vectorlay/identity/, replaced as one atomic switch.

Layout: `/etc/vectorlay/identity` is a symlink to a generation directory next to it
(`/etc/vectorlay/.identity-<id>/`, 0700) holding

    node.key         0600  the node's private key (generated here, never leaves the box)
    node.crt         0644  its client certificate, signed by the control plane's CA
    ca.crt           0644  the control plane's CA, pinned at enrollment
    node-token       0600  the durable node token
    node.json        0644  node_id, org_id, overlay_ip, api
    nebula.key       0600  the node's X25519 overlay key (made here, never leaves the box)
    nebula.crt       0644  its nebula certificate (nebula's own format): the overlay IP, group
    nebula-ca.crt    0644  the nebula CA nebula checks every peer against
    nomad.key        0600  the node's Nomad TLS key (made here)
    nomad.crt        0644  its certificate: client.<region>.nomad, the overlay IP, 127.0.0.1
    nomad-ca.crt     0644  the CA Nomad checks the servers against
    enrollment.json  0644  what the agents stage needs (nebula, nomad), no secrets

A new identity is written completely into a fresh generation directory and fsynced; then the
symlink is renamed over (`rename(2)` is atomic), and only then is the old generation removed. A
crash at any point therefore leaves `identity` pointing at a complete directory, the old or the new.
Readers that follow the symlink never see a mix either.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bootstrap.errors import VectorlayError
from bootstrap.fsutil import atomic_symlink, fault_point, fsync_dir, read_regular
from bootstrap.host import Host
from bootstrap.paths import IDENTITY_DIR, IDENTITY_FILES, IDENTITY_LEGACY, IDENTITY_SECRETS

_GEN_PREFIX = ".identity-"
_LEGACY = IDENTITY_LEGACY


# The writer's fault points (bootstrap.fsutil), in order, each named `enroll <point>`. The tests kill
# the process at each of them.
WRITE_POINTS = (
    "generation-created",
    "wrote:node.key",
    "wrote:node.crt",
    "wrote:ca.crt",
    "wrote:nebula.key",
    "wrote:nebula.crt",
    "wrote:nebula-ca.crt",
    "wrote:nomad.key",
    "wrote:nomad.crt",
    "wrote:nomad-ca.crt",
    "wrote:node-token",
    "wrote:node.json",
    "wrote:enrollment.json",
    "generation-synced",
    "switched",
    "old-removed",
)

REENROLL_HINT = "re-enroll the node with a new token (vectorlay-bootstrap enroll)"


class IdentityError(VectorlayError):
    pass


ENROLLMENT_LIMIT = 1 << 20
# Far above the control plane's tokens (vnt_ and 43 characters); a bearer token is one short line.
NODE_TOKEN_LIMIT = 4096


def read_node_token(directory: Path) -> str:
    """The node token in `directory`, checked before it goes into an Authorization header: one line
    of printable ASCII (RFC 6750's b64token is narrower still). Its content is never shown: a damaged
    token is still mostly a secret. Raises IdentityError when it is unreadable, empty or damaged."""
    where = f"{IDENTITY_DIR}/node-token"
    try:
        raw = read_regular(directory / "node-token", NODE_TOKEN_LIMIT + 1).strip()
    except OSError as e:
        raise IdentityError(f"cannot read {where}: {e.strerror or e}", REENROLL_HINT) from None
    if not raw:
        raise IdentityError(f"{where} is empty", REENROLL_HINT)
    if len(raw) > NODE_TOKEN_LIMIT or not all(0x21 <= b <= 0x7E for b in raw):
        raise IdentityError(
            f"{where} is damaged: a node token is one line of printable ASCII, this file is not "
            "(its content is not shown)",
            REENROLL_HINT,
        )
    return raw.decode("ascii")


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# The top-level fields whose type the stages rely on; what is inside `nebula` and `nomad` is checked
# where it is used (the agents stage).
_ENROLLMENT_SHAPE: dict[str, Callable[[Any], bool]] = {
    "nebula": lambda v: isinstance(v, dict),
    "nomad": lambda v: isinstance(v, dict),
    "manifest_keys": _str_list,
    "gpu_mode": lambda v: isinstance(v, str),
    "hostname": lambda v: isinstance(v, str),
}


@dataclass(frozen=True)
class Identity:
    """The identity in force, as node.json describes it."""

    path: Path  # the identity directory as seen through the symlink
    node_id: str
    org_id: str
    overlay_ip: str
    api: str | None

    @property
    def key_file(self) -> Path:
        return self.path / "node.key"

    @property
    def cert_file(self) -> Path:
        return self.path / "node.crt"

    @property
    def ca_file(self) -> Path:
        return self.path / "ca.crt"

    @property
    def token_file(self) -> Path:
        return self.path / "node-token"

    def node_token(self) -> str:
        return read_node_token(self.path)

    def enrollment(self) -> dict[str, Any]:
        """The non-secret enrollment data (nebula, nomad) saved for the agents stage; {} when the
        identity predates it. Raises IdentityError when it is damaged: the agents' configs are made
        from it, and a wrong type there must stop the run with a message, not a traceback."""
        import json

        where = f"{IDENTITY_DIR}/enrollment.json"
        try:
            data = json.loads(read_regular(self.path / "enrollment.json", ENROLLMENT_LIMIT))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as e:
            raise IdentityError(f"{where} is unreadable: {e}", REENROLL_HINT) from None
        if not isinstance(data, dict):
            raise IdentityError(f"{where} must hold a JSON object", REENROLL_HINT)
        for key, want in _ENROLLMENT_SHAPE.items():
            if key in data and data[key] is not None and not want(data[key]):
                raise IdentityError(f"{where}: {key} has the wrong type", REENROLL_HINT)
        return data


@dataclass(frozen=True)
class OverlayFiles:
    """The node's nebula and Nomad credentials: keys made on the node, certificates from the enrollment."""

    nebula_key_pem: bytes
    nebula_cert_pem: bytes
    nebula_ca_pem: bytes
    nomad_key_pem: bytes
    nomad_cert_pem: bytes
    nomad_ca_pem: bytes


@dataclass(frozen=True)
class NewIdentity:
    """Everything enrollment returned, to be written as one new generation."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    node_token: str
    node: dict[str, Any]  # node.json
    enrollment: dict[str, Any]  # enrollment.json; must hold no secret
    overlay: OverlayFiles


def missing_files(directory: Path) -> list[str]:
    """The identity files `directory` does not hold as regular files, in IDENTITY_FILES' order."""
    return [name for name in IDENTITY_FILES if not (directory / name).is_file()]


def secret_modes(directory: Path) -> list[tuple[str, int, int]]:
    """Each secret's name, permission bits and owner uid: what the writer and the doctor judge."""
    out = []
    for name in IDENTITY_SECRETS:
        st = (directory / name).stat()
        out.append((name, stat.S_IMODE(st.st_mode), st.st_uid))
    return out


def identity_path(host: Host) -> Path:
    return host.path(IDENTITY_DIR, follow=False)


def load_identity(host: Host) -> Identity | None:
    """The identity in force, None if the node was never enrolled.

    Raises IdentityError when one exists but is damaged (a file missing or unreadable, a secret
    readable by others): the doctor reports it and re-enrollment repairs it.
    """
    path = identity_path(host)
    if not path.exists():
        legacy = path.parent / _LEGACY
        if path.is_symlink() or not legacy.is_dir():
            if path.is_symlink():
                raise IdentityError(f"{IDENTITY_DIR} points at a missing directory", REENROLL_HINT)
            return None
        path = legacy
    dir_mode = path.stat().st_mode & 0o777
    if dir_mode & 0o077:
        raise IdentityError(
            f"{IDENTITY_DIR} is open to others (mode {dir_mode:04o})", f"chmod 700 {IDENTITY_DIR}"
        )
    missing = missing_files(path)
    if missing:
        raise IdentityError(
            f"{IDENTITY_DIR} is incomplete: {', '.join(missing)} missing",
            REENROLL_HINT,
        )
    for name, mode, _uid in secret_modes(path):
        if mode & 0o077:
            raise IdentityError(
                f"{IDENTITY_DIR}/{name} is readable by others (mode {mode:04o})",
                f"chmod 600 {IDENTITY_DIR}/{name}",
            )
    read_node_token(path)
    import json  # here, not at the top: a node that is not enrolled yet never reads any

    try:
        node = json.loads(read_regular(path / "node.json", ENROLLMENT_LIMIT))
    except (OSError, ValueError, RecursionError) as e:
        raise IdentityError(f"{IDENTITY_DIR}/node.json is unreadable: {e}", REENROLL_HINT) from None
    if not isinstance(node, dict):
        raise IdentityError(f"{IDENTITY_DIR}/node.json must hold a JSON object", REENROLL_HINT)
    for key in ("node_id", "org_id", "overlay_ip"):
        if not isinstance(node.get(key), str) or not node[key]:
            raise IdentityError(f"{IDENTITY_DIR}/node.json: {key} is missing or not a string", REENROLL_HINT)
    try:
        ipaddress.ip_address(node["overlay_ip"])
    except ValueError:
        raise IdentityError(
            f"{IDENTITY_DIR}/node.json: overlay_ip {node['overlay_ip'][:40]!r} is not an IP address",
            REENROLL_HINT,
        ) from None
    api = node.get("api")
    return Identity(
        path=path,
        node_id=node["node_id"],
        org_id=node["org_id"],
        overlay_ip=node["overlay_ip"],
        api=api if isinstance(api, str) else None,
    )


def _owner_root(fd: int) -> None:
    if os.geteuid() == 0:
        with contextlib.suppress(PermissionError):
            os.fchown(fd, 0, 0)


def _write_file(directory: Path, name: str, data: bytes, mode: int) -> None:
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        _owner_root(fd)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_generation(link: Path) -> str | None:
    try:
        return os.readlink(link)
    except (FileNotFoundError, OSError):
        return None


def remove_stale_generations(host: Host) -> list[str]:
    """Delete generation directories `identity` does not point at (left by an interrupted write)."""
    link = identity_path(host)
    keep = _current_generation(link)
    removed: list[str] = []
    if not link.parent.is_dir():
        return removed
    for entry in sorted(link.parent.iterdir()):
        # atomic_symlink's own temporary link (".identity.<pid>.tmp") can be left by a kill, too.
        stale_link = entry.name.startswith(".identity.") and entry.name.endswith(".tmp")
        stale_gen = entry.name.startswith(_GEN_PREFIX) and entry.name not in (keep, _LEGACY)
        if stale_link:
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
        elif stale_gen:
            import shutil

            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        fsync_dir(link.parent)
    return removed


def enroll_point(point: str) -> None:
    """A fault point of the enrollment (ENROLL_POINTS, WRITE_POINTS) under its `enroll <point>` name."""
    fault_point(f"enroll {point}")


def write_identity(host: Host, new: NewIdentity) -> Identity:
    """Replace the node's identity with `new` in one atomic switch (see the module docstring)."""
    # json, logging, secrets and shutil only here: the doctor and the node-agent read the identity on
    # every run and never write it.
    import json
    import logging
    import secrets
    import shutil

    hook = enroll_point
    link = identity_path(host)
    parent = link.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_generations(host)
    if link.is_dir() and not link.is_symlink():
        # A plain directory cannot be renamed over atomically; move it aside once, then switch.
        os.rename(link, parent / _LEGACY)
        atomic_symlink(_LEGACY, link)

    gen_name = f"{_GEN_PREFIX}{datetime.now().strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
    gen = parent / gen_name
    os.mkdir(gen, 0o700)
    with contextlib.suppress(PermissionError):
        if os.geteuid() == 0:
            os.chown(gen, 0, 0)
    os.chmod(gen, 0o700)
    hook("generation-created")

    node_json = json.dumps(new.node, indent=2, sort_keys=True) + "\n"
    enrollment_json = json.dumps(new.enrollment, indent=2, sort_keys=True) + "\n"
    if new.node_token in enrollment_json or new.node_token in node_json:
        raise ValueError("node.json/enrollment.json must not contain the node token")
    ov = new.overlay
    for name, data, mode in (
        ("node.key", new.key_pem, 0o600),
        ("node.crt", new.cert_pem, 0o644),
        ("ca.crt", new.ca_pem, 0o644),
        ("nebula.key", ov.nebula_key_pem, 0o600),
        ("nebula.crt", ov.nebula_cert_pem, 0o644),
        ("nebula-ca.crt", ov.nebula_ca_pem, 0o644),
        ("nomad.key", ov.nomad_key_pem, 0o600),
        ("nomad.crt", ov.nomad_cert_pem, 0o644),
        ("nomad-ca.crt", ov.nomad_ca_pem, 0o644),
        ("node-token", (new.node_token + "\n").encode(), 0o600),
        ("node.json", node_json.encode(), 0o644),
        ("enrollment.json", enrollment_json.encode(), 0o644),
    ):
        _write_file(gen, name, data, mode)
        hook(f"wrote:{name}")
    fsync_dir(gen)
    fsync_dir(parent)
    hook("generation-synced")

    atomic_symlink(gen_name, link)  # the commit point
    hook("switched")
    remove_stale_generations(host)
    legacy = parent / _LEGACY
    if legacy.is_dir():
        shutil.rmtree(legacy, ignore_errors=True)
    hook("old-removed")

    identity = load_identity(host)
    assert identity is not None
    logging.getLogger(__name__).info("identity of node %s written to %s", identity.node_id, IDENTITY_DIR)
    return identity
