"""install.sh refuses a signed manifest past its expiry (a replayed or frozen one) before it fetches
the installer. The manifest comes from the real control plane, its clock set two days back so that
what it signs expired yesterday; curl, jq and openssl run for real, apt is a stub."""

from __future__ import annotations

import ssl
import subprocess
import urllib.request
from pathlib import Path

from controlplane import testing
from hostsim import build_host, load_topology
from hostsim.agents import publish


def test_install_sh_refuses_an_expired_manifest_and_fetches_no_installer(tmp_path: Path) -> None:
    art = tmp_path / "artifacts"
    publish(art, "installer", "0.1.0", b"\x1f\x8bnot reached", "installer-0.1.0.tar.gz")
    cp = testing.start(
        tmp_path / "cp", args=("--artifacts", str(art)), env={"VECTORLAY_CP_CLOCK_OFFSET": "-172800"}
    )
    try:
        ctx = ssl.create_default_context(cafile=str(cp.ca_file))
        with urllib.request.urlopen(f"{cp.url}/install.sh", context=ctx) as resp:
            script = resp.read()
        root = build_host(tmp_path / "host", load_topology("cpu-only"))
        stubs = tmp_path / "stubs"
        stubs.mkdir()
        (stubs / "apt-get").write_text("#!/bin/sh\nexit 0\n")
        (stubs / "dpkg-query").write_text('#!/bin/sh\nprintf "install ok installed"\n')
        for stub in stubs.iterdir():
            stub.chmod(0o755)
        env = {
            "PATH": f"{stubs}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "VECTORLAY_ROOT": str(root),
            "VECTORLAY_TOKEN": cp.token(cp.org("acme")),
        }
        res = subprocess.run(
            ["bash", "-s", "--"], input=script, env=env, capture_output=True, timeout=120, check=False
        )
    finally:
        testing.stop(cp)
    err = res.stderr.decode(errors="replace")
    assert res.returncode == 1, res.stdout.decode(errors="replace") + err
    assert f"error: the artifact manifest from {cp.url} expired at " in err
    assert "refusing a stale manifest" in err and "check this machine's clock" in err
    assert "fetching installer" not in res.stdout.decode(errors="replace")
    assert not (root / "opt/vectorlay/venv").exists()
