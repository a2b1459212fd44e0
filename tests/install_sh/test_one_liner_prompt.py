"""The README's recommended one-liner, `curl -fsSL https://<api>/install.sh | sudo bash`, as a person
runs it in a terminal: install.sh asks for the token on the terminal (its standard input is the script,
so it asks through /dev/tty), the question stays visible, the answer is not echoed, and the run goes on
to DONE with the token in no process's command line at any moment.

Real: the script served by the reference control plane, fetched by curl and piped into bash on a
pseudo-terminal that is the session's controlling terminal; the signed manifest, the installer wheels,
jq, openssl, python3 -m venv, pip and the installer against a host tree (VECTORLAY_ROOT). apt-get and
dpkg-query are stubs. sudo is left out: run as root it adds nothing but its own command line, which
here is `sudo bash` (no token), and its env_reset would drop VECTORLAY_ROOT, pointing the run at this
machine. A watcher reads every /proc/*/cmdline in a loop the whole time.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import testing
from hostsim import build_host, inject, load_topology
from hostsim.agents import publish, publish_agents
from hostsim.wheelhouse import installer_tarball
from tests.install.helpers import gpus_on_vfio, stop_daemons
from tests.install_sh.test_token_not_in_process_list import Watcher
from tests.terminal import Terminal

pytestmark = pytest.mark.slow

QUESTION = b"Provisioning token (vtk_..., from the dashboard; it is not shown as you type): "


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vlp", dir="/tmp"))  # short: the agents' socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_recommended_one_liner_asks_for_the_token_and_no_argv_ever_holds_it(base: Path) -> None:
    art = base / "artifacts"
    publish_agents(art)
    publish(art, "installer", "0.1.0", installer_tarball(base / "wheelhouse"), "installer-0.1.0.tar.gz")
    cp = testing.start(base / "cp", args=("--artifacts", str(art)))
    root = base / "host"
    try:
        cp.org("acme", provider=True)
        token = cp.token("acme")
        desc = load_topology("hgx-h100")
        gpus_on_vfio(desc)
        build_host(root, desc)
        stubs = base / "stubs"
        stubs.mkdir()
        (stubs / "apt-get").write_text("#!/bin/sh\nexit 0\n")
        (stubs / "dpkg-query").write_text('#!/bin/sh\nprintf "install ok installed"\n')
        for stub in stubs.iterdir():
            stub.chmod(0o755)
        env = inject.env(
            {
                "PATH": f"{stubs}:/usr/local/bin:/usr/bin:/bin",
                "HOME": str(base),
                "VECTORLAY_ROOT": str(root),
                "TERM": "xterm-256color",
                "LANG": "C.UTF-8",
            },
            settle=0.2,
            forbid_live=True,
        )
        # The one-liner, with the test control plane's CA given to curl (a real one has a public CA).
        one_liner = f"curl -fsSL --cacert {shlex.quote(str(cp.ca_file))} {cp.url}/install.sh | bash"
        watcher = Watcher(token.encode())
        watcher.start()
        try:
            term = Terminal(["/bin/bash", "-c", one_liner], env)
            watcher.root_pid = term.pid
            term.expect(QUESTION, timeout=120)
            assert term.quiet_for(1.0) == b""  # waits for the answer with the question on screen
            term.type(token + "\r")
            code = term.wait(timeout=600)
        finally:
            watcher.stop.set()
            watcher.join()
        text = term.output.decode(errors="replace")
        assert code == 0, text[-4000:]
        assert text.startswith("vectorlay-node installer: starting")
        assert "vectorlay-node installer: handing over to vectorlay-bootstrap" in text
        assert "enroll: enrolled node node_" in text and "vectorlay-node: DONE" in text
        assert token not in text  # not echoed at the prompt, nor shown anywhere later
        # The watcher saw the whole run, and no process ever had the token in its command line.
        for program in ("curl", "pip", "vectorlay-bootstrap"):
            assert program in watcher.first_seen, sorted(watcher.first_seen)
        assert watcher.scans > 10
        assert watcher.hits == []
    finally:
        stop_daemons(root)
        testing.stop(cp)
