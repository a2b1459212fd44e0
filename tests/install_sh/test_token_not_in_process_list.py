"""install.sh moves a token given as `token=` into the environment and re-execs without it: after
that moment no process on the machine shows the token in its command line.

Everything is real except apt: the script is fetched from the reference control plane's
GET /install.sh (its API URL, CA and manifest key filled in), the signed manifest and the installer
wheelhouse come from it, curl, jq, openssl, tar, python3 -m venv and pip run for real, and the
installer it hands over to runs against a host tree (VECTORLAY_ROOT). apt-get and dpkg-query are
recording stubs. A watcher thread reads every /proc/*/cmdline in a loop the whole time.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import testing
from hostsim import build_host, inject, load_topology
from hostsim.agents import publish, publish_agents
from hostsim.wheelhouse import installer_tarball
from tests.install.helpers import gpus_on_vfio, stop_daemons

pytestmark = pytest.mark.slow


class Watcher(threading.Thread):
    """Reads every process's command line, over and over, until stopped. `first_seen` counts only the
    processes of the run under test (descendants of `root_pid`, set once it is started): the machine
    is shared, and someone else's pip or curl says nothing about when this run started downloading."""

    def __init__(self, needle: bytes) -> None:
        super().__init__(daemon=True)
        self.needle = needle
        self.stop = threading.Event()
        self.root_pid: int | None = None
        self.hits: list[tuple[int, int, list[str]]] = []  # (scan, pid, argv)
        self.history: dict[int, list[list[str]]] = {}  # pid -> the command lines it had, in order
        self.first_seen: dict[str, int] = {}  # program/script -> first scan it was seen in
        self.scans = 0

    def _ours(self, pid: int, parents: dict[int, int]) -> bool:
        while pid > 1 and self.root_pid is not None:
            if pid == self.root_pid:
                return True
            pid = parents.get(pid, 0)
        return False

    def run(self) -> None:
        while not self.stop.is_set():
            self.scans += 1
            procs: dict[int, bytes] = {}
            parents: dict[int, int] = {}
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    raw = Path(f"/proc/{entry}/cmdline").read_bytes()
                    stat = Path(f"/proc/{entry}/stat").read_bytes()
                except OSError:
                    continue
                if raw:
                    procs[int(entry)] = raw
                    parents[int(entry)] = int(stat.rsplit(b")", 1)[1].split()[1])
            for pid, raw in procs.items():
                argv = [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]
                seen = self.history.setdefault(pid, [])
                if not seen or seen[-1] != argv:
                    seen.append(argv)
                if self._ours(pid, parents):
                    for word in argv[:3]:  # the program, or the script an interpreter runs (`-m pip`)
                        self.first_seen.setdefault(os.path.basename(word), self.scans)
                if self.needle in raw:
                    self.hits.append((self.scans, pid, argv))


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vls", dir="/tmp"))  # short: the agents' socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_token_is_in_no_command_line_after_install_sh_re_execs(base: Path) -> None:
    art = base / "artifacts"
    publish_agents(art)
    publish(art, "installer", "0.1.0", installer_tarball(base / "wheelhouse"), "installer-0.1.0.tar.gz")
    cp = testing.start(base / "cp", args=("--artifacts", str(art)))
    root = base / "host"
    try:
        cp.org("acme", provider=True)
        token = cp.token("acme")
        ctx = ssl.create_default_context(cafile=str(cp.ca_file))
        with urllib.request.urlopen(f"{cp.url}/install.sh", context=ctx) as resp:
            script = resp.read()
        assert b"@@VECTORLAY_API@@" not in script

        desc = load_topology("hgx-h100")
        gpus_on_vfio(desc)
        build_host(root, desc)
        stubs = base / "stubs"
        stubs.mkdir()
        apt_log = base / "apt.log"
        (stubs / "apt-get").write_text(f'#!/bin/sh\necho "apt-get $*" >> {apt_log}\n')
        # jq "missing": apt-get is asked for it (and the real one on this machine is then used).
        (stubs / "dpkg-query").write_text(
            '#!/bin/sh\nfor a; do p="$a"; done\n[ "$p" = jq ] && exit 1\nprintf "install ok installed"\n'
        )
        for stub in stubs.iterdir():
            stub.chmod(0o755)
        # The simulator, the settle window and the live-root guard reach the venv's vectorlay-bootstrap
        # through hostsim's sitecustomize on PYTHONPATH; install.sh runs as it is.
        env = inject.env(
            {"PATH": f"{stubs}:/usr/local/bin:/usr/bin:/bin", "HOME": str(base), "VECTORLAY_ROOT": str(root)},
            settle=0.2,
            forbid_live=True,
        )
        watcher = Watcher(token.encode())
        watcher.start()
        try:
            # What `curl -fsSL <api>/install.sh | sudo bash -s -- token=vtk_...` runs.
            proc = subprocess.Popen(
                ["bash", "-s", "--", f"token={token}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
            )
            watcher.root_pid = proc.pid
            out, _ = proc.communicate(script, timeout=600)
        finally:
            watcher.stop.set()
            watcher.join()
        text = out.decode(errors="replace")
        assert proc.returncode == 0, text[-4000:]
        assert "vectorlay-node installer: handing over to vectorlay-bootstrap" in text
        assert "enroll: enrolled node node_" in text and "vectorlay-node: DONE" in text
        assert (
            apt_log.read_text().split("\n")[1].startswith("apt-get install -y -qq --no-install-recommends jq")
        )

        # The watcher saw the run: pip building the venv, and the installer it handed over to.
        for program in ("pip", "vectorlay-bootstrap"):
            assert program in watcher.first_seen, sorted(watcher.first_seen)
        # The first process went bash (token in argv) -> bash -c ... (re-exec, no token) -> the installer.
        lines = watcher.history[proc.pid]
        assert any("vectorlay-install" in argv for argv in lines), lines
        assert os.path.basename(lines[-1][0]).startswith("python") or "vectorlay-bootstrap" in lines[-1][0]
        # Only that shell (or a subshell it forked for a `$(...)`, which shows the same command line)
        # had the token in its command line, before its re-exec, and that was over before the first
        # download started.
        original = ["bash", "-s", "--", f"token={token}"]
        assert [argv for _, _, argv in watcher.hits if argv != original] == []
        started = min(watcher.first_seen.get(p, watcher.scans) for p in ("curl", "jq", "openssl", "pip"))
        assert max((scan for scan, _, _ in watcher.hits), default=0) < started
        assert token not in text
        # The operator's tools are on PATH, pointing into the venv the run just switched to.
        for tool in ("vectorlay-node-doctor", "vectorlay-bootstrap"):
            assert os.readlink(root / "usr/local/bin" / tool) == f"/opt/vectorlay/venv/bin/{tool}"
            assert (root / "opt/vectorlay/venv/bin" / tool).exists()
    finally:
        stop_daemons(root)
        testing.stop(cp)
