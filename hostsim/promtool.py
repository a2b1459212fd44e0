"""Prometheus' own `promtool`, for the test that checks the doctor's textfile (`doctor --prometheus`).

Debian ships promtool only inside the `prometheus` package (no smaller package carries it), and
installing that package would enable and start a Prometheus server on this machine. So the package
is fetched with apt's ordinary client against a private apt configuration (hostsim.runsc's) and only
`usr/bin/promtool` is kept, unpacked with `dpkg-deb -x` into ~/.cache/vectorlay-promtool
($VECTORLAY_PROMTOOL_CACHE): nothing is installed.

    python -m hostsim.promtool fetch    # what .ci/run does
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hostsim.runsc import private_apt, run_checked

CACHE_ENV = "VECTORLAY_PROMTOOL_CACHE"
SUITE = "bookworm"


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "vectorlay-promtool"


def cached() -> Path | None:
    """promtool from this machine's PATH (a CI that installed Debian's prometheus), else the cached
    one, else None."""
    found = shutil.which("promtool")
    if found:
        return Path(found)
    binary = cache_dir() / "promtool"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def fetch() -> Path:
    """Make promtool present in the cache (downloading Debian's prometheus only when missing)."""
    have = cached()
    if have is not None:
        return have
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    opts = private_apt(base, [SUITE])
    with tempfile.TemporaryDirectory(dir=base, prefix=".fetch-") as tmp:
        work = Path(tmp)
        run_checked(["apt-get", *opts, "download", f"prometheus/{SUITE}"], cwd=work)
        debs = sorted(work.glob("prometheus_*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download prometheus/{SUITE} left {len(debs)} .deb files")
        run_checked(["dpkg-deb", "-x", str(debs[0]), str(work / "x")])
        os.replace(work / "x/usr/bin/promtool", base / "promtool")
    binary = cached()
    if binary is None:
        raise RuntimeError("the prometheus package held no usable usr/bin/promtool")
    return binary


def main(argv: list[str]) -> int:
    if argv != ["fetch"]:
        print("usage: python -m hostsim.promtool fetch", file=sys.stderr)
        return 2
    try:
        print(f"promtool: {fetch()}")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"error: cannot fetch promtool from Debian's archive: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
