"""Rollback and freeze of the signed manifest (issue 13, class 1), against the real control plane and
a replaying HTTPS server the node trusts: an old manifest the control plane really signed is refused,
so is an expired one, and a manifest listing fewer artifacts leaves the installed agents alone."""

from __future__ import annotations

import http.server
import json
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bootstrap import artifacts, update
from bootstrap.commands.runner import step
from bootstrap.errors import VectorlayError
from bootstrap.host import Host, RecordingRunner, TreeHost
from bootstrap.manifest import check_fresh, sign_manifest, verify_manifest
from bootstrap.settings import load_settings
from bootstrap.stages.contract import Context, Facts
from bootstrap.stages.registry import BY_NAME
from bootstrap.state import load_state
from controlplane.pki import CertificateAuthority
from hostsim import build_host, inject, load_topology
from hostsim.agents import agent_tarball, publish, publish_agents
from hostsim.systemd import Systemd, active_state, install

from .artifact_helpers import make_tarball, manifest_for

OLD = {"nebula": "0.9.0", "nomad": "1.8.4", "node-agent": "1.0.0"}


@dataclass
class Node:
    root: Path
    cp: Any
    art_dir: Path
    sim: Systemd

    def host(self) -> Host:
        return TreeHost(self.root, install(RecordingRunner(), self.sim))

    def install_agents(self) -> None:
        host = self.host()
        ctx = Context(
            host=host,
            settings=load_settings(host),
            state=load_state(host),
            api=self.cp.url,
            ca_file=self.cp.ca_file,
            out=lambda _line: None,
        )
        facts = Facts()
        for name in ("artifacts", "agents"):
            _result, facts = step(ctx, BY_NAME[name], facts, plan_only=False)

    def update(self, api: str | None = None) -> subprocess.CompletedProcess[str]:
        env = inject.env(settle=update.DEFAULT_SETTLE, forbid_live=False)
        if api is not None:
            env["VECTORLAY_API"] = api
        return subprocess.run(
            [sys.executable, "-m", "bootstrap.cli", "update", "--root", str(self.root)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def fetch(self, path: str) -> requests.Response:
        """GET as the node does: its client certificate and node token."""
        ident = self.root / "etc/vectorlay/identity"
        token = (ident / "node-token").read_text().strip()
        return requests.get(
            self.cp.url + path,
            cert=(str(ident / "node.crt"), str(ident / "node.key")),
            headers={"Authorization": f"Bearer {token}"},
            verify=str(self.cp.ca_file),
            timeout=30,
        )


def _make_node(start_control_plane: Callable[..., Any], tmp_path: Path, **cp_kwargs: Any) -> Iterator[Node]:
    art_dir = tmp_path / "artifacts"
    publish_agents(art_dir, OLD)
    cp = start_control_plane(args=("--artifacts", str(art_dir)), **cp_kwargs)
    cp.org("acme", provider=True)
    base = Path(tempfile.mkdtemp(prefix="vl", dir="/tmp"))  # short: agents' unix socket paths
    root = build_host(base / "r", load_topology("cpu-only"))
    res = cp.enroll(root, "acme")
    assert res.returncode == 0, res.stderr
    node = Node(root, cp, art_dir, Systemd(spawn=True))
    try:
        yield node
    finally:
        node.sim.stop_all(node.host())
        shutil.rmtree(base)


@pytest.fixture
def node(
    start_control_plane: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Node]:
    monkeypatch.setattr(update, "DEFAULT_SETTLE", 0.2)
    yield from _make_node(start_control_plane, tmp_path)


class ReplayServer:
    """HTTPS on loopback with a certificate from a CA the node trusts (a TLS-terminating proxy, a
    mis-issued certificate), serving fixed answers by path and recording what was asked."""

    def __init__(self, workdir: Path, ca_dir: Path, answers: dict[str, tuple[str, bytes]]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(ca_dir / "ca.key", workdir / "ca.key")
        shutil.copy(ca_dir / "ca.crt", workdir / "ca.crt")
        ca = CertificateAuthority.load_or_create(workdir, datetime.now(timezone.utc))
        cert, key = ca.write_server_cert(workdir, "127.0.0.1", datetime.now(timezone.utc))
        self.asked: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.asked.append(self.path)
                content_type, body = answers.get(self.path, ("text/plain", b"not here"))
                self.send_response(200 if self.path in answers else 404)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_an_older_signed_manifest_replayed_by_a_trusted_server_does_not_downgrade_nebula(
    node: Node, tmp_path: Path
) -> None:
    node.install_agents()
    captured = node.fetch("/v1/artifacts/manifest")
    assert captured.status_code == 200 and captured.json()["serial"] == 1
    old_blob = node.fetch(captured.json()["artifacts"][0]["url"]).content  # nebula 0.9.0

    publish(node.art_dir, "nebula", "1.0.0", agent_tarball("nebula", "1.0.0"))
    res = node.update()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "update: done: nebula 1.0.0" in res.stdout and "(serial 2)" in res.stdout
    assert json.loads((node.root / "var/lib/vectorlay/state.json").read_text())["manifest_serial"] == 2

    replay = ReplayServer(
        tmp_path / "replay",
        node.cp.state_dir,
        {
            "/v1/artifacts/manifest": ("application/json", captured.content),
            "/v1/artifacts/nebula/0.9.0": ("application/octet-stream", old_blob),
        },
    )
    try:
        res = node.update(api=replay.url)
    finally:
        replay.close()
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert (
        f"the artifact manifest from {replay.url} has serial 1, older than serial 2 this node already"
        " accepted: refusing a rollback to older versions" in res.stderr
    )
    assert replay.asked == ["/v1/artifacts/manifest"]  # the old nebula was never even fetched
    host = node.host()
    assert artifacts.current_version(host, "nebula") == "1.0.0"
    assert active_state(host, "nebula.service") == "active"


@pytest.mark.slow
def test_the_control_planes_serial_survives_a_restart_and_never_goes_back(node: Node) -> None:
    from controlplane import testing

    def serial() -> int:
        got = node.fetch("/v1/artifacts/manifest")
        assert got.status_code == 200, got.text
        return int(got.json()["serial"])

    assert serial() == serial() == 1  # an unchanged set keeps its serial
    publish(node.art_dir, "nebula", "1.0.0", agent_tarball("nebula", "1.0.0"))
    assert serial() == 2
    testing.stop(node.cp)
    # The same database and state dir: a restarted control plane remembers.
    node.cp = testing.start(node.cp.db_path.parent, args=("--artifacts", str(node.art_dir)))
    try:
        assert serial() == 2
        shutil.rmtree(node.art_dir / "nebula" / "1.0.0")  # back to the set serial 1 numbered
        assert serial() == 3
        assert json.loads((node.cp.state_dir / "manifest-serial.json").read_text())["serial"] == 3
    finally:
        testing.stop(node.cp)  # started here, so not the fixture's to stop


@pytest.mark.slow
def test_a_manifest_listing_fewer_artifacts_keeps_the_installed_agent(node: Node) -> None:
    node.install_agents()
    shutil.rmtree(node.art_dir / "nomad")
    res = node.update()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "update: nomad is not in manifest" in res.stdout and "keeping 1.8.4" in res.stdout
    host = node.host()
    assert artifacts.current_version(host, "nomad") == "1.8.4"
    assert host.exists("/opt/vectorlay/releases/nomad/1.8.4/bin/nomad")
    assert active_state(host, "nomad.service") == "active"
    # The install run's artifacts stage keeps it too.
    node.install_agents()
    assert artifacts.current_version(node.host(), "nomad") == "1.8.4"


@pytest.mark.slow
def test_an_expired_manifest_is_refused_and_nothing_is_installed(
    start_control_plane: Callable[..., Any], tmp_path: Path
) -> None:
    # A control plane whose clock is two days behind signs manifests that expired yesterday: what a
    # node sees when something keeps serving it yesterday's answer.
    for node in _make_node(start_control_plane, tmp_path, env={"VECTORLAY_CP_CLOCK_OFFSET": "-172800"}):
        with pytest.raises(VectorlayError) as e:
            node.install_agents()
        assert "(serial 1) expired at" in e.value.message
        assert "refusing a stale manifest" in e.value.message
        assert not node.host().exists("/opt/vectorlay/releases/nebula")


def _signed(key: Ed25519PrivateKey, **fields: Any) -> dict[str, Any]:
    doc = manifest_for({("nebula", "1.0.0"): make_tarball("nebula", "1.0.0")}, key)
    body = {k: v for k, v in doc.items() if k != "signature"}
    body.update(fields)
    return sign_manifest({k: v for k, v in body.items() if v is not None}, key)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"serial": None}, "needs a positive integer 'serial', got None"),  # from before serials
        ({"serial": 0}, "needs a positive integer 'serial'"),
        ({"serial": True}, "needs a positive integer 'serial'"),
        ({"serial": "7"}, "needs a positive integer 'serial'"),
        ({"expires_at": None}, "needs an ISO 8601 time 'expires_at'"),
        ({"expires_at": "tomorrow"}, "needs an ISO 8601 time 'expires_at'"),
        ({"expires_at": "2099-01-01T00:00:00"}, "'expires_at' has no time zone"),
        ({"issued_at": "2100-01-01T00:00:00Z"}, "'expires_at' is not after 'issued_at'"),
    ],
)
def test_a_signed_manifest_without_a_usable_serial_or_expiry_is_refused(
    fields: dict[str, Any], message: str
) -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(VectorlayError, match="malformed") as e:
        verify_manifest(_signed(key, **fields), [key.public_key()])
    assert message in e.value.message


def test_the_same_serial_again_is_accepted_and_a_lower_one_or_an_expired_one_is_not() -> None:
    key = Ed25519PrivateKey.generate()
    m = verify_manifest(_signed(key, serial=5), [key.public_key()])
    check_fresh(m, 5)
    check_fresh(m, 4)
    with pytest.raises(VectorlayError, match="has serial 5, older than serial 6"):
        check_fresh(m, 6)
    with pytest.raises(VectorlayError, match="expired at"):
        check_fresh(m, 5, now=m.expires_at)
    with pytest.raises(VectorlayError, match="expired at"):
        check_fresh(m, 5, now=datetime.now(timezone.utc) + timedelta(days=2))
