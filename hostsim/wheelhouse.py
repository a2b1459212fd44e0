"""The installer artifact: one tarball of wheels (vectorlay-node and its dependencies) that install.sh
turns into /opt/vectorlay/venv offline, with whatever python3 the node's release ships.

Every CPython a supported release has as its python3 gets its wheels: Ubuntu 22.04's 3.10, Debian
12's 3.11, Ubuntu 24.04's 3.12, Debian 13's 3.13 and Ubuntu 26.04's 3.14 (TARGETS). pip on the node
picks, from the one flat wheelhouse, the wheels its Python's tags match (`--no-index --find-links`).
A dependency that publishes abi3 wheels (cryptography, psutil) or pure-Python ones ships each such
file once, however many targets chose it.

The build does not depend on the Python that runs it: each target is downloaded with explicit
--python-version/--implementation/--abi/--platform, so a control plane on any Python 3.10-3.13 builds
the same artifact. pip evaluates environment markers (`typing-extensions; python_version < "3.11"`)
against the interpreter running it, not the target (pypa/pip#11010, #11198), so pip runs here with
the target's marker environment; `missing_requirements` then checks each target's closure from the
wheels alone, so a pip that stopped honouring that environment fails the build instead of shipping
a wheelhouse one Python cannot install from.

Dependencies come from PyPI once per target into a cache keyed by the dependency list, the target
and the platforms; later builds (tests, the demo, the VM guest) reuse it and need no network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from email.parser import HeaderParser
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("VECTORLAY_WHEEL_CACHE", Path.home() / ".cache" / "vectorlay-wheelhouse"))

# Wheels built for glibc 2.28 or older: every supported release has a newer one (Ubuntu 22.04, the
# oldest, has 2.35), and so does any other Debian or Ubuntu release recent enough to ship Python 3.10.
# pip does not widen a manylinux_2_N platform to older glibcs by itself, so each is named.
GLIBC_MINOR_MAX = 28
PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR_MAX, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
)


@dataclass(frozen=True)
class Target:
    """One CPython the artifact must install on, e.g. Target(3, 10)."""

    major: int
    minor: int

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def tag(self) -> str:
        return f"cp{self.major}{self.minor}"

    def pip_args(self) -> list[str]:
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        return ["--python-version", self.version, "--implementation", "cp", "--abi", self.tag, *platforms]

    def marker_environment(self) -> dict[str, str]:
        # The lowest patch release: a marker on a patch level (rare) is resolved for the oldest.
        full = f"{self.version}.0"
        return {
            "implementation_name": "cpython",
            "implementation_version": full,
            "os_name": "posix",
            "platform_machine": "x86_64",
            "platform_python_implementation": "CPython",
            "platform_system": "Linux",
            "python_full_version": full,
            "python_version": self.version,
            "sys_platform": "linux",
        }

    def tags(self) -> frozenset[Tag]:
        version = (self.major, self.minor)
        return frozenset(
            [
                *cpython_tags(version, abis=[self.tag], platforms=PLATFORMS),
                *compatible_tags(version, interpreter=self.tag, platforms=PLATFORMS),
            ]
        )


# The python3 of each supported release, oldest first: Ubuntu 22.04, Debian 12, Ubuntu 24.04, Debian
# 13, Ubuntu 26.04. install.sh names the same range when it refuses another Python.
TARGETS = tuple(Target(3, minor) for minor in range(10, 15))

# Runs pip with the target's marker environment (see the module docstring). The rest of pip is
# unchanged: `python -m pip` with the same arguments.
_PIP_FOR_TARGET = """\
import json, runpy, sys
from pip._vendor.packaging import markers
target = {**markers.default_environment(), **json.loads(sys.argv.pop(1))}
markers.default_environment = lambda: dict(target)
sys.argv[0] = "pip"
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""


def runtime_requirements() -> list[str]:
    reqs = requires("vectorlay-node") or []
    return sorted(r for r in reqs if "extra ==" not in r)


def dependency_wheels(target: Target, cache: Path = DEFAULT_CACHE) -> Path:
    """A directory of binary wheels of every runtime dependency, for `target`, downloaded once."""
    reqs = runtime_requirements()
    recipe = "\n".join([*reqs, target.tag, *PLATFORMS, _PIP_FOR_TARGET])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    dest = cache / f"deps-{target.tag}-{key}"
    if (dest / ".complete").exists():
        return dest
    tmp = cache / f".deps-{target.tag}-{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        subprocess.run(
            [
                sys.executable, "-c", _PIP_FOR_TARGET, json.dumps(target.marker_environment()),
                "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
                *target.pip_args(), "--dest", str(tmp), *reqs,
            ],
            check=True,
        )  # fmt: skip
        missing = missing_requirements(reqs, tmp.glob("*.whl"), target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"pip downloaded no wheel for Python {target.version} of: {', '.join(missing)} "
            "(did pip ignore the target's marker environment?)"
        )
    (tmp / ".complete").write_text("\n".join(reqs) + "\n")
    if dest.exists():  # another build finished first: its copy is as good
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, dest)
    return dest


def missing_requirements(reqs: Iterable[str], wheels: Iterable[Path], target: Target) -> list[str]:
    """What `target` needs, from `reqs` down through every wheel's own requirements, that no wheel
    given installs on it: [] when pip on that Python can install `reqs` from these wheels alone."""
    tags = target.tags()
    found: dict[str, list[tuple[Version, Path]]] = {}
    for wheel in wheels:
        name, version, _, wheel_tags = parse_wheel_filename(wheel.name)
        if wheel_tags & tags:
            found.setdefault(name, []).append((version, wheel))
    env = target.marker_environment()
    missing: list[str] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(r), "") for r in reqs]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        fits = sorted(
            (c for c in found.get(name, []) if req.specifier.contains(c[0], prereleases=True)),
            key=lambda c: c[0],
        )
        if not fits:
            missing.append(str(req))
            continue
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        for dep in _requires_dist(fits[-1][1]):
            for wanted in ("", *req.extras):
                todo.append((Requirement(dep), wanted))
    return sorted(set(missing))


def _requires_dist(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(z.read(meta).decode())
    return headers.get_all("Requires-Dist") or []


def all_dependency_wheels(cache: Path = DEFAULT_CACHE) -> list[Path]:
    """Every target's dependency wheels, each file once (abi3 and pure-Python wheels are shared)."""
    by_name = {w.name: w for t in TARGETS for w in dependency_wheels(t, cache).glob("*.whl")}
    return [by_name[n] for n in sorted(by_name)]


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
    """Wheels of vectorlay-node and every runtime dependency, for every Python in TARGETS."""
    return wheels_tarball([project_wheel(work / "project"), *all_dependency_wheels(cache)])
