"""install.sh treats a manifest whose signature does not verify as a security event, not a stale
download: it stops before fetching the installer and says not to proceed. The manifest comes from the
real control plane; the install.sh it serves is given another pinned key (what a manifest altered on
the way, or made by another server, looks like to it). curl, jq and openssl run for real, apt is a stub."""

from __future__ import annotations

import re
import ssl
import subprocess
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane import testing
from hostsim import build_host, load_topology
from hostsim.agents import publish

_PEM = re.compile(rb"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", re.S)


def test_a_manifest_that_does_not_verify_is_a_security_event_and_nothing_is_fetched(tmp_path: Path) -> None:
    art = tmp_path / "artifacts"
    publish(art, "installer", "0.1.0", b"\x1f\x8bnot reached", "installer-0.1.0.tar.gz")
    cp = testing.start(tmp_path / "cp", args=("--artifacts", str(art)))
    other = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .strip()
    )
    try:
        ctx = ssl.create_default_context(cafile=str(cp.ca_file))
        with urllib.request.urlopen(f"{cp.url}/install.sh", context=ctx) as resp:
            script = resp.read()
        script, pinned = _PEM.subn(lambda _m: other, script)
        assert pinned == 1
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
    assert (
        f"error: SECURITY: the artifact manifest from {cp.url} does not verify against the key pinned" in err
    )
    assert "fix: do not proceed and do not re-run blindly" in err
    assert "proxy" in err and "contact vectorlay support" in err
    assert "stale" not in err
    assert "fetching installer" not in res.stdout.decode(errors="replace")
    assert not (root / "opt/vectorlay/venv").exists()
