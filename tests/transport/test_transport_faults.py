"""The node's HTTP client against servers on loopback that break the way networks and hostile
control planes do (issue 22): every failure is a clean error, retried with backoff where another
attempt can cure it; no redirect is followed; every answer has a deadline and a size limit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bootstrap.api import ApiClient, ApiError
from bootstrap.errors import VectorlayError
from hostsim import build_host, load_topology
from tests.install.helpers import FAST, install
from tests.transport import faults

pytestmark = pytest.mark.slow


TOKEN = "vtk_" + "s" * 43


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> faults.Pki:
    return faults.make_pki(tmp_path_factory.mktemp("pki"))


def _client(url: str, pki: faults.Pki, **kw: object) -> tuple[ApiClient, list[float]]:
    slept: list[float] = []
    kw.setdefault("attempts", 3)
    client = ApiClient(url, ca_file=pki.ca_file, backoff=0.25, sleep=slept.append, proxy=None, **kw)  # type: ignore[arg-type]
    return client, slept


# --- class 2: a handshake that fails --------------------------------------------------------------


@pytest.mark.parametrize("fault", sorted(faults.HANDSHAKE_FAULTS))
def test_a_failed_handshake_is_a_clean_error_retried_with_backoff(fault: str, pki: faults.Pki) -> None:
    with faults.serving(faults.HANDSHAKE_FAULTS[fault](pki)) as server:
        client, slept = _client(server.url, pki)
        with pytest.raises(ApiError) as failed:
            client.request("POST", "/v1/provisioning-tokens/introspect", json={"token": TOKEN})
    message = failed.value.message
    assert "gave up after 3 attempt(s)" in message, message
    assert "TLS handshake" in message or "could not reach" in message, message
    assert "i2d" not in message and TOKEN not in message
    assert server.connections == 3 and slept == [0.25, 0.5]
    assert failed.value.hint and "outbound HTTPS" in failed.value.hint


def test_a_certificate_that_does_not_verify_is_not_retried(pki: faults.Pki, tmp_path: Path) -> None:
    other = faults.make_pki(tmp_path / "other")
    with faults.tls_server(other, faults.redirect(200, "/")) as server:
        client, slept = _client(server.url, pki)
        with pytest.raises(VectorlayError) as failed:
            client.request("GET", "/v1/node/self")
    assert (
        "TLS verification of" in failed.value.message and "CERTIFICATE_VERIFY_FAILED" in failed.value.message
    )
    assert server.connections == 1 and slept == []


def _enroll_cli(url: str, pki: faults.Pki, root: Path) -> subprocess.CompletedProcess[str]:
    root.mkdir(exist_ok=True)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bootstrap.cli",
            "enroll",
            "--root",
            str(root),
            "--api",
            url,
            "--ca-file",
            str(pki.ca_file),
        ],
        env={**os.environ, "VECTORLAY_TOKEN": TOKEN, "https_proxy": "", "HTTPS_PROXY": ""},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("fault", ["reset during the handshake", "a server offering only TLS 1.1"])
def test_enroll_retries_a_failed_handshake_and_ends_with_an_error_not_a_traceback(
    fault: str, pki: faults.Pki, tmp_path: Path
) -> None:
    with faults.serving(faults.HANDSHAKE_FAULTS[fault](pki)) as server:
        done = _enroll_cli(server.url, pki, tmp_path / "root")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    # The enroll command runs the install's enroll stage: its token introspection tries 3 times,
    # each retry in the run log.
    assert "gave up after 3 attempt(s)" in done.stderr
    assert (tmp_path / "root/var/log/vectorlay/bootstrap.log").read_text().count("retrying in") == 2
    assert server.connections == 3
    assert TOKEN not in done.stderr + done.stdout
    assert not (tmp_path / "root/etc/vectorlay/identity").exists()


def test_install_meets_a_failed_handshake_with_its_retries_and_an_error_not_an_internal_error(
    pki: faults.Pki, tmp_path: Path
) -> None:
    root = build_host(tmp_path / "root", load_topology("cpu-only"))
    with faults.serving(faults.reset_in_handshake) as server:
        done = install(root, "--api", server.url, "--ca-file", str(pki.ca_file), token=TOKEN, env=FAST)
    assert done.returncode == 1, done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert "gave up after" in done.stderr and "TLS handshake with" in done.stderr
    assert server.connections > 1
    assert not (root / "etc/vectorlay/identity").exists()


# --- class 3: redirects ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_plain_http_is_an_error_and_the_token_never_leaves_in_clear(
    status: int, pki: faults.Pki
) -> None:
    with faults.plain_recorder() as plain:
        location = f"http://127.0.0.1:{plain.port}/v1/provisioning-tokens/introspect"
        with faults.tls_server(pki, faults.redirect(status, location)) as server:
            client, slept = _client(server.url, pki)
            with pytest.raises(ApiError) as failed:
                client.request("POST", "/v1/provisioning-tokens/introspect", json={"token": TOKEN})
    assert failed.value.message == (
        f"POST {server.url}/v1/provisioning-tokens/introspect answered {status} redirecting to "
        f"{location!r}: the node follows no redirect"
    )
    assert plain.connections == 0 and plain.received == []
    assert server.connections == 1 and slept == []  # a definitive answer: not retried


def test_a_redirect_to_another_https_origin_is_not_followed_with_the_credentials(pki: faults.Pki) -> None:
    with faults.tls_server(pki, faults.redirect(200, "/")) as elsewhere:
        # Another origin: same certificate (it names localhost too), another host name and port.
        location = f"https://localhost:{elsewhere.port}/v1/artifacts/manifest"
        with faults.tls_server(pki, faults.redirect(308, location)) as server:
            client, _ = _client(server.url, pki, node_token="vnt_" + "n" * 43)
            with pytest.raises(ApiError) as failed:
                client.request("GET", "/v1/artifacts/manifest")
            with (
                pytest.raises(ApiError) as download,
                client.stream("/v1/artifacts/nomad/1.8.4", size=100) as chunks,
            ):
                list(chunks)
    assert f"redirecting to {location!r}" in failed.value.message
    assert f"redirecting to {location!r}" in download.value.message
    assert elsewhere.connections == 0
    assert all(b"Authorization: Bearer vnt_" in r for r in server.received) and len(server.received) == 2


def test_a_location_is_shown_bounded_and_without_control_characters(pki: faults.Pki) -> None:
    location = "https://evil.example/" + "a" * 5000 + "\x1b[2J"
    with faults.tls_server(pki, faults.redirect(302, location)) as server:
        client, _ = _client(server.url, pki)
        with pytest.raises(ApiError) as failed:
            client.request("GET", "/v1/node/self")
    assert len(failed.value.message) < 400 and "\x1b" not in failed.value.message


# --- class 4: deadlines and sizes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nX-Slow: ", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b""],
    ids=["headers", "body", "status line"],
)
def test_a_server_dripping_a_byte_at_a_time_meets_the_overall_deadline(head: bytes, pki: faults.Pki) -> None:
    with faults.tls_server(pki, faults.drip(head, 0.2)) as server:
        client, slept = _client(server.url, pki, timeout=1.5, attempts=2)
        with pytest.raises(ApiError) as failed:
            client.request("POST", "/v1/node/heartbeat", json={})
    assert failed.value.message == (
        f"POST {server.url}/v1/node/heartbeat: no complete answer within 1.5s (gave up after 2 attempt(s))"
    )
    assert server.connections == 2 and slept == [0.25]


def test_a_server_that_never_answers_costs_at_most_three_deadlines_whatever_the_attempts(
    pki: faults.Pki,
) -> None:
    with faults.tls_server(pki, faults.drip(b"HTTP/1.1 200 OK\r\nX-Slow: ", 0.2)) as server:
        client, slept = _client(server.url, pki, timeout=1.0, attempts=5)
        with pytest.raises(ApiError) as failed:
            client.request("POST", "/v1/nodes/enroll", json={"token": TOKEN})
    # 1 s, 0.25 s of backoff, 1 s: a third attempt would end past 3 s.
    assert failed.value.message.endswith("no complete answer within 1s (gave up after 2 attempt(s))")
    assert server.connections == 2 and slept == [0.25]


def test_a_peer_that_never_answers_the_hello_meets_the_deadline(pki: faults.Pki) -> None:
    with faults.serving(faults.silent) as server:
        client, _ = _client(server.url, pki, timeout=1.0, attempts=1)
        with pytest.raises(ApiError) as failed:
            client.request("GET", "/v1/node/self")
    assert "no complete answer within 1s" in failed.value.message


def test_a_name_is_looked_up_within_the_deadline(pki: faults.Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """getaddrinfo takes no timeout; a resolver that hangs (here: a lookup that sleeps, the fault
    injected in place of the resolver, which cannot be made to hang without this machine's
    configuration) still ends the request at its deadline. Names still resolve as before."""
    with faults.tls_server(pki, faults.redirect(200, "/")) as server:
        client, _ = _client(f"https://localhost:{server.port}", pki, attempts=1)
        with pytest.raises(ApiError) as answered:
            client.request("GET", "/v1/node/self")  # an empty 200: reached, by name
        assert "returned 200 without a JSON body" in answered.value.message
        real = socket.getaddrinfo

        def hanging(host: str, *args: Any, **kwargs: Any) -> Any:
            if host == "localhost":
                time.sleep(5)
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", hanging)
        client, _ = _client(f"https://localhost:{server.port}", pki, timeout=0.5, attempts=1)
        with pytest.raises(ApiError) as failed:
            client.request("GET", "/v1/node/self")
    assert failed.value.message.endswith("no complete answer within 0.5s (gave up after 1 attempt(s))")
    assert server.connections == 1


def test_an_artifact_download_dripping_meets_its_deadline(pki: faults.Pki) -> None:
    with faults.tls_server(
        pki, faults.drip(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", 0.2)
    ) as server:
        client, _ = _client(server.url, pki, timeout=1.0, attempts=1)
        with (
            pytest.raises(ApiError) as failed,
            client.stream("/v1/artifacts/nomad/1.8.4", size=100) as chunks,
        ):
            list(chunks)
    assert (
        f"the download of {server.url}/v1/artifacts/nomad/1.8.4 did not complete within 1s"
        in failed.value.message
    )


def _peak_during(run: Callable[[], object]) -> int:
    """Bytes Python allocated at the peak while `run` ran (tracemalloc: every thread, this one included)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


HUGE = 200 << 20


@pytest.mark.parametrize("announce", [True, False], ids=["Content-Length", "chunked"])
def test_a_200_mb_answer_is_refused_within_a_bounded_memory(announce: bool, pki: faults.Pki) -> None:
    failed: list[ApiError] = []
    with faults.tls_server(pki, faults.huge(HUGE, announce=announce)) as server:
        client, _ = _client(server.url, pki, attempts=1)

        def enroll() -> None:
            with pytest.raises(ApiError) as e:
                client.request("POST", "/v1/nodes/enroll", json={"token": TOKEN})
            failed.append(e.value)

        peak = _peak_during(enroll)
    assert failed[0].message == (
        f"POST {server.url}/v1/nodes/enroll: the answer is larger than {4 << 20} bytes"
    )
    assert peak < 16 << 20, f"{peak} bytes at the peak"


def test_an_artifact_larger_than_its_manifest_says_stops_at_the_announced_size(pki: faults.Pki) -> None:
    with faults.tls_server(pki, faults.huge(HUGE, announce=False)) as server:
        client, _ = _client(server.url, pki, attempts=1)
        got = 0

        def download() -> None:
            nonlocal got
            with (
                pytest.raises(ApiError) as failed,
                client.stream("/v1/artifacts/nomad/1.8.4", size=1 << 20) as chunks,
            ):
                for chunk in chunks:
                    got += len(chunk)
            assert "is larger than the 1048576 bytes announced" in failed.value.message

        peak = _peak_during(download)
    assert got <= (1 << 20) + (16 << 10)
    assert peak < 16 << 20, f"{peak} bytes at the peak"


# --- the node-agent ---------------------------------------------------------------------------------

_NULL = faults.Server(0)  # the recorder the agent cases do not read
AGENT_FAULTS: dict[str, Callable[[faults.Pki], faults.Handler]] = {
    "reset during the handshake": lambda pki: faults.reset_in_handshake,
    "a TLS alert": lambda pki: faults.alert_in_handshake,
    "a plain-HTTP answer": lambda pki: faults.plain_http,
    "a 307 to plain HTTP": lambda pki: faults.over_tls(
        pki, faults.redirect(307, "http://127.0.0.1:9/"), [_NULL]
    ),
    "a 200 MB answer": lambda pki: faults.over_tls(pki, faults.huge(HUGE, announce=False), [_NULL]),
    "a drip (20 s deadline)": lambda pki: faults.over_tls(
        pki, faults.drip(b"HTTP/1.1 200 OK\r\nX-Slow: ", 1.0), [_NULL]
    ),
}
AGENT_SAYS = {
    "reset during the handshake": "TLS handshake with",
    "a TLS alert": "TLS handshake with",
    "a plain-HTTP answer": "TLS handshake with",
    "a 307 to plain HTTP": "answered 307 redirecting to 'http://127.0.0.1:9/': the node follows no redirect",
    "a 200 MB answer": "the answer is larger than 4194304 bytes",
    "a drip (20 s deadline)": "no complete answer within 20s",
}


@pytest.fixture(scope="module")
def enrolled_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, faults.Pki]]:
    """A node enrolled with the real control plane, and the control plane's own server certificate
    (so that the hostile servers below are ones the node trusts)."""
    from controlplane import testing

    base = tmp_path_factory.mktemp("agent")
    with testing.running(base / "cp") as cp:
        cp.org("acme")
        root = build_host(base / "root", load_topology("cpu-only"))
        enrolled = cp.enroll(root, "acme")
        assert enrolled.returncode == 0, enrolled.stderr
        state = cp.state_dir
        yield root, faults.Pki(cp.ca_file, state / "server.crt", state / "server.key")


@pytest.mark.parametrize("fault", list(AGENT_FAULTS))
def test_the_node_agent_reports_a_transport_fault_and_does_not_crash(
    fault: str, enrolled_node: tuple[Path, faults.Pki]
) -> None:
    root, pki = enrolled_node
    with faults.serving(AGENT_FAULTS[fault](pki)) as server:
        (root / "etc/vectorlay/node-agent.yaml").write_text(f"api: {server.url}\n")
        done = subprocess.run(
            [sys.executable, "-m", "nodeagent", "--once", "--root", str(root)],
            env={**os.environ, "https_proxy": "", "HTTPS_PROXY": ""},
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "crashed" not in done.stderr
    assert AGENT_SAYS[fault] in done.stderr, done.stderr
    assert server.connections == 1
    status = json.loads((root / "run/vectorlay/node-agent/status.json").read_text())
    assert AGENT_SAYS[fault] in status["last_error"]
