"""The node behind an HTTP proxy (issue 21): https_proxy/HTTPS_PROXY and no_proxy/NO_PROXY as the
environment gives them, no_proxy read as curl reads it (install.sh's curl and the installer agree),
a real proxy (Debian's tinyproxy) in the path, and the CA pinning as strict through it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap.api import ApiClient, ApiError, parse_proxy, proxy_from_env
from bootstrap.errors import VectorlayError
from tests.transport import faults, proxies

pytestmark = pytest.mark.skipif(
    proxies.TINYPROXY is None, reason="needs tinyproxy (.ci/run installs tinyproxy-bin)"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> faults.Pki:
    return faults.make_pki(tmp_path_factory.mktemp("pki"))


def _ok(tls: object, request: bytes, server: faults.Server) -> None:
    body = b'{"node_id": "node_1"}'
    tls.sendall(  # type: ignore[attr-defined]
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )


# --- no_proxy, as curl reads it ---------------------------------------------------------------------

NO_PROXY_CASES = [
    ("api.vectorlay.test", "", False),
    ("api.vectorlay.test", "*", True),
    ("api.vectorlay.test", "vectorlay.test", True),
    ("api.vectorlay.test", ".vectorlay.test", True),
    ("api.vectorlay.test", "other.test, vectorlay.test", True),
    ("api.vectorlay.test", "API.Vectorlay.Test", True),
    ("api.vectorlay.test", "lay.test", False),
    ("api.vectorlay.test", "api.vectorlay", False),
    ("vectorlay.test", ".vectorlay.test", True),
    ("127.1.2.3", "127.1.0.0/16", True),
    ("127.1.2.3", "127.2.0.0/16", False),
    ("127.1.2.3", "127.1.2.3", True),
    ("127.1.2.3", "127.1.2.4", False),
]


def _curl_goes_through_the_proxy(host: str, no_proxy: str) -> bool:
    """Whether curl (the one install.sh uses) sends a request for https://HOST/ to the proxy
    named by https_proxy, given `no_proxy`: two loopback listeners, and --connect-to sends the
    direct path to the second, so no packet leaves the machine whatever curl decides."""
    with (
        faults.serving(faults.close_in_handshake) as proxy,
        faults.serving(faults.close_in_handshake) as direct,
    ):
        subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "--connect-to",
                f"{host}:443:127.0.0.1:{direct.port}",
                f"https://{host}/",
            ],
            env={
                "PATH": "/usr/bin:/bin",
                "https_proxy": f"http://127.0.0.1:{proxy.port}",
                "no_proxy": no_proxy,
            },
            check=False,
            timeout=30,
        )
    assert proxy.connections + direct.connections == 1
    return proxy.connections == 1


@pytest.mark.parametrize(("host", "no_proxy", "bypassed"), NO_PROXY_CASES)
def test_no_proxy_is_read_as_curl_reads_it(host: str, no_proxy: str, bypassed: bool) -> None:
    assert _curl_goes_through_the_proxy(host, no_proxy) is not bypassed  # the expectation is curl's
    assert parse_proxy("http://127.0.0.1:3128", no_proxy).bypassed(host) is bypassed


def test_the_environment_gives_the_proxy_lower_case_first_and_node_yaml_is_the_fallback() -> None:
    env = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2", "NO_PROXY": "a.test"}
    proxy = proxy_from_env(env)
    assert proxy is not None and (proxy.host, proxy.port, proxy.no_proxy) == ("lower", 2, "a.test")
    proxy = proxy_from_env({"HTTPS_PROXY": "upper:3128"}, fallback="http://yaml:1")
    assert proxy is not None and (proxy.url, proxy.given) == ("http://upper:3128", "upper:3128")
    proxy = proxy_from_env({}, fallback="http://yaml:8080")
    assert proxy is not None and proxy.url == "http://yaml:8080"
    assert proxy_from_env({"http_proxy": "http://plain:1", "REQUESTS_CA_BUNDLE": "/x"}) is None
    # Credentials go in Proxy-Authorization, and never into what messages show.
    proxy = proxy_from_env({"https_proxy": "http://bob:s%3Acret@p:3128"})
    assert (
        proxy is not None and proxy.url == "http://p:3128" and proxy.authorization == "Basic Ym9iOnM6Y3JldA=="
    )


@pytest.mark.parametrize("url", ["https://p:3128", "socks5://p:1080", "http://", "http://p:99999"])
def test_a_proxy_the_node_cannot_speak_to_is_a_clear_error(url: str) -> None:
    with pytest.raises(VectorlayError) as bad:
        proxy_from_env({"https_proxy": url})
    assert bad.value.message.startswith("https_proxy=") and bad.value.hint == "use http://host:port"


# --- through a real proxy -----------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[proxies.Tinyproxy]:
    with proxies.tinyproxy(tmp_path / "tinyproxy") as proxy:
        yield proxy


def test_requests_go_through_tinyproxy_as_connect_and_still_verify_the_control_plane(
    tiny: proxies.Tinyproxy, pki: faults.Pki
) -> None:
    with faults.tls_server(pki, _ok) as server:
        proxy = parse_proxy(tiny.url)
        client = ApiClient(server.url, ca_file=pki.ca_file, attempts=1, proxy=proxy, node_token="vnt_x")
        assert client.request("GET", "/v1/node/self") == {"node_id": "node_1"}
        with client.stream("/v1/artifacts/nebula/1.9", size=21) as chunks:
            assert b"".join(chunks) == b'{"node_id": "node_1"}'
    assert tiny.connects() == [f"127.0.0.1:{server.port}"] * 2
    assert len(server.received) == 2 and all(b"Authorization: Bearer vnt_x" in r for r in server.received)


def test_a_host_in_no_proxy_is_reached_directly(tiny: proxies.Tinyproxy, pki: faults.Pki) -> None:
    with faults.tls_server(pki, _ok) as server:
        proxy = parse_proxy(tiny.url, "localhost,127.0.0.0/8")
        client = ApiClient(server.url, ca_file=pki.ca_file, attempts=1, proxy=proxy)
        assert client.request("GET", "/v1/node/self") == {"node_id": "node_1"}
    assert tiny.connects() == [] and server.connections == 1


def test_a_proxy_presenting_its_own_certificate_is_refused_with_a_clear_error(
    pki: faults.Pki, tmp_path: Path
) -> None:
    interceptor_pki = faults.make_pki(tmp_path / "interceptor")  # self-made, as an inspecting proxy's
    seen: list[bytes] = []
    with faults.serving(proxies.intercepting(interceptor_pki, seen)) as mitm:
        client = ApiClient(
            "https://127.0.0.1:8443",
            ca_file=pki.ca_file,
            attempts=3,
            proxy=parse_proxy(f"127.0.0.1:{mitm.port}"),
        )
        with pytest.raises(VectorlayError) as refused:
            client.request("POST", "/v1/nodes/enroll", json={"token": "vtk_" + "s" * 43})
    assert refused.value.message.startswith(
        "TLS verification of https://127.0.0.1:8443/v1/nodes/enroll failed"
    )
    assert "CERTIFICATE_VERIFY_FAILED" in refused.value.message
    assert refused.value.hint is not None and refused.value.hint.startswith(
        f"the proxy http://127.0.0.1:{mitm.port} may be intercepting TLS"
    )
    # It saw the CONNECT, never a request: the token did not reach it. Not retried: it will not verify later.
    assert seen == [b"CONNECT 127.0.0.1:8443 HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n\r\n"]
    assert mitm.connections == 1


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (b"407 Proxy Authentication Required", "(it wants credentials: http://user:password@host:port)"),
        (b"403 Forbidden", "refused CONNECT 127.0.0.1:8443: HTTP/1.1 403 Forbidden"),
    ],
)
def test_a_proxy_refusing_the_tunnel_is_said_as_such(status: bytes, says: str, pki: faults.Pki) -> None:
    with faults.serving(proxies.refusing(status)) as proxy:
        client = ApiClient(
            "https://127.0.0.1:8443",
            ca_file=pki.ca_file,
            attempts=1,
            proxy=parse_proxy(f"127.0.0.1:{proxy.port}"),
        )
        with pytest.raises(ApiError) as refused:
            client.request("GET", "/v1/node/self")
    assert (
        says in refused.value.message and f"the proxy http://127.0.0.1:{proxy.port}" in refused.value.message
    )


def test_install_through_a_tls_intercepting_proxy_stops_before_anything_with_a_clear_error(
    pki: faults.Pki, tmp_path: Path
) -> None:
    from hostsim import build_host, load_topology
    from tests.install.helpers import FAST, install

    root = build_host(tmp_path / "root", load_topology("cpu-only"))
    seen: list[bytes] = []
    token = "vtk_" + "s" * 43
    with faults.serving(proxies.intercepting(faults.make_pki(tmp_path / "mitm"), seen)) as mitm:
        done = install(
            root,
            "--api",
            "https://127.0.0.1:8443",
            "--ca-file",
            str(pki.ca_file),
            token=token,
            env={**FAST, "https_proxy": f"http://127.0.0.1:{mitm.port}", "no_proxy": ""},
        )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    assert (
        "error: TLS verification of https://127.0.0.1:8443/v1/provisioning-tokens/introspect failed"
        in done.stderr
    )
    assert f"fix: the proxy http://127.0.0.1:{mitm.port} may be intercepting TLS" in done.stderr
    assert all(token.encode() not in s for s in seen) and b"a request reached the interceptor" not in seen
    assert not (root / "etc/vectorlay/identity").exists()
