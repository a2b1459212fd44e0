"""Bad input: each case a clear message (what is wrong, what to do), exit 1 (2 for usage), no
traceback, and nothing on the host damaged. docs/operating.md's troubleshooting table lists these messages."""

from __future__ import annotations

import http.server
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from controlplane.pki import CertificateAuthority
from hostsim import build_host, inject, load_topology
from hostsim.snapshot import snapshot
from tests.install.helpers import gpus_on_vfio, install

MakeTree = Callable[..., Path]
REPO = Path(__file__).resolve().parents[2]
# What a refused run may leave: its lock in /run (tmpfs) and its own log.
SKIP = ("run", "var/log")


def _no_traceback(res: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in res.stdout + res.stderr


@pytest.fixture
def ready_tree(make_tree: MakeTree) -> Path:
    return make_tree("hgx-h100", gpus_on_vfio)


class FakeApi:
    """An HTTPS server on loopback with a certificate the installer trusts, answering every request
    with the same body: what a captive portal, a web server at the wrong URL or a broken proxy does."""

    def __init__(self, tmp: Path, body: bytes, content_type: str) -> None:
        now = datetime.now(timezone.utc)
        ca = CertificateAuthority.load_or_create(tmp, now)
        cert, key = ca.write_server_cert(tmp, "127.0.0.1", now)
        self.ca_file = tmp / "ca.crt"
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                outer.requests += 1

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.requests = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[Callable[[bytes, str], FakeApi]]:
    started: list[FakeApi] = []

    def _start(body: bytes, content_type: str) -> FakeApi:
        api = FakeApi(tmp_path / f"fake-{len(started)}", body, content_type)
        started.append(api)
        return api

    yield _start
    for api in started:
        api.close()


def test_an_unknown_argument_to_install_sh_is_a_usage_error_and_runs_nothing(tmp_path: Path) -> None:
    log = tmp_path / "ran"
    stub = tmp_path / "bin"
    stub.mkdir()
    for prog in ("apt-get", "curl", "dpkg-query", "python3", "mkdir"):
        (stub / prog).write_text(f'#!/bin/sh\necho {prog} >> "{log}"\n')
        (stub / prog).chmod(0o755)
    res = subprocess.run(
        ["/bin/bash", str(REPO / "install.sh"), "gpu=1", "tokn=vtk_typo"],
        env={"PATH": f"{stub}:/usr/bin:/bin", "VECTORLAY_TOKEN": "vtk_" + "a" * 40},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 2
    assert "error: unknown argument tokn=vtk_typo" in res.stderr
    assert (
        "fix: use token=vtk_..., token-file=FILE, gpu=1, api=URL, proxy=URL or NODE_AGENT_AUTOUPDATE=0"
        in res.stderr
    )
    assert not log.exists()


@pytest.mark.slow
def test_a_malformed_token_is_refused_without_being_echoed(ready_tree: Path, control_plane: Any) -> None:
    before = snapshot(ready_tree, skip=SKIP)
    bad = "vtk-" + "x" * 30
    res = install(ready_tree, cp=control_plane, token=bad)
    assert res.returncode == 1
    assert (
        "error: the provisioning token from VECTORLAY_TOKEN is not a vectorlay token "
        "(expected vtk_ and 16+ letters)" in res.stderr
    )
    assert "fix: copy the whole token from the dashboard" in res.stderr
    assert bad not in res.stdout + res.stderr
    _no_traceback(res)
    assert snapshot(ready_tree, skip=SKIP) == before


@pytest.mark.slow
def test_an_unreachable_api_names_the_url_after_retrying(ready_tree: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = snapshot(ready_tree, skip=SKIP)
    res = install(ready_tree, "--api", f"https://127.0.0.1:{port}", token="vtk_" + "a" * 40)
    assert res.returncode == 1
    assert f"error: could not reach https://127.0.0.1:{port}/v1/provisioning-tokens/introspect" in res.stderr
    assert "(gave up after 3 attempt(s))" in res.stderr
    assert "fix: check the node's outbound HTTPS (443) to the API and re-run" in res.stderr
    _no_traceback(res)
    assert snapshot(ready_tree, skip=SKIP) == before


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (
            b"<!doctype html><html><body>Welcome to nginx!</body></html>",
            "text/html",
            "/v1/provisioning-tokens/introspect returned 200 without a JSON body",
        ),
        (b"\x00\xff garbage \x13", "application/octet-stream", "returned 200 without a JSON body"),
        (b'["not", "an", "answer"]', "application/json", ": unexpected introspection answer"),
    ],
)
@pytest.mark.slow
def test_an_api_answering_html_or_garbage_is_refused(
    ready_tree: Path, fake_api: Callable[[bytes, str], FakeApi], body: bytes, content_type: str, message: str
) -> None:
    api = fake_api(body, content_type)
    before = snapshot(ready_tree, skip=SKIP)
    res = install(ready_tree, "--api", api.url, "--ca-file", str(api.ca_file), token="vtk_" + "a" * 40)
    assert res.returncode == 1
    assert message in res.stderr
    assert "is --api the control plane" in res.stderr
    _no_traceback(res)
    assert snapshot(ready_tree, skip=SKIP) == before


def _fault_points(root: Path, tmp_path: Path, *args: str) -> list[str]:
    log = tmp_path / "points"
    res = install(root, *args, env={inject.FAULT_LOG_ENV: str(log)})
    assert res.returncode in (0, 3), res.stderr
    return [line.split("\t", 1)[1] for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_a_full_disk_while_writing_is_reported_and_leaves_every_file_whole(
    make_tree: MakeTree, tmp_path: Path
) -> None:
    probe = make_tree("iommu-off")
    points = _fault_points(probe, tmp_path, "--only", "gpu")
    writes = [i for i, p in enumerate(points, 1) if p.startswith("write ") and "/etc/" in p]
    assert len(writes) >= 5
    for at in (writes[0], writes[3]):
        root = make_tree("iommu-off")
        res = install(
            root, "--only", "gpu", env={inject.FAULT_AT_ENV: str(at), inject.FAULT_KIND_ENV: "enospc"}
        )
        assert res.returncode == 1
        target = "/" + str(Path(points[at - 1].split(" ", 1)[1]).relative_to(probe))
        assert (
            f"error: disk full: no space left on device while the gpu stage was writing ({target})"
            in res.stderr
        )
        assert "fix: free some space (df -h /etc /var /opt), then re-run the same command" in res.stderr
        _no_traceback(res)
        assert not (root / target.lstrip("/")).exists()
        assert [p for p in root.rglob("*.tmp")] == []
        # With space again, the same command finishes the job.
        assert install(root, "--only", "gpu").returncode == 3
        assert (root / target.lstrip("/")).exists()


@pytest.mark.parametrize(
    ("grub", "message", "fix"),
    [
        (
            'GRUB_DEFAULT=0\r\nGRUB_CMDLINE_LINUX_DEFAULT="quiet splash"\r\nGRUB_CMDLINE_LINUX=""\r\n',
            "/etc/default/grub has Windows (CRLF) line endings (first at line 1); nothing was written",
            "fix: convert it (sudo sed -i 's/\\r$//' /etc/default/grub) and re-run",
        ),
        (
            'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet splash\nGRUB_CMDLINE_LINUX=""\n',
            '/etc/default/grub has a " quote that is never closed (look at line 2); nothing was written',
            "fix: close the quote in /etc/default/grub (check with: bash -n /etc/default/grub) and re-run",
        ),
    ],
)
def test_a_grub_file_bash_would_misread_is_refused_untouched(
    make_tree: MakeTree, grub: str, message: str, fix: str
) -> None:
    def edit(desc: dict[str, Any]) -> None:
        desc["grub"] = grub

    root = make_tree("iommu-off", edit)
    before = snapshot(root, skip=SKIP)
    res = install(root, "--only", "gpu")
    assert res.returncode == 1
    assert f"error: {message}" in res.stderr
    assert fix in res.stderr
    _no_traceback(res)
    assert snapshot(root, skip=SKIP) == before
    assert (root / "etc/default/grub").read_bytes() == grub.encode()


def test_odd_but_valid_grub_quoting_is_understood(make_tree: MakeTree) -> None:
    grub = (
        "GRUB_DEFAULT=0\n"
        "GRUB_CMDLINE_LINUX_DEFAULT='quiet splash' # it's single-quoted\n"
        'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX "console=ttyS0,115200\\ \n'
    )

    def edit(desc: dict[str, Any]) -> None:
        desc["grub"] = grub

    root = make_tree("iommu-off", edit)
    res = install(root, "--only", "gpu")
    assert res.returncode == 3, res.stderr
    assert (root / "etc/default/grub").read_text() == grub
    cfg = (root / "boot/grub/grub.cfg").read_text()
    assert "console=ttyS0,115200 quiet splash intel_iommu=on iommu=pt" in cfg


@pytest.mark.slow
def test_a_foreign_nebula_service_is_backed_up_and_reported(make_tree: MakeTree) -> None:
    from controlplane import testing
    from hostsim.agents import publish_agents
    from tests.install.helpers import FAST, stop_daemons

    foreign = (
        b"[Unit]\nDescription=nebula (installed by hand)\n\n[Service]\nExecStart=/usr/local/bin/nebula\n"
    )
    base = Path(tempfile.mkdtemp(prefix="vlf", dir="/tmp"))  # short: the agents' socket paths
    root = base / "host"
    try:
        publish_agents(base / "artifacts")
        cp = testing.start(base / "cp", args=("--artifacts", str(base / "artifacts")))
        try:
            cp.org("acme", provider=True)
            desc = load_topology("hgx-h100")
            gpus_on_vfio(desc)
            desc["files"] = {"/etc/systemd/system/nebula.service": foreign.decode()}
            build_host(root, desc)
            res = install(root, cp=cp, token=cp.token("acme"), env=FAST)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr
            assert (
                "changed  file     /etc/systemd/system/nebula.service (0644)  "
                "[update, backed up first: not owned by vectorlay-bootstrap]" in res.stdout
            )
            backup = root / "var/lib/vectorlay/backup/etc/systemd/system/nebula.service"
            assert backup.read_bytes() == foreign
            unit = (root / "etc/systemd/system/nebula.service").read_text()
            assert unit.startswith("# Managed by vectorlay-bootstrap")
            log = (root / "var/log/vectorlay/bootstrap.log").read_text()
            assert "wrote /etc/systemd/system/nebula.service" in log
            # A second run leaves the backup of the original alone.
            assert install(root, cp=cp, env=FAST).returncode == 0
            assert backup.read_bytes() == foreign
        finally:
            stop_daemons(root)
            testing.stop(cp)
    finally:
        shutil.rmtree(base, ignore_errors=True)
