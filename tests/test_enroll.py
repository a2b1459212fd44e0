"""Enrollment end to end: the real `vectorlay-bootstrap enroll` against a real control plane on loopback."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bootstrap.api import ApiClient, ApiError, ClientCert
from bootstrap.cli import main
from bootstrap.enroll import enroll
from bootstrap.host import TreeHost
from bootstrap.identity import load_identity
from bootstrap.paths import ENROLLED_GPUS, IDENTITY_DIR
from controlplane.clock import wall_now
from controlplane.pki import CertificateAuthority

Run = Callable[..., tuple[int, str, str]]


def _gpus_on_vfio(desc: dict[str, Any]) -> None:
    """The HGX with its GPUs already bound to vfio-pci: eight ready GPU units."""
    for dev in desc["devices"]:
        if dev["id"] == "10de:2330":
            dev["driver"] = "vfio-pci"


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """`vectorlay-bootstrap ARGS` through the console-script entry, with the token in the environment."""

    def _run(*argv: str, token: str | None = None, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        if token is None:
            monkeypatch.delenv("VECTORLAY_TOKEN", raising=False)
        else:
            monkeypatch.setenv("VECTORLAY_TOKEN", token)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        try:
            main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def enroll_args(root: Path, cp: Any) -> list[str]:
    return ["enroll", "--root", str(root), "--api", cp.url, "--ca-file", str(cp.ca_file)]


def snapshot(root: Path) -> dict[str, Any]:
    """Everything under /etc/vectorlay: file bytes and modes, and where the identity link points."""
    base = root / "etc/vectorlay"
    out: dict[str, Any] = {}
    for p in sorted(base.rglob("*")) if base.exists() else []:
        rel = str(p.relative_to(base))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
    return out


def node_self(cp: Any, root: Path, *, token: str | None = None, cert_dir: Path | None = None) -> Any:
    """GET /v1/node/self with the identity found under `root` (or the given cert dir/token)."""
    ident = load_identity(TreeHost(root))
    assert ident is not None
    d = cert_dir or ident.path
    api = ApiClient(
        cp.url, ca_file=cp.ca_file, client_cert=ClientCert(d / "node.crt", d / "node.key"), attempts=1
    )
    try:
        return api.request("GET", "/v1/node/self", bearer=token if token is not None else ident.node_token())
    finally:
        api.close()


def test_first_enrollment_writes_a_complete_identity_the_control_plane_accepts(
    make_tree: Callable[..., Path], control_plane: Any, run_cli: Run
) -> None:
    root = make_tree("hgx-h100", _gpus_on_vfio)
    org = control_plane.org("acme")
    code, out, err = run_cli(*enroll_args(root, control_plane), token=control_plane.token("acme"))
    assert code == 0, err
    assert "provisioning token valid until" in err
    ident = load_identity(TreeHost(root))
    assert ident is not None
    assert out.strip() == f"enrolled node {ident.node_id} (org {org}, overlay IP {ident.overlay_ip})"
    assert ident.org_id == org and ident.overlay_ip.startswith("100.64.")

    idir = root / IDENTITY_DIR.lstrip("/")
    assert idir.is_symlink()
    assert stat.S_IMODE(idir.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in idir.iterdir()}
    assert modes == {
        "node.key": 0o600,
        "node-token": 0o600,
        "node.crt": 0o644,
        "ca.crt": 0o644,
        "nebula.key": 0o600,
        "nebula.crt": 0o644,
        "nebula-ca.crt": 0o644,
        "nomad.key": 0o600,
        "nomad.crt": 0o644,
        "nomad-ca.crt": 0o644,
        "node.json": 0o644,
        "enrollment.json": 0o644,
    }
    assert (idir / "ca.crt").read_bytes() == control_plane.ca_file.read_bytes()
    node_json = json.loads((idir / "node.json").read_text())
    assert node_json == {
        "node_id": ident.node_id,
        "org_id": org,
        "overlay_ip": ident.overlay_ip,
        "api": control_plane.url,
    }
    enrollment = ident.enrollment()
    assert enrollment["nebula"]["overlay_ip"] == ident.overlay_ip
    assert enrollment["nomad"]["meta"]["vectorlay_node_id"] == ident.node_id
    assert enrollment["gpu_mode"] == "passthrough"
    assert ident.node_token() not in (idir / "enrollment.json").read_text()

    me = node_self(control_plane, root)
    assert me["node_id"] == ident.node_id and me["status"] == "active"
    assert me["gpu_units"]["total"] == 8  # the HGX's eight GPU units were registered


def test_the_enrollment_records_the_gpus_it_enrolled_with_for_the_doctor(
    make_tree: Callable[..., Path], control_plane: Any, run_cli: Run
) -> None:
    root = make_tree("hgx-h100", _gpus_on_vfio)
    code, _, err = run_cli(
        *enroll_args(root, control_plane), token=control_plane.token(control_plane.org("a"))
    )
    assert code == 0, err
    record = root / ENROLLED_GPUS.lstrip("/")
    assert stat.S_IMODE(record.stat().st_mode) == 0o644
    data = json.loads(record.read_text())
    assert data["version"] == 1 and data["gpu_mode"] == "passthrough"
    assert data["gpus"][0] == {"address": "0000:18:00.0", "iommu_group": "24"}
    assert [g["iommu_group"] for g in data["gpus"]] == [str(n) for n in range(24, 32)]


def test_reenrollment_keeps_node_id_and_overlay_ip_and_rotates_the_token(
    make_tree: Callable[..., Path], control_plane: Any, run_cli: Run, tmp_path: Path
) -> None:
    root = make_tree("cpu-only")
    control_plane.org("acme", node_quota=1)
    assert run_cli(*enroll_args(root, control_plane), token=control_plane.token("acme"))[0] == 0
    first = load_identity(TreeHost(root))
    assert first is not None
    old_token = first.node_token()
    old_certs = tmp_path / "old-certs"
    old_certs.mkdir()
    for name in ("node.crt", "node.key"):
        (old_certs / name).write_bytes((first.path / name).read_bytes())

    code, out, err = run_cli(*enroll_args(root, control_plane), token=control_plane.token("acme"))
    assert code == 0, err
    second = load_identity(TreeHost(root))
    assert second is not None
    assert out.startswith(f"re-enrolled node {first.node_id} ")
    assert (second.node_id, second.overlay_ip) == (first.node_id, first.overlay_ip)
    assert second.node_token() != old_token
    assert (second.path / "node.crt").read_bytes() != (old_certs / "node.crt").read_bytes()

    assert node_self(control_plane, root)["node_id"] == first.node_id
    with pytest.raises(ApiError) as refused:
        node_self(control_plane, root, token=old_token)
    assert refused.value.status == 401
    with pytest.raises(ApiError) as old_pair:
        node_self(control_plane, root, token=old_token, cert_dir=old_certs)
    assert old_pair.value.status == 401
    # Only the current generation is left on disk.
    assert [p.name for p in (root / "etc/vectorlay").iterdir() if p.name.startswith(".identity-")] == [
        os.readlink(root / IDENTITY_DIR.lstrip("/"))
    ]


def test_reenrollment_consumes_no_node_quota(
    make_tree: Callable[..., Path], control_plane: Any, run_cli: Run
) -> None:
    root, other = make_tree("cpu-only"), make_tree("cpu-only")
    control_plane.org("acme", node_quota=1)
    for _ in range(3):
        code, _, err = run_cli(*enroll_args(root, control_plane), token=control_plane.token("acme"))
        assert code == 0, err
    assert len(control_plane.admin.org_summary("acme")["nodes"]) == 1

    code, _, err = run_cli(*enroll_args(other, control_plane), token=control_plane.token("acme"))
    assert code == 1
    assert "409" in err and "NODE_QUOTA_EXCEEDED" in err
    assert load_identity(TreeHost(other)) is None


def test_a_used_token_is_refused_with_401_and_the_identity_is_untouched(
    make_tree: Callable[..., Path], control_plane: Any, run_cli: Run
) -> None:
    root = make_tree("cpu-only")
    control_plane.org("acme")
    token = control_plane.token("acme")
    assert run_cli(*enroll_args(root, control_plane), token=token)[0] == 0
    before = snapshot(root)

    code, out, err = run_cli(*enroll_args(root, control_plane), token=token)
    assert code == 1 and out == ""
    assert "401 bad, missing or expired token" in err
    assert "ask for a new one in the dashboard" in err
    assert "Traceback" not in err
    assert snapshot(root) == before

    # The control plane itself refuses it too (the CLI's preflight is not the only guard).
    api = ApiClient(control_plane.url, ca_file=control_plane.ca_file, attempts=1)
    with pytest.raises(ApiError) as e:
        enroll(TreeHost(root), api, token, gpu_mode="none", hardware={})
    assert e.value.status == 401 and e.value.code == "TOKEN_USED"
    assert snapshot(root) == before
    assert node_self(control_plane, root)["status"] == "active"


def test_an_expired_token_is_refused_by_a_control_plane_whose_clock_moved_past_its_hour(
    make_tree: Callable[..., Path], start_control_plane: Callable[..., Any], run_cli: Run
) -> None:
    # The server runs 61 minutes ahead of the clock that minted the token.
    cp = start_control_plane(env={"VECTORLAY_CP_CLOCK_OFFSET": str(61 * 60)})
    cp.org("acme")
    root = make_tree("cpu-only")
    code, _, err = run_cli(*enroll_args(root, cp), token=cp.token("acme"))
    assert code == 1
    assert "401 bad, missing or expired token (the provisioning token is expired)" in err
    assert not (root / "etc/vectorlay").exists()


def test_an_expired_token_minted_by_the_admin_cli_in_the_past_is_refused(
    make_tree: Callable[..., Path], control_plane: Any, run_cli: Run
) -> None:
    control_plane.org("acme")
    minted = control_plane.cli("token", "create", "--org", "acme", env={"VECTORLAY_CP_CLOCK_OFFSET": "-3601"})
    assert minted.returncode == 0, minted.stderr
    root = make_tree("cpu-only")
    code, _, err = run_cli(*enroll_args(root, control_plane), token=minted.stdout.strip())
    assert code == 1 and "expired" in err


def test_an_org_that_is_not_a_provider_gets_403_and_its_token_is_not_consumed(
    make_tree: Callable[..., Path], control_plane: Any, run_cli: Run
) -> None:
    control_plane.org("hobbyist", provider=False)
    token = control_plane.token("hobbyist")
    root = make_tree("cpu-only")
    code, _, err = run_cli(*enroll_args(root, control_plane), token=token)
    assert code == 1
    assert "403 NOT_A_PROVIDER: this org isn't an approved provider yet" in err
    assert not (root / "etc/vectorlay").exists()
    # Not consumed: introspection says why it would be refused, and that is not "used".
    assert control_plane.admin.introspect(token)["reason"] == "not_a_provider"

    control_plane.admin.update_org("hobbyist", provider=True, node_quota=None)
    assert control_plane.admin.introspect(token)["valid"] is True
    code, _, err = run_cli(*enroll_args(root, control_plane), token=token)
    assert code == 0, err


def test_decommission_then_reenroll_brings_the_node_back(
    make_tree: Callable[..., Path], control_plane: Any, run_cli: Run
) -> None:
    root = make_tree("hgx-h100", _gpus_on_vfio)
    org = control_plane.org("acme")
    key = control_plane.api_key("acme")
    assert run_cli(*enroll_args(root, control_plane), token=control_plane.token("acme"))[0] == 0
    ident = load_identity(TreeHost(root))
    assert ident is not None

    args = ["decommission", "--api", control_plane.url, "--org", org, "--node", ident.node_id]
    args += ["--ca-file", str(control_plane.ca_file)]
    code, _, err = run_cli(*args)
    assert code == 1 and "VL_KEY" in err
    code, out, err = run_cli(*args, env={"VL_KEY": "vlk_not-a-real-key-at-all-xxxxxxxxxxxxxxxxx"})
    assert code == 1 and "401" in err
    code, out, err = run_cli(*args, env={"VL_KEY": key})
    assert code == 0, err
    assert f"node {ident.node_id} removed; 8 GPU unit(s) freed" in out

    with pytest.raises(ApiError) as removed:
        node_self(control_plane, root)
    assert removed.value.status == 403 and removed.value.code == "NODE_REMOVED"

    code, out, err = run_cli(*enroll_args(root, control_plane), token=control_plane.token("acme"))
    assert code == 0, err
    assert out.startswith(f"re-enrolled node {ident.node_id} ")
    back = node_self(control_plane, root)
    assert back["status"] == "active" and back["overlay_ip"] == ident.overlay_ip
    assert back["gpu_units"] == {"total": 8, "allocatable": 8}


def test_a_client_certificate_from_a_foreign_ca_is_refused_by_node_self(
    make_tree: Callable[..., Path], control_plane: Any, run_cli: Run, tmp_path: Path
) -> None:
    root = make_tree("cpu-only")
    control_plane.org("acme")
    assert run_cli(*enroll_args(root, control_plane), token=control_plane.token("acme"))[0] == 0
    ident = load_identity(TreeHost(root))
    assert ident is not None

    # A foreign CA signs a certificate claiming to be this very node, for the node's own key: only
    # the issuer differs from the genuine one.
    foreign = CertificateAuthority.load_or_create(tmp_path / "foreign-ca", wall_now())
    key = serialization.load_pem_private_key(ident.key_file.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    subject = x509.load_pem_x509_certificate(ident.cert_file.read_bytes()).subject
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    forged = foreign.sign_node_csr(
        csr.public_bytes(serialization.Encoding.PEM).decode(), ident.node_id, ident.org_id, wall_now()
    )
    forged_file = tmp_path / "forged.crt"
    forged_file.write_bytes(forged.public_bytes(serialization.Encoding.PEM))

    def get_self(cert_file: Path, tls: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> int:
        ctx = ssl.create_default_context(cafile=str(control_plane.ca_file))
        ctx.maximum_version = tls
        ctx.load_cert_chain(str(cert_file), str(ident.path / "node.key"))
        host, port = control_plane.url.removeprefix("https://").split(":")
        conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
        try:
            conn.request("GET", "/v1/node/self", headers={"Authorization": f"Bearer {ident.node_token()}"})
            return conn.getresponse().status
        finally:
            conn.close()

    assert get_self(ident.path / "node.crt") == 200  # the genuine certificate, same key: accepted
    # TLS 1.2 verifies the client inside the handshake, so the server's alert names the reason.
    with pytest.raises(ssl.SSLError, match=r"(?i)alert unknown ca"):
        get_self(forged_file, ssl.TLSVersion.TLSv1_2)
    # TLS 1.3 finishes the client's handshake first; the server then aborts instead of answering.
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        get_self(forged_file)
    # The refusal is the server's verification, as its log says (written just after the alert).
    deadline = time.monotonic() + 10
    while control_plane.log().count("CERTIFICATE_VERIFY_FAILED") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert control_plane.log().count("CERTIFICATE_VERIFY_FAILED") == 2


def test_two_concurrent_enrollments_with_one_token_have_exactly_one_winner(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    control_plane.org("acme")
    token = control_plane.token("acme")
    roots = [make_tree("cpu-only") for _ in range(8)]
    barrier = threading.Barrier(len(roots))
    results: list[object] = [None] * len(roots)

    def attempt(i: int) -> None:
        api = ApiClient(control_plane.url, ca_file=control_plane.ca_file, attempts=1)
        barrier.wait()
        try:
            results[i] = enroll(TreeHost(roots[i]), api, token, gpu_mode="none", hardware={})
        except ApiError as e:
            results[i] = e

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(roots))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if not isinstance(r, ApiError)]
    losers = [r for r in results if isinstance(r, ApiError)]
    assert len(winners) == 1
    assert [(e.status, e.code) for e in losers] == [(401, "TOKEN_USED")] * (len(roots) - 1)
    assert sum(load_identity(TreeHost(r)) is not None for r in roots) == 1
    assert len(control_plane.admin.org_summary("acme")["nodes"]) == 1


def test_without_ca_file_the_private_ca_is_not_trusted_and_nothing_is_written(
    make_tree: Callable[..., Path], control_plane: Any, run_cli: Run
) -> None:
    control_plane.org("acme")
    root = make_tree("cpu-only")
    code, _, err = run_cli(
        "enroll", "--root", str(root), "--api", control_plane.url, token=control_plane.token("acme")
    )
    assert code == 1
    assert f"TLS verification of {control_plane.url}" in err and "--ca-file" in err
    assert not (root / "etc/vectorlay").exists()


def test_an_unreachable_control_plane_is_retried_with_backoff_then_reported_with_its_url(
    make_tree: Callable[..., Path], control_plane: Any, run_cli: Run
) -> None:
    import socket

    root = make_tree("cpu-only")
    control_plane.org("acme")
    assert run_cli(*enroll_args(root, control_plane), token=control_plane.token("acme"))[0] == 0
    before = snapshot(root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"https://127.0.0.1:{s.getsockname()[1]}"
    slept: list[float] = []
    api = ApiClient(dead, ca_file=control_plane.ca_file, attempts=4, backoff=0.25, sleep=slept.append)
    with pytest.raises(ApiError) as e:
        enroll(TreeHost(root), api, control_plane.token("acme"), gpu_mode="none", hardware={})
    assert slept == [0.25, 0.5, 1.0]
    assert e.value.message.startswith(f"could not reach {dead}/v1/nodes/enroll")
    assert "gave up after 4 attempt(s)" in e.value.message
    assert snapshot(root) == before


def test_reenrollment_without_ca_file_trusts_the_ca_pinned_at_the_first_enrollment(
    make_tree: Callable[..., Path], control_plane: Any, run_cli: Run
) -> None:
    root = make_tree("cpu-only")
    control_plane.org("acme")
    assert run_cli(*enroll_args(root, control_plane), token=control_plane.token("acme"))[0] == 0
    first = load_identity(TreeHost(root))
    assert first is not None
    code, out, err = run_cli(
        "enroll", "--root", str(root), "--api", control_plane.url, token=control_plane.token("acme")
    )
    assert code == 0, err
    assert out.startswith(f"re-enrolled node {first.node_id} ")


def test_the_control_plane_itself_refuses_an_expired_token_with_401(
    make_tree: Callable[..., Path], start_control_plane: Callable[..., Any]
) -> None:
    cp = start_control_plane(env={"VECTORLAY_CP_CLOCK_OFFSET": str(3601)})
    cp.org("acme")
    token = cp.token("acme")  # minted by the real clock: expired by the server's
    root = make_tree("cpu-only")
    with pytest.raises(ApiError) as e:
        enroll(
            TreeHost(root),
            ApiClient(cp.url, ca_file=cp.ca_file, attempts=1),
            token,
            gpu_mode="none",
            hardware={},
        )
    assert (e.value.status, e.value.code) == (401, "TOKEN_EXPIRED")
    assert "401 bad, missing or expired token" in e.value.message
    assert e.value.hint == "ask for a new one in the dashboard"
    assert not (root / "etc/vectorlay").exists()


@pytest.mark.slow
def test_an_identity_from_another_control_plane_is_not_presented_and_the_node_enrolls_anew(
    make_tree: Callable[..., Path], start_control_plane: Callable[..., Any]
) -> None:
    old_cp, new_cp = start_control_plane(), start_control_plane()
    for cp in (old_cp, new_cp):
        cp.org("acme")
    root = make_tree("cpu-only")
    first = enroll(
        TreeHost(root),
        ApiClient(old_cp.url, ca_file=old_cp.ca_file),
        old_cp.token("acme"),
        gpu_mode="none",
        hardware={},
    )
    moved = enroll(
        TreeHost(root),
        ApiClient(new_cp.url, ca_file=new_cp.ca_file),
        new_cp.token("acme"),
        gpu_mode="none",
        hardware={},
    )
    assert moved.reenrolled is False and moved.node_id != first.node_id
    assert load_identity(TreeHost(root)).api == new_cp.url  # type: ignore[union-attr]


class _Flaky:
    """An HTTPS server (the control plane's own certificate) answering 503 a given number of times."""

    def __init__(self, cp: Any, failures: int) -> None:
        import http.server

        outer = self
        self.hits = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.hits += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ok = outer.hits > failures
                body = json.dumps(
                    {"valid": True, "expires_at": None}
                    if ok
                    else {"error": {"code": "UNAVAILABLE", "message": "database is restarting"}}
                ).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cp.state_dir / "server.crt"), str(cp.state_dir / "server.key"))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("failures", [2, 10])
@pytest.mark.slow
def test_5xx_answers_are_retried_with_backoff_and_reported_with_url_and_status(
    control_plane: Any, failures: int
) -> None:
    from bootstrap.enroll import introspect_token

    flaky = _Flaky(control_plane, failures)
    slept: list[float] = []
    api = ApiClient(flaky.url, ca_file=control_plane.ca_file, attempts=4, backoff=0.5, sleep=slept.append)
    try:
        if failures < 4:
            assert introspect_token(api, "vtk_" + "a" * 43).valid is True
            assert slept == [0.5, 1.0]
        else:
            with pytest.raises(ApiError) as e:
                introspect_token(api, "vtk_" + "a" * 43)
            assert e.value.message == (
                f"POST {flaky.url}/v1/provisioning-tokens/introspect returned 503: UNAVAILABLE: "
                "database is restarting (gave up after 4 attempt(s))"
            )
            assert slept == [0.5, 1.0, 2.0]
    finally:
        api.close()
        flaky.close()


def test_a_gpu_box_whose_gpus_cannot_be_passed_through_yet_is_not_enrolled(
    make_tree: Callable[..., Path], control_plane: Any, run_cli: Run
) -> None:
    control_plane.org("acme")
    token = control_plane.token("acme")
    root = make_tree("hgx-h100")  # GPUs still on the nvidia driver
    code, _, err = run_cli(*enroll_args(root, control_plane), token=token)
    assert code == 1
    assert "GPU passthrough is not working yet: 0/8 GPU unit(s) ready" in err
    assert not (root / "etc/vectorlay").exists()
    assert control_plane.admin.introspect(token)["valid"] is True

    # Container mode keeps the GPUs on the host driver: nothing to wait for.
    code, _, err = run_cli(
        *enroll_args(root, control_plane), token=token, env={"VECTORLAY_GPU_MODE": "container"}
    )
    assert code == 0, err
    ident = load_identity(TreeHost(root))
    assert ident is not None and ident.enrollment()["gpu_mode"] == "container"
