"""Stand-in agent artifacts: real tarballs holding a real daemon, for tests, the demo and the VM.

The daemon behaves the way the installer expects vectorlay's agents to: it runs until SIGTERM,
answers a health probe on a unix socket in its runtime directory, and on SIGUSR1 stops accepting
new work, drains, and says so (`drained` on the socket and a `drained` file). A version built with
`broken=True` exits at once, which is what an upgrade that fails its health check looks like.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

from bootstrap.update import SERVICES

# The agents the installer runs as services; their names come from the product, not a copy.
AGENTS = tuple(SERVICES)

DAEMON = r'''#!/usr/bin/env python3
"""Stand-in for the vectorlay agent {name} {version} (built by hostsim.agents)."""
import os
import signal
import socket
import sys
import time

NAME, VERSION, BROKEN = {name!r}, {version!r}, {broken!r}

if "--version" in sys.argv:
    print(f"{{NAME}} {{VERSION}}")
    sys.exit(0)
if BROKEN:
    sys.stderr.write(f"{{NAME}} {{VERSION}}: fatal: cannot start\n")
    sys.exit(1)

root = os.environ.get("VECTORLAY_ROOT", "/")
rundir = os.path.join(root, "run", "vectorlay-" + NAME)
os.makedirs(rundir, exist_ok=True)
sock_path = os.path.join(rundir, "health.sock")
drained_path = os.path.join(rundir, "drained")
for stale in (sock_path, drained_path):
    try:
        os.unlink(stale)
    except FileNotFoundError:
        pass

state = {{"draining": False, "stop": False}}


def drain(signum, frame):
    state["draining"] = True
    # No in-flight sessions in a stand-in: drained at once, announced the way the updater waits for.
    with open(drained_path, "w") as f:
        f.write(VERSION + "\n")


def stop(signum, frame):
    state["stop"] = True


signal.signal(signal.SIGUSR1, drain)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)

srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sock_path)
srv.listen(8)
srv.settimeout(0.2)
while not state["stop"]:
    try:
        conn, _ = srv.accept()
    except (socket.timeout, InterruptedError):
        continue
    with conn:
        status = "drained" if state["draining"] else "ok"
        conn.sendall(f"{{status}} {{NAME}} {{VERSION}} {{os.getpid()}}\n".encode())
srv.close()
os.unlink(sock_path)
'''


@dataclass(frozen=True)
class BuiltArtifact:
    name: str
    version: str
    path: Path
    sha256: str
    size: int


def daemon_script(name: str, version: str, broken: bool = False) -> str:
    return DAEMON.format(name=name, version=version, broken=broken)


def agent_tarball(name: str, version: str, broken: bool = False) -> bytes:
    """A reproducible .tar.gz with bin/<name> (mtime 0, root-owned), like a release pipeline makes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin",):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        data = daemon_script(name, version, broken).encode()
        info = tarfile.TarInfo(f"bin/{name}")
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
    import gzip

    return gzip.compress(raw.getvalue(), mtime=0)


def publish(
    artifacts_dir: Path, name: str, version: str, data: bytes, filename: str | None = None
) -> BuiltArtifact:
    """Place an artifact where the reference control plane serves it: DIR/<name>/<version>/<file>."""
    d = artifacts_dir / name / version
    d.mkdir(parents=True, exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    path = d / (filename or f"{name}-{version}.tar.gz")
    path.write_bytes(data)
    return BuiltArtifact(name, version, path, hashlib.sha256(data).hexdigest(), len(data))


def publish_agents(
    artifacts_dir: Path, versions: dict[str, str] | None = None, broken: frozenset[str] = frozenset()
) -> list[BuiltArtifact]:
    versions = versions or {name: "1.0.0" for name in AGENTS}
    return [
        publish(artifacts_dir, n, v, agent_tarball(n, v, n in broken)) for n, v in sorted(versions.items())
    ]
