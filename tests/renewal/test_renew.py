"""Credentials that renew themselves: the real node-agent renewal code against the real control plane
(HTTPS, mTLS, SQLite) on loopback, on a simulated node tree whose commands are recorded."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from bootstrap.api import ApiClient, ApiError, ClientCert
from bootstrap.enroll import enroll
from bootstrap.host import RecordingRunner, TreeHost
from bootstrap.identity import load_identity
from bootstrap.nebula import parse_certificate_pem
from bootstrap.paths import IDENTITY_DIR
from bootstrap.renewal import next_renewal, read_credentials
from controlplane.clock import Clock
from doctor.checks import run_checks
from doctor.model import Status
from nodeagent.renewal import RELOADED_FILE, RenewalError, Renewer

DAY = 24 * 3600


def _api(cp: Any) -> ApiClient:
    return ApiClient(cp.url, ca_file=cp.ca_file, attempts=1)


def _enrolled(cp: Any, root: Path) -> TreeHost:
    cp.org("acme")
    host = TreeHost(root, RecordingRunner())
    enroll(host, _api(cp), cp.token("acme"), gpu_mode="none", hardware={})
    return host


def _files(root: Path) -> dict[str, bytes]:
    d = root / IDENTITY_DIR.lstrip("/")
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _self(cp: Any, root: Path, files: dict[str, bytes] | None = None, tmp: Path | None = None) -> Any:
    """GET /v1/node/self with the identity on disk (or the saved `files` of an earlier one)."""
    ident = load_identity(TreeHost(root))
    assert ident is not None
    cert, key, token = ident.cert_file, ident.key_file, ident.node_token()
    if files is not None and tmp is not None:
        cert, key = tmp / "old.crt", tmp / "old.key"
        cert.write_bytes(files["node.crt"])
        key.write_bytes(files["node.key"])
        key.chmod(0o600)
        token = files["node-token"].decode().strip()
    api = ApiClient(cp.url, ca_file=cp.ca_file, client_cert=ClientCert(cert, key), attempts=1)
    try:
        return api.request("GET", "/v1/node/self", bearer=token)
    finally:
        api.close()


def _renewer(host: TreeHost, cp: Any, **kwargs: Any) -> Renewer:
    return Renewer(host, lambda _ident: str(cp.url), timeout=20.0, **kwargs)


def test_a_renewal_makes_new_keys_keeps_the_node_and_its_overlay_ip_and_retires_the_old_pair(
    make_tree: Callable[..., Path], start_control_plane: Callable[..., Any], tmp_path: Path
) -> None:
    cp = start_control_plane(args=("--cert-days", "30"))
    root = make_tree("cpu-only")
    host = _enrolled(cp, root)
    before = _files(root)
    old = load_identity(host)
    assert old is not None
    creds = read_credentials(old.path)
    assert [c.kind for c in creds] == ["node", "nebula", "nomad"]
    # The control plane's lifetime setting reaches every certificate.
    assert all(
        c.not_after - c.not_before == timedelta(days=30, minutes=5) for c in creds if c.kind != "nebula"
    )

    new = _renewer(host, cp).renew()

    after = _files(root)
    assert (new.node_id, new.org_id, new.overlay_ip) == (old.node_id, old.org_id, old.overlay_ip)
    # A new key made on the node for every credential, a new token.
    for name in ("node.key", "nebula.key", "nomad.key", "node.crt", "nebula.crt", "nomad.crt", "node-token"):
        assert after[name] != before[name], name
    assert after["node.json"] == before["node.json"]
    assert after["enrollment.json"] == before["enrollment.json"]
    neb_old, neb_new = parse_certificate_pem(before["nebula.crt"]), parse_certificate_pem(after["nebula.crt"])
    assert neb_new.ips == neb_old.ips and neb_new.not_after >= neb_old.not_after
    assert next_renewal(read_credentials(new.path)) >= next_renewal(creds)
    # The new identity works; its first use retired the old pair.
    assert _self(cp, root)["node_id"] == old.node_id
    with pytest.raises(ApiError) as refused:
        _self(cp, root, before, tmp_path)
    assert refused.value.status == 401
    # nebula and Nomad were told to reload (SIGHUP through the units' ExecReload), never restarted.
    commands = [" ".join(c) for c in host.runner.commands]  # type: ignore[attr-defined]
    assert "systemctl reload nebula.service" in commands and "systemctl reload nomad.service" in commands
    assert not [c for c in commands if "restart" in c or " stop " in c]
    assert (root / RELOADED_FILE.lstrip("/")).read_text().strip() == (
        root / IDENTITY_DIR.lstrip("/")
    ).readlink().name
    # The doctor says when the renewed credentials renew next: two thirds into their 30 days.
    doctor = run_checks(TreeHost(root), env={}, only=["identity"]).get("identity")
    assert doctor.status is Status.PASS and doctor.message.endswith(", renews in 19 days"), doctor
    # The control plane stored what it issued, and its listing shows when the node's credentials expire.
    listed = cp.admin.org_summary("acme")["nodes"][0]["credentials_expire_at"]
    new_creds = {c.kind: c.not_after for c in read_credentials(new.path)}
    assert listed == {k: v.strftime("%Y-%m-%dT%H:%M:%SZ") for k, v in new_creds.items()}
    key = cp.api_key("acme")
    api_listed = requests.get(
        f"{cp.url}/v1/orgs/acme/provider/nodes",
        headers={"Authorization": f"Bearer {key}"},
        verify=str(cp.ca_file),
        timeout=30,
    ).json()["nodes"][0]["credentials_expire_at"]
    assert api_listed == listed


def test_the_agent_renews_at_two_thirds_of_the_lifetime_and_not_before(
    make_tree: Callable[..., Path], start_control_plane: Callable[..., Any]
) -> None:
    # The control plane's clock is moved 21 of 30 days on: it records the renewal on that clock.
    cp = start_control_plane(args=("--cert-days", "30"), env={"VECTORLAY_CP_CLOCK_OFFSET": str(21 * DAY)})
    cp.admin.clock = Clock(21 * DAY)  # tokens minted on the server's clock, as its admin CLI would
    root = make_tree("cpu-only")
    host = _enrolled(cp, root)
    ident = load_identity(host)
    assert ident is not None
    creds = read_credentials(ident.path)
    start = max(c.not_before for c in creds)
    life = min(c.not_after - c.not_before for c in creds)
    issued = cp.admin.db.conn().execute("SELECT COUNT(*) FROM node_certificates").fetchone()[0]

    clock = {"now": start + life * 0.6}
    renewer = _renewer(host, cp, now=lambda: clock["now"])
    assert renewer.tick() is None
    assert _files(root)["node.crt"] == (ident.path / "node.crt").read_bytes()
    assert cp.admin.db.conn().execute("SELECT COUNT(*) FROM node_certificates").fetchone()[0] == issued

    clock["now"] = start + life * 0.67
    new = renewer.tick()
    assert new is not None and new.node_id == ident.node_id
    assert cp.admin.db.conn().execute("SELECT COUNT(*) FROM node_certificates").fetchone()[0] == issued + 3
    recorded = cp.admin.db.conn().execute("SELECT MAX(issued_at) FROM node_certificates").fetchone()[0]
    assert recorded[:10] == (start + timedelta(days=21, minutes=5)).strftime("%Y-%m-%d")
    # Renewed credentials are due again two thirds into their own lifetime, not at once.
    renewed = read_credentials(new.path)
    clock["now"] = next_renewal(renewed) - timedelta(minutes=1)
    assert renewer.tick() is None


def test_a_removed_node_is_refused_a_renewal_and_keeps_its_files(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    root = make_tree("cpu-only")
    host = _enrolled(control_plane, root)
    ident = load_identity(host)
    assert ident is not None
    key = control_plane.api_key("acme")
    r = requests.patch(
        f"{control_plane.url}/v1/orgs/acme/provider/nodes/{ident.node_id}",
        json={"status": "removed"},
        headers={"Authorization": f"Bearer {key}"},
        verify=str(control_plane.ca_file),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    before = _files(root)
    with pytest.raises(RenewalError) as refused:
        _renewer(host, control_plane).renew()
    assert "decommissioned" in refused.value.message
    assert _files(root) == before


def test_a_failed_renewal_backs_off_and_leaves_the_working_identity(
    make_tree: Callable[..., Path], start_control_plane: Callable[..., Any]
) -> None:
    from controlplane import testing

    cp = start_control_plane()
    root = make_tree("cpu-only")
    host = _enrolled(cp, root)
    before = _files(root)
    ident = load_identity(host)
    assert ident is not None
    due = next_renewal(read_credentials(ident.path))
    mono = {"t": 1000.0}
    renewer = _renewer(host, cp, now=lambda: due + timedelta(hours=1), monotonic=lambda: mono["t"])
    testing.stop(cp)  # the control plane is down

    assert renewer.tick() is None and renewer.failures == 1
    first_wait = renewer._retry_at - mono["t"]
    assert 30 <= first_wait <= 60
    assert renewer.tick() is None and renewer.failures == 1  # backing off: no attempt
    mono["t"] += 61
    assert renewer.tick() is None and renewer.failures == 2
    assert 60 <= renewer._retry_at - mono["t"] <= 120
    assert _files(root) == before


def _agent(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodeagent.cli", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_node_agent_once_renew_renews_now_and_says_until_when(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    root = make_tree("cpu-only")
    _enrolled(control_plane, root)
    before = _files(root)
    res = _agent(root, "--once", "--renew")
    assert res.returncode == 0, res.stderr
    assert "renewed the credentials of node" in res.stdout
    assert "nebula: valid until" in res.stdout and "Traceback" not in res.stderr
    assert _files(root)["nebula.crt"] != before["nebula.crt"]

    alone = _agent(root, "--renew")
    assert alone.returncode != 0 and "--renew needs --once" in alone.stderr
    assert "Traceback" not in alone.stderr


def test_node_agent_once_renew_on_a_removed_node_fails_in_one_line(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    root = make_tree("cpu-only")
    host = _enrolled(control_plane, root)
    ident = load_identity(host)
    assert ident is not None
    control_plane.admin.set_node_status(
        control_plane.api_key("acme"), "acme", ident.node_id, {"status": "removed"}
    )
    before = _files(root)
    res = _agent(root, "--once", "--renew")
    assert res.returncode == 1
    assert "credentials not renewed" in res.stderr and "decommissioned" in res.stderr
    assert "Traceback" not in res.stderr and ident.node_token() not in res.stderr
    assert _files(root) == before


def test_the_renewal_endpoint_answers_bad_requests_with_4xx(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    root = make_tree("cpu-only")
    host = _enrolled(control_plane, root)
    ident = load_identity(host)
    assert ident is not None
    cert = (str(ident.cert_file), str(ident.key_file))
    url = f"{control_plane.url}/v1/node/renew"
    auth = {"Authorization": f"Bearer {ident.node_token()}"}
    ca = str(control_plane.ca_file)
    no_cert = requests.post(url, json={}, headers=auth, verify=ca, timeout=30)
    assert no_cert.status_code == 401
    bad = requests.post(url, json={"csr_pem": "x"}, headers=auth, cert=cert, verify=ca, timeout=30)
    assert bad.status_code == 400 and "nebula_public_key" in bad.json()["error"]["message"]
    bad_csr = requests.post(
        url,
        json={"csr_pem": "x", "nebula_public_key": "y", "nomad_csr_pem": "z"},
        headers=auth,
        cert=cert,
        verify=ca,
        timeout=30,
    )
    assert bad_csr.status_code == 400 and "csr_pem" in bad_csr.json()["error"]["message"]
    not_json = requests.post(
        url, data="[", headers={**auth, "Content-Type": "application/json"}, cert=cert, verify=ca, timeout=30
    )
    assert not_json.status_code == 400
    wrong_token = requests.post(
        url, json={}, headers={"Authorization": "Bearer vnt_wrong"}, cert=cert, verify=ca, timeout=30
    )
    assert wrong_token.status_code in (400, 401)


def test_a_reload_that_fails_after_the_switch_keeps_the_new_identity_and_is_retried(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    from bootstrap.host import CommandResult

    root = make_tree("cpu-only")
    _enrolled(control_plane, root)
    fail = {"reload": True}

    def systemctl(_host: Any, cmd: tuple[str, ...]) -> CommandResult:
        if cmd[1] == "reload" and fail["reload"]:
            return CommandResult(cmd, 1, "", "Job for nebula.service failed.\n")
        return CommandResult(cmd, 0, "", "")

    runner = RecordingRunner(handlers={"systemctl": systemctl})
    host = TreeHost(root, runner)
    before = _files(root)
    new = _renewer(host, control_plane).renew()  # renewed: only the reload is owed
    assert _files(root)["node.crt"] != before["node.crt"]
    assert _self(control_plane, root)["node_id"] == new.node_id
    assert not (root / RELOADED_FILE.lstrip("/")).exists()
    fail["reload"] = False
    assert _renewer(host, control_plane).tick() is None  # not due; the owed reload goes out
    reloads = [c for c in runner.commands if c[:2] == ("systemctl", "reload")]
    assert reloads[-2:] == [
        ("systemctl", "reload", "nebula.service"),
        ("systemctl", "reload", "nomad.service"),
    ]
    assert (root / RELOADED_FILE.lstrip("/")).read_text().strip() == (
        root / IDENTITY_DIR.lstrip("/")
    ).readlink().name


def test_the_agent_service_renews_when_due_and_beats_with_the_new_identity(
    control_plane: Any, tmp_path: Path
) -> None:
    import shutil
    import tempfile
    import threading

    from hostsim import build_host, load_topology
    from nodeagent.agent import Agent, Daemon

    # Short: the health socket lives under the tree, and socket paths stop at 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="vlr", dir="/tmp"))
    try:
        root = build_host(base / "n", load_topology("cpu-only"))
        host = _enrolled(control_plane, root)
        old = load_identity(host)
        assert old is not None
        due = next_renewal(read_credentials(old.path))
        old_generation = old.path.resolve()
        agent = Agent(host, now=lambda: due + timedelta(minutes=1))
        daemon = Daemon(agent)

        def one_round(_ev: threading.Event, _delay: float) -> bool:
            daemon._stop = True
            return True

        daemon.wait = one_round
        assert daemon.run() == 0
        new = load_identity(TreeHost(root))
        assert new is not None and new.path.resolve() != old_generation
        assert new.node_id == old.node_id
        # The heartbeat after the renewal went out with the new pair, which made it the current one.
        row = (
            control_plane.admin.db.conn()
            .execute("SELECT pending_cert_fp, heartbeats FROM nodes JOIN node_heartbeats ON node_id = id")
            .fetchone()
        )
        assert row["pending_cert_fp"] is None and row["heartbeats"] == 1
        assert _self(control_plane, root)["node_id"] == old.node_id
    finally:
        shutil.rmtree(base, ignore_errors=True)
