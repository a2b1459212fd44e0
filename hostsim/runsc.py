"""Real gVisor `runsc` binaries for the tests and the demo, from Debian's archive, kept in a cache.

Debian 12 ships runsc 0.0~20221219 (no nvproxy: it refuses `--nvproxy`); bookworm-backports ships
0.0~20240729, which has it. Both are fetched with apt's ordinary client against a private apt
configuration (its own sources list, package lists and archive cache inside the cache directory),
then unpacked with `dpkg-deb -x`: nothing is installed, and this machine's own runsc and apt state
are left as they are.

    python -m hostsim.runsc fetch    # what .ci/run does; prints the cached binaries

Cache: $VECTORLAY_RUNSC_CACHE, else ~/.cache/vectorlay-runsc; `<release>/runsc` per gVisor release
(e.g. `20240729.0/runsc`), with `runsc-<release>.tar.gz`, the artifact the control plane serves.

The demo falls back to `standin_tarball` when nothing is cached: a script that parses runsc's
top-level flags the way Go's flag package does, with the flag set of the release it names. The
tests never use it.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bootstrap.host import CommandResult, Host

CACHE_ENV = "VECTORLAY_RUNSC_CACHE"
DEBIAN = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# gVisor release -> the Debian suite that carries it.
SUITES = {"20240729.0": "bookworm-backports", "20221219.0": "bookworm"}
NVPROXY = "20240729.0"  # has nvproxy: what the tests serve as the runsc artifact
PRE_NVPROXY = "20221219.0"  # Debian 12's own: refuses --nvproxy

_DEBIAN_VERSION = re.compile(r"^0\.0~(\d{8}\.\d+)-")


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "vectorlay-runsc"


def cached(release: str) -> Path | None:
    """The cached runsc binary of a gVisor release, or None."""
    binary = cache_dir() / release / "runsc"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def _apt_options(apt: Path) -> list[str]:
    return [
        f"-o=Dir::Etc::sourcelist={apt / 'sources.list'}",
        f"-o=Dir::Etc::sourceparts={apt / 'sources.list.d'}",
        f"-o=Dir::Etc::preferences={apt / 'preferences'}",
        f"-o=Dir::Etc::preferencesparts={apt / 'preferences.d'}",
        f"-o=Dir::State::Lists={apt / 'lists'}",
        f"-o=Dir::Cache={apt / 'cache'}",
        "-o=APT::Get::List-Cleanup=0",
        "-qq",
    ]


def private_apt(base: Path, suites: list[str]) -> list[str]:
    """apt-get's options for a private configuration under `base` (its own sources list of Debian's
    `suites`, package lists and archive cache), with the lists updated: this machine's apt state is
    never read or written."""
    apt = base / "apt"
    for d in ("sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(
        "".join(f"deb [signed-by={KEYRING}] {DEBIAN} {s} main\n" for s in suites)
    )
    opts = _apt_options(apt)
    run_checked(["apt-get", *opts, "update"])
    return opts


def run_checked(argv: list[str], cwd: Path | None = None) -> None:
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed (exit {res.returncode}): {res.stderr.strip()}")


def fetch(releases: tuple[str, ...] = tuple(SUITES)) -> dict[str, Path]:
    """Make each release's binary present in the cache (downloading only what is missing)."""
    out: dict[str, Path] = {}
    missing = [r for r in releases if cached(r) is None]
    for r in releases:
        if r not in missing:
            out[r] = cached(r)  # type: ignore[assignment]
    if not missing:
        return out
    base = cache_dir()
    opts = private_apt(base, sorted({SUITES[r] for r in missing}))
    for release in missing:
        with tempfile.TemporaryDirectory(dir=base, prefix=".fetch-") as tmp:
            work = Path(tmp)
            run_checked(["apt-get", *opts, "download", f"runsc/{SUITES[release]}"], cwd=work)
            debs = sorted(work.glob("runsc_*.deb"))
            if len(debs) != 1:
                raise RuntimeError(f"apt-get download runsc/{SUITES[release]} left {len(debs)} .deb files")
            version = subprocess.run(
                ["dpkg-deb", "-f", str(debs[0]), "Version"], capture_output=True, text=True, check=True
            ).stdout.strip()
            m = _DEBIAN_VERSION.match(version)
            if m is None or m[1] != release:
                raise RuntimeError(
                    f"{SUITES[release]} now carries runsc {version}, not gVisor {release}: update "
                    "hostsim.runsc.SUITES (and docs/operating.md's tested version)"
                )
            run_checked(["dpkg-deb", "-x", str(debs[0]), str(work / "x")])
            staging = work / release
            staging.mkdir()
            os.replace(work / "x/usr/bin/runsc", staging / "runsc")
            (staging / "debian-version").write_text(version + "\n")
            final = base / release
            shutil.rmtree(final, ignore_errors=True)  # a half-filled one from an older layout
            os.replace(staging, final)
        out[release] = base / release / "runsc"
    return out


def bin_tarball(files: dict[str, bytes]) -> bytes:
    """A reproducible .tar.gz (mtime 0, root-owned) with the given executables under bin/."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("bin")
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(f"bin/{name}")
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def artifact_tarball(release: str) -> bytes:
    """The runsc artifact (bin/runsc) of a cached release; built once and kept next to the binary."""
    binary = cached(release)
    if binary is None:
        raise FileNotFoundError(
            f"runsc {release} is not cached in {cache_dir()}: python -m hostsim.runsc fetch"
        )
    tgz = binary.parent / f"runsc-{release}.tar.gz"
    if not tgz.is_file() or tgz.stat().st_mtime < binary.stat().st_mtime:
        data = bin_tarball({"runsc": binary.read_bytes()})
        part = tgz.with_suffix(".part")
        part.write_bytes(data)
        os.replace(part, tgz)
    return tgz.read_bytes()


# What `runsc nvproxy list-supported-drivers` prints on release-20240729.
STANDIN_DRIVERS = (
    "535.104.12", "535.129.03", "535.154.05", "535.161.07", "550.54.14", "550.54.15", "550.90.07",
)  # fmt: skip

# The top-level flags of runsc release-20240729 that matter to a node (`runsc flags` lists them
# all), with Go's flag package rules: -name or --name, bool flags take =value only, the first
# non-flag word starts the subcommand, an unknown flag is exit 2 with "flag provided but not defined".
STANDIN = r'''#!/usr/bin/env python3
"""Stand-in for gVisor runsc {release} (hostsim.runsc): top-level flag parsing, --version and
`nvproxy list-supported-drivers` only."""
import sys

RELEASE = {release!r}
BOOL = {{"nvproxy", "nvproxy-docker", "debug", "version", "rootless", "systemd-cgroup"}}
VALUE = {{"root", "platform", "network", "debug-log", "log", "log-format", "nvproxy-driver-version"}}
DRIVERS = {drivers!r}

def usage(msg):
    sys.stderr.write(msg + "\nUsage: runsc <flags> <subcommand> <subcommand args>\n")
    sys.exit(2)

args, seen, i = sys.argv[1:], {{}}, 0
while i < len(args):
    a = args[i]
    if not a.startswith("-") or a in ("-", "--"):
        break
    name, eq, value = a.lstrip("-").partition("=")
    if name in BOOL:
        if eq and value.lower() not in ("1", "0", "t", "f", "true", "false"):
            usage(f'invalid boolean value "{{value}}" for -{{name}}: parse error')
        seen[name] = value.lower() in ("1", "t", "true") if eq else True
    elif name in VALUE:
        if not eq:
            i += 1
            if i >= len(args):
                usage(f"flag needs an argument: -{{name}}")
        seen[name] = value if eq else args[i]
    else:
        usage(f"flag provided but not defined: -{{name}}")
    i += 1
if seen.get("version"):
    print(f"runsc version {{RELEASE}} (hostsim stand-in)")
    print("spec: 1.1.0")
    sys.exit(0)
if args[i:] == ["nvproxy", "list-supported-drivers"]:
    print("\n".join(DRIVERS))
    sys.exit(0)
sys.stderr.write("hostsim stand-in runsc: runs no containers\n")
sys.exit(1)
'''


def standin_tarball(release: str = NVPROXY) -> bytes:
    return bin_tarball({"runsc": STANDIN.format(release=release, drivers=STANDIN_DRIVERS).encode()})


def run_in_tree(host: Host, argv: tuple[str, ...]) -> CommandResult:
    """The RecordingRunner handler for `runsc` (hostsim.kernel registers it): the runsc installed in
    the tree runs for real, so a tree's doctor gets the installed binary's own answer. Only the
    read-only probes run (`... --version`, `... nvproxy list-supported-drivers`); anything else could
    act on this machine (`runsc install` edits the real /etc/docker/daemon.json) and is refused."""
    probe = argv[-1:] == ("--version",) or argv[-2:] == ("nvproxy", "list-supported-drivers")
    if not argv or not argv[0].startswith("/") or not probe:
        return CommandResult(argv, 1, "", f"hostsim: only runsc's read-only probes run in a tree: {argv}")
    exe = host.path(argv[0])
    if not exe.is_file():
        return CommandResult(argv, 127, "", f"{argv[0]}: command not found")
    try:
        proc = subprocess.run(
            [str(exe), *argv[1:]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return CommandResult(argv, 124, "", f"{argv[0]}: timed out after 30s")
    except OSError as e:
        return CommandResult(argv, 126, "", f"{argv[0]}: {e.strerror}")
    return CommandResult(argv, proc.returncode, proc.stdout, proc.stderr)


def main(argv: list[str]) -> int:
    if argv != ["fetch"]:
        print("usage: python -m hostsim.runsc fetch", file=sys.stderr)
        return 2
    try:
        for release, path in sorted(fetch().items()):
            print(f"runsc {release}: {path}")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"error: cannot fetch runsc from Debian's archive: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
