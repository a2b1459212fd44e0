"""Rolling the control plane's CAs with nodes on both sides of it: the real control plane (restarted
between the steps, as an operator would), the real enrollment and renewal, and Debian's nebula-cert
judging the overlay certificates against the trust file an overlay host is given."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from bootstrap import credentials
from bootstrap.api import ApiClient, ClientCert
from bootstrap.enroll import enroll
from bootstrap.errors import VectorlayError
from bootstrap.host import RecordingRunner, TreeHost
from bootstrap.identity import load_identity
from bootstrap.nebula import parse_certificate_bundle_pem, parse_certificate_pem
from controlplane import testing
from doctor.checks import run_checks
from doctor.model import Status
from nodeagent.renewal import Renewer

NEBULA_CERT = shutil.which("nebula-cert")


def _enroll(cp: testing.RunningControlPlane, root: Path) -> None:
    enroll(
        TreeHost(root, RecordingRunner()),
        ApiClient(cp.url, ca_file=cp.ca_file, attempts=1),
        cp.token("acme"),
        gpu_mode="none",
        hardware={},
    )


def _works(cp: testing.RunningControlPlane, root: Path) -> str:
    """GET /v1/node/self as the node makes it: its client certificate, and the server checked against
    the CAs the node itself trusts (its ca.crt)."""
    ident = load_identity(TreeHost(root))
    assert ident is not None
    api = ApiClient(
        cp.url, pinned_ca=ident.ca_file, client_cert=ClientCert(ident.cert_file, ident.key_file), attempts=1
    )
    try:
        return str(api.request("GET", "/v1/node/self", bearer=ident.node_token())["node_id"])
    finally:
        api.close()


def _issuer(root: Path, file: str = "node.crt") -> str:
    ident = root / "etc/vectorlay/identity"
    cert = x509.load_pem_x509_certificate((ident / file).read_bytes())
    ca = credentials.issuer_in(cert, (ident / "ca.crt").read_bytes())
    assert ca is not None
    return ca.subject.rfc4514_string()


def _nebula_issuer(root: Path) -> str:
    return parse_certificate_pem((root / "etc/vectorlay/identity/nebula.crt").read_bytes()).issuer


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`vectorlay-control-plane ARGS` (the commands on the state dir take no --db)."""
    return subprocess.run(
        [sys.executable, "-m", "controlplane.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _ca(cp: testing.RunningControlPlane, action: str) -> dict[str, Any]:
    res = _cli("ca", action, "--state-dir", str(cp.state_dir))
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def _verify(ca: Path, crt: Path) -> subprocess.CompletedProcess[str]:
    assert NEBULA_CERT is not None
    return subprocess.run(
        [NEBULA_CERT, "verify", "-ca", str(ca), "-crt", str(crt)], capture_output=True, text=True, check=False
    )


@pytest.mark.skipif(NEBULA_CERT is None, reason="needs Debian's nebula (.ci/run installs it)")
@pytest.mark.slow
def test_a_ca_rotation_keeps_nodes_on_the_old_and_the_new_ca_working_until_the_old_is_retired(
    make_tree: Callable[..., Path], tmp_path: Path
) -> None:
    work = tmp_path / "cp"
    cp = testing.start(work, args=("--cert-days", "30"))
    try:
        cp.org("acme")
        old_node, stale_node = make_tree("cpu-only"), make_tree("cpu-only")
        _enroll(cp, old_node)
        _enroll(cp, stale_node)
        old_ca = _issuer(old_node)
        old_nebula_ca = _nebula_issuer(old_node)
    finally:
        testing.stop(cp)

    introduced = _ca(cp, "introduce")
    assert introduced["next_ca"] is not None and introduced["next_ca"]["name"] != introduced["ca"]["name"]
    assert _ca(cp, "introduce")["next_ca"] == introduced["next_ca"]  # idempotent
    cp = testing.start(work, args=("--cert-days", "30"))
    try:
        new_node = make_tree("cpu-only")
        _enroll(cp, new_node)
        # The new node's certificates come from the new CAs; it trusts both.
        assert _issuer(new_node) == introduced["next_ca"]["name"] == _issuer(new_node, "nomad.crt")
        assert _nebula_issuer(new_node) == introduced["next_nebula_ca"]["sha256"]
        trusted = (new_node / "etc/vectorlay/identity/nebula-ca.crt").read_bytes()
        assert len(parse_certificate_bundle_pem(trusted)) == 2
        # During the overlap the node on the old CA and the one on the new CA both work.
        assert _works(cp, old_node) and _works(cp, new_node) and _works(cp, stale_node)
        # An overlay host set up now trusts both nebula CAs: nebula accepts both nodes' certificates.
        lighthouse = tmp_path / "lighthouse"
        res = _cli(
            "overlay-host", "--state-dir", str(cp.state_dir), "--name", "lh", "--overlay-ip", "100.64.0.1",
            "--out", str(lighthouse), "--lighthouse",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        for node in (old_node, new_node):
            verified = _verify(lighthouse / "ca.crt", node / "etc/vectorlay/identity/nebula.crt")
            assert verified.returncode == 0, verified.stderr
        # The doctor names the CA the node's certificates chain to.
        doctor = run_checks(TreeHost(old_node), env={}, only=["identity"]).get("identity")
        assert doctor.status is Status.PASS, doctor
        assert any(line.startswith(f"node certificate issued by {old_ca} (") for line in doctor.details), (
            doctor
        )

        # At its next renewal the old node moves to the new CAs, same node, same overlay IP.
        before = load_identity(TreeHost(old_node))
        renewed = Renewer(TreeHost(old_node, RecordingRunner()), lambda _i: str(cp.url)).renew()
        assert before is not None and (renewed.node_id, renewed.overlay_ip) == (
            before.node_id,
            before.overlay_ip,
        )
        assert _issuer(old_node) == introduced["next_ca"]["name"] != old_ca
        assert _nebula_issuer(old_node) == introduced["next_nebula_ca"]["sha256"] != old_nebula_ca
        assert _works(cp, old_node)
        doctor = run_checks(TreeHost(old_node), env={}, only=["identity"]).get("identity")
        new_ca = introduced["next_ca"]["name"]
        assert any(line.startswith(f"node certificate issued by {new_ca} (") for line in doctor.details), (
            doctor
        )
    finally:
        testing.stop(cp)

    retired = _ca(cp, "retire")
    assert retired["ca"] == introduced["next_ca"] and retired["next_ca"] is None
    assert (cp.state_dir / "retired" / "ca.crt").is_file()
    cp = testing.start(work, args=("--cert-days", "30"))
    try:
        # The renewed nodes carry on; the node that never renewed is cut off and must re-enroll.
        assert _works(cp, old_node) == renewed.node_id
        assert _works(cp, new_node)
        with pytest.raises(VectorlayError):
            _works(cp, stale_node)
    finally:
        testing.stop(cp)
    # Nothing to retire any more: a clear error, no traceback.
    again = _cli("ca", "retire", "--state-dir", str(cp.state_dir))
    assert again.returncode == 1 and "no CA rotation under way" in again.stderr
    assert "Traceback" not in again.stderr


def test_a_retirement_killed_half_way_is_refused_at_start_and_finished_by_running_it_again(
    tmp_path: Path,
) -> None:
    import os
    import signal
    from datetime import datetime, timezone

    from bootstrap.fsutil import set_fault_hook
    from controlplane import rotation

    state = tmp_path / "state"
    now = datetime.now(timezone.utc)
    rotation.load(state, now)
    introduced = rotation.introduce(state, now)
    assert introduced.next_ca is not None
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        try:

            def hook(reached: str) -> None:
                if reached == f"write {state / 'ca.crt'}":  # ca.key already the new one
                    os.kill(os.getpid(), signal.SIGKILL)

            set_fault_hook(hook)
            rotation.retire(state, now)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL

    with pytest.raises(rotation.RotationError, match="run `ca retire` again"):
        rotation.load(state, now)
    serve = _cli(
        "serve", "--db", str(tmp_path / "cp.sqlite"), "--state-dir", str(state), "--listen", "127.0.0.1:0"
    )
    assert (
        serve.returncode == 1 and "run `ca retire` again" in serve.stderr and "Traceback" not in serve.stderr
    )
    done = rotation.retire(state, now)
    assert done.next_ca is None and done.ca.cert == introduced.next_ca.cert
    assert not (state / rotation.NEXT_DIR).exists()
