"""The installer artifact: a tarball of wheels (vectorlay-node and its dependencies) that install.sh
turns into /opt/vectorlay/venv offline.

Dependencies come from PyPI through pip's ordinary download, once, into a cache keyed by the
dependency list and the target Python; later builds (tests, the demo, the VM guest) reuse it and
need no network. The wheelhouse targets the Python running this code: Debian 12's 3.11 for the VM
guest. A release pipeline would build one per supported Python (3.10, 3.11, 3.12).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from importlib.metadata import requires
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("VECTORLAY_WHEEL_CACHE", Path.home() / ".cache" / "vectorlay-wheelhouse"))


def runtime_requirements() -> list[str]:
    reqs = requires("vectorlay-node") or []
    return sorted(r for r in reqs if "extra ==" not in r)


def dependency_wheels(cache: Path = DEFAULT_CACHE) -> Path:
    reqs = runtime_requirements()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    key = hashlib.sha256(("\n".join(reqs) + tag).encode()).hexdigest()[:16]
    dest = cache / f"deps-{tag}-{key}"
    if (dest / ".complete").exists():
        return dest
    tmp = cache / f".deps-{tag}-{key}.{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--dest",
            str(tmp),
            *reqs,
        ],
        check=True,
    )
    (tmp / ".complete").write_text("\n".join(reqs) + "\n")
    os.replace(tmp, dest) if not dest.exists() else subprocess.run(["rm", "-rf", str(tmp)], check=True)
    return dest


def project_wheel(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("vectorlay_node-*.whl"):
        old.unlink()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
    )
    (wheel,) = out.glob("vectorlay_node-*.whl")
    return wheel


def wheels_tarball(wheels: list[Path]) -> bytes:
    """The wheels, flat, in a reproducible .tar.gz: the shape of the control plane's `installer`."""
    import gzip

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for w in wheels:
            info = tarfile.TarInfo(w.name)
            info.size = w.stat().st_size
            info.mode = 0o644
            with open(w, "rb") as f:
                tar.addfile(info, f)
    return gzip.compress(raw.getvalue(), mtime=0)


def installer_tarball(work: Path, cache: Path = DEFAULT_CACHE) -> bytes:
    """wheels of vectorlay-node and every runtime dependency, for this machine's Python."""
    return wheels_tarball([project_wheel(work / "project"), *sorted(dependency_wheels(cache).glob("*.whl"))])
