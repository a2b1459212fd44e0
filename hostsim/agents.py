"""Agent artifacts for tests, the demo and the VM: the real node-agent, and stand-ins for the rest.

`node-agent` is vectorlay's own and is built from this repository (`node_agent_tarball`): the
`nodeagent` package's files under `lib/`, stamped with the release's version, and `bin/node-agent`,
a launcher that runs them on the node's Python (/opt/vectorlay/venv, found from the release
directory, so a release unpacked under a host root runs the same way).

nebula and nomad are other projects' binaries. nomad's stand-in is hostsim.nomad_standin, which
behaves as Nomad documents (stop signals, leave_on_*, drain_on_shutdown, allocations that a drain
stops and an in-place restart re-attaches). nebula's is a small daemon that runs until SIGTERM or
SIGINT, reloads on SIGHUP and answers a health probe on a unix socket in its runtime directory; like
nebula it knows nothing of vectorlay's SIGUSR1 drain, which is the node-agent's alone. A version
built with `broken=True` exits at once, which is what an upgrade that fails its health check looks
like (for node-agent too).
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import nodeagent
from bootstrap.update import SERVICES
from hostsim import nomad_standin

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
try:
    os.unlink(sock_path)
except FileNotFoundError:
    pass

state = {{"stop": False}}


def stop(signum, frame):
    state["stop"] = True


def reload(signum, frame):
    print(f"{{NAME}} {{VERSION}}: reloaded configuration", flush=True)


signal.signal(signal.SIGHUP, reload)
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
        conn.sendall(f"ok {{NAME}} {{VERSION}} {{os.getpid()}}\n".encode())
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


NODE_AGENT_LAUNCHER = r"""#!/bin/sh
# vectorlay node-agent {version}: this release's code (lib/) on the node's Python. The venv is found
# from the release directory (/opt/vectorlay/releases/node-agent/<version> -> /opt/vectorlay/venv).
release=$(cd -- "$(dirname -- "$(readlink -f -- "$0")")/.." && pwd) || exit 1
python="$release/../../../venv/bin/python"
if [ ! -x "$python" ]; then
    echo "node-agent {version}: $python is missing: re-run the install one-liner" >&2
    exit 1
fi
# -E -s: the service's code and its dependencies are the release's and the venv's, whatever the
# environment says; -B: a release directory stays exactly what was verified against the manifest.
exec "$python" -E -s -B "$release/lib/node-agent.py" "$@"
"""
BROKEN_LAUNCHER = """#!/bin/sh
echo "node-agent {version}: fatal: cannot start" >&2
exit 1
"""
# Run as a script, so that its directory (lib/) comes first on sys.path. The launcher's -E hides
# PYTHONPATH, hence hostsim's sitecustomize, from the agent: where hostsim is importable anyway (the
# project's own venv, which the simulated tree's venv is) the agent takes the test machinery the
# HOSTSIM_* variables ask for (the simulating host its doctor checks run on); in a venv install.sh
# built it runs as on a box.
NODE_AGENT_MAIN = """import importlib

try:
    importlib.import_module("hostsim.inject").install_from_env()
except ImportError:
    pass

from nodeagent.cli import main

main()
"""


def _tarball(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A reproducible .tar.gz (mtime 0, root-owned, sorted), like a release pipeline makes."""
    raw = io.BytesIO()
    dirs = sorted({str(Path(p).parents[i]) for p in files for i in range(len(Path(p).parts) - 1)})
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for path, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
    import gzip

    return gzip.compress(raw.getvalue(), mtime=0)


def node_agent_tarball(version: str, broken: bool = False) -> bytes:
    """The node-agent release `version` built from this repository's `nodeagent` package."""
    if broken:
        return _tarball({"bin/node-agent": (BROKEN_LAUNCHER.format(version=version).encode(), 0o755)})
    package = Path(nodeagent.__file__).parent
    files = {
        "bin/node-agent": (NODE_AGENT_LAUNCHER.format(version=version).encode(), 0o755),
        "lib/node-agent.py": (NODE_AGENT_MAIN.encode(), 0o644),
    }
    for src in sorted(package.glob("*.py")):
        text = src.read_text()
        if src.name == "__init__.py":
            stamped = re.sub(r'(?m)^__version__ = ".*"$', f"__version__ = {version!r}", text)
            if stamped == text:
                raise RuntimeError(f"{src} has no __version__ line to stamp")
            text = stamped
        files[f"lib/nodeagent/{src.name}"] = (text.encode(), 0o644)
    return _tarball(files)


def nomad_script(version: str, broken: bool = False) -> str:
    """The stand-in nomad (hostsim.nomad_standin) as release `version`'s bin/nomad."""
    source = Path(nomad_standin.__file__).read_text()
    header = 'NAME, VERSION, BROKEN = "nomad", "0.0.0", False'
    if header not in source:
        raise RuntimeError(f"{nomad_standin.__file__} has no {header!r} line to stamp")
    stamped = source.replace(header, f"NAME, VERSION, BROKEN = 'nomad', {version!r}, {broken!r}", 1)
    return "#!/usr/bin/env python3\n" + stamped


def agent_tarball(name: str, version: str, broken: bool = False) -> bytes:
    """The release tarball of agent `name`: the real node-agent, a stand-in daemon for the others."""
    if name == "node-agent":
        return node_agent_tarball(version, broken)
    if name == "nomad":
        return _tarball({"bin/nomad": (nomad_script(version, broken).encode(), 0o755)})
    return _tarball({f"bin/{name}": (daemon_script(name, version, broken).encode(), 0o755)})


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
