"""Debian 12's real dockerd, for the tests that check the daemon.json a container-mode node writes.

docker.io 20.10 has no `--validate`; the only way to know that dockerd takes a daemon.json is to start
it on that file. The packages (docker.io, containerd, runc from bookworm) are fetched with apt's
ordinary client against a private apt configuration, as hostsim.runsc does, and unpacked with
`dpkg-deb -x` into ~/.cache/vectorlay-docker ($VECTORLAY_DOCKER_CACHE): nothing is installed.

    python -m hostsim.dockerd fetch    # what .ci/run does

`daemon_info(config)` starts that dockerd on a copy of `config` inside new mount, network and PID
namespaces, with every directory it writes (data root, exec root, pidfile, socket, /run) in a
temporary directory, no iptables and no bridge, asks it `docker info` with Debian's own client, and
stops it. So nothing of this machine's network, firewall or docker changes, and the daemon cannot
outlive the test: it is PID 1's child in a namespace whose PID 1 is killed on exit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hostsim.runsc import private_apt, run_checked

CACHE_ENV = "VECTORLAY_DOCKER_CACHE"
PACKAGES = ("docker.io", "containerd", "runc")
SUITE = "bookworm"
# The test's copy of the node's file also names where dockerd keeps its trust key: by default it
# creates /etc/docker/key.json, outside the temporary directory. Every other key is the node's.
_TEST_KEYS = ("deprecated-key-path",)


class DockerdRefused(Exception):
    """dockerd did not come up on the configuration; the message is the end of its log."""


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "vectorlay-docker"


def cached() -> Path | None:
    """The unpacked packages' root (usr/sbin/dockerd, usr/bin/docker, containerd, runc), or None."""
    root = cache_dir() / "root"
    ok = all((root / p).is_file() for p in ("usr/sbin/dockerd", "usr/bin/docker", "usr/bin/containerd"))
    return root if ok else None


def fetch() -> Path:
    """Make the unpacked packages present in the cache (downloading them only when missing)."""
    have = cached()
    if have is not None:
        return have
    base = cache_dir()
    opts = private_apt(base, [SUITE])
    with tempfile.TemporaryDirectory(dir=base, prefix=".fetch-") as tmp:
        work = Path(tmp)
        run_checked(["apt-get", *opts, "download", *(f"{p}/{SUITE}" for p in PACKAGES)], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if len(debs) != len(PACKAGES):
            raise RuntimeError(f"apt-get download {' '.join(PACKAGES)} left {len(debs)} .deb files")
        for deb in debs:
            run_checked(["dpkg-deb", "-x", str(deb), str(work / "root")])
        final = base / "root"
        shutil.rmtree(final, ignore_errors=True)  # a half-filled one from an interrupted fetch
        os.replace(work / "root", final)
    root = cached()
    if root is None:
        raise RuntimeError(f"the unpacked {', '.join(PACKAGES)} lack dockerd, docker or containerd")
    return root


# Runs as PID 1 of the new PID namespace: a private /run, loopback up, dockerd in the background,
# then `docker info` once the socket answers. Exit 3: dockerd exited (refused its configuration).
_SCRIPT = r"""
set -u
mount -t tmpfs tmpfs /run
ip link set lo up
dockerd --config-file "$W/daemon.json" --data-root "$W/data" --exec-root "$W/exec" \
    --pidfile "$W/docker.pid" -H "unix://$W/docker.sock" --iptables=false --ip6tables=false \
    --bridge=none --ip-masq=false --storage-driver=vfs >"$W/dockerd.log" 2>&1 &
pid=$!
i=0
while [ $i -lt 600 ]; do
    if ! kill -0 $pid 2>/dev/null; then exit 3; fi
    if [ -S "$W/docker.sock" ] &&
        docker -H "unix://$W/docker.sock" info --format '{{json .}}' >"$W/info.json" 2>"$W/info.err"; then
        kill $pid; wait $pid; exit 0
    fi
    i=$((i + 1)); sleep 0.1
done
kill $pid; wait $pid; exit 4
"""


def daemon_info(config: bytes, *, timeout: float = 90) -> dict[str, Any]:
    """`docker info` of Debian 12's dockerd started on `config` (a daemon.json's bytes). Raises
    DockerdRefused, with dockerd's own words, when it does not come up on it."""
    root = cached()
    if root is None:
        raise RuntimeError("Debian's dockerd is not in the cache: run python -m hostsim.dockerd fetch")
    data = json.loads(config)
    for key in _TEST_KEYS:
        if key in data:
            raise ValueError(f"the node's daemon.json names {key!r}, which only the test's copy may set")
    with tempfile.TemporaryDirectory(prefix="vectorlay-dockerd-") as tmp:
        work = Path(tmp)
        data["deprecated-key-path"] = str(work / "key.json")
        (work / "daemon.json").write_text(json.dumps(data))
        path = f"{root}/usr/bin:{root}/usr/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
        env = {"PATH": path, "W": str(work), "HOME": str(work)}
        ran = subprocess.run(
            ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
             "--propagation", "private", "sh", "-c", _SCRIPT],
            env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        log = (work / "dockerd.log").read_text(errors="replace") if (work / "dockerd.log").exists() else ""
        if ran.returncode == 3:
            raise DockerdRefused(_last_error(log))
        if ran.returncode != 0:
            raise RuntimeError(
                f"dockerd did not answer (exit {ran.returncode}): {ran.stderr.strip()}\n{log[-2000:]}"
            )
        info: dict[str, Any] = json.loads((work / "info.json").read_text())
        return info


def _last_error(log: str) -> str:
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "dockerd exited without a word"


def main(argv: list[str]) -> int:
    if argv != ["fetch"]:
        print("usage: python -m hostsim.dockerd fetch", file=sys.stderr)
        return 2
    print(fetch())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
