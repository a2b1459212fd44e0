"""Bad request bodies (issue 13, class 5, control-plane side), over real HTTPS: CSRs the control plane
cannot sign, JSON nested past any sane depth, host names with control characters, oversized bodies.
Each is a 400 or 413 with a clear message, never a 500, and the provisioning token stays unused."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa
from cryptography.x509.oid import NameOID

from bootstrap import nebula

pytestmark = pytest.mark.slow


def _csr(key: Any, algorithm: hashes.SHA256 | None = None) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "box")]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _bad_signature_csr() -> str:
    good = x509.load_pem_x509_csr(_csr(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()).encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature, which is the last field
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


def _post(cp: Any, path: str, **kwargs: Any) -> requests.Response:
    return requests.post(cp.url + path, verify=str(cp.ca_file), timeout=60, **kwargs)


@pytest.fixture
def cp(control_plane: Any) -> Iterator[Any]:
    control_plane.org("acme", provider=True)
    yield control_plane
    log = control_plane.log()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]


def _body(token: str, **changes: Any) -> dict[str, Any]:
    csr = _csr(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    nomad_csr = _csr(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    return {
        "token": token,
        "csr_pem": csr,
        "nebula_public_key": nebula.generate_keypair()[1].decode(),
        "nomad_csr_pem": nomad_csr,
        "hostname": "box",
        "hardware": {},
        "gpu_mode": "none",
        **changes,
    }


def _refused(cp: Any, token: str, resp: requests.Response, status: int, message: str) -> None:
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]["message"], resp.text
    assert cp.admin.introspect(token)["valid"] is True  # not consumed
    assert cp.admin.org_summary("acme")["nodes"] == []


CSRS: list[tuple[Callable[[], str], str]] = [
    (_bad_signature_csr, "the CSR's signature does not match its public key"),
    (
        lambda: _csr(rsa.generate_private_key(65537, 1024), hashes.SHA256()),
        "RSA keys must have at least 2048 bits",
    ),
    (
        lambda: _csr(dsa.generate_private_key(2048), hashes.SHA256()),
        "the CSR's key must be EC, Ed25519 or RSA",
    ),
    (lambda: _csr(ed448.Ed448PrivateKey.generate()), "the CSR's key must be EC, Ed25519 or RSA"),
    (
        lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "csr_pem is not a PEM certificate signing request",
    ),
    (lambda: "\udcff", "csr_pem is not a PEM certificate signing request"),  # not even encodable
]


@pytest.mark.parametrize(
    ("make_csr", "message"),
    CSRS,
    ids=["bad-signature", "rsa-1024", "dsa", "ed448", "garbage-pem", "surrogate"],
)
def test_a_csr_the_control_plane_cannot_sign_is_a_400_and_the_token_stays_unused(
    cp: Any, make_csr: Callable[[], str], message: str
) -> None:
    token = cp.token("acme")
    _refused(cp, token, _post(cp, "/v1/nodes/enroll", json=_body(token, csr_pem=make_csr())), 400, message)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [100_000, 40])
def test_json_nested_too_deep_is_a_400_on_every_endpoint_that_reads_a_body(cp: Any, depth: int) -> None:
    token = cp.token("acme")
    deep = (
        f'{{"token": "{token}", "csr_pem": "x", "hostname": "box", "gpu_mode": "none",'
        f' "hardware": {{"units": {_nested(depth)}}}}}'
    )
    headers = {"Content-Type": "application/json"}
    for path in ("/v1/nodes/enroll", "/v1/provisioning-tokens/introspect"):
        resp = _post(cp, path, data=deep, headers=headers)
        _refused(cp, token, resp, 400, "the JSON body is nested more than 32 levels deep")
    patch = requests.patch(
        cp.url + "/v1/orgs/acme/provider/nodes/node_x",
        data=_nested(depth),
        headers={**headers, "Authorization": f"Bearer {cp.api_key('acme')}"},
        verify=str(cp.ca_file),
        timeout=60,
    )
    assert patch.status_code == 400 and "nested more than 32 levels" in patch.json()["error"]["message"]


@pytest.mark.parametrize(
    "hostname",
    [
        "box\n\x1b[31mFAKE LOG LINE",
        "box\x00",
        "box\r",
        "\tbox",
        "box name",
        'box"',
        "-box",
        "b" * 254,
        "",
        42,
        None,
    ],
    ids=[
        "newline-escape",
        "nul",
        "cr",
        "tab",
        "space",
        "quote",
        "leading-dash",
        "too-long",
        "empty",
        "int",
        "null",
    ],
)
def test_a_hostname_with_control_characters_or_not_a_host_name_is_a_400(cp: Any, hostname: Any) -> None:
    token = cp.token("acme")
    resp = _post(cp, "/v1/nodes/enroll", json=_body(token, hostname=hostname))
    _refused(cp, token, resp, 400, "hostname must be 1-253 characters")


def test_real_host_names_are_accepted(cp: Any) -> None:
    for hostname in ("gpu-node-07.dc1.example.com", "HGX_H100", "a" * 253):
        resp = _post(cp, "/v1/nodes/enroll", json=_body(cp.token("acme"), hostname=hostname))
        assert resp.status_code == 200, resp.text


def _raw_post(cp: Any, head: dict[str, str], body: Iterable[bytes]) -> tuple[int, dict[str, Any]]:
    """POST /v1/nodes/enroll over a raw TLS socket, reading the answer even when the server stops
    reading the body and closes early (requests would only report the broken pipe)."""
    url = urlsplit(cp.url)
    host, port = url.hostname or "127.0.0.1", url.port or 443
    ctx = ssl.create_default_context(cafile=str(cp.ca_file))
    answer = b""
    with (
        socket.create_connection((host, port), timeout=60) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        lines = [
            "POST /v1/nodes/enroll HTTP/1.1",
            f"Host: {url.netloc}",
            *(f"{k}: {v}" for k, v in head.items()),
        ]
        tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            for chunk in body:
                tls.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass
        try:
            while not _complete(answer):
                data = tls.recv(65536)
                if not data:
                    break
                answer += data
        except (ConnectionResetError, ssl.SSLError):
            pass
    head_part, _, rest = answer.partition(b"\r\n\r\n")
    return int(head_part.split(b" ", 2)[1]), json.loads(rest[: _length(head_part)])


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def _complete(answer: bytes) -> bool:
    head, sep, rest = answer.partition(b"\r\n\r\n")
    return bool(sep) and len(rest) >= _length(head)


def _chunked(pieces: list[bytes]) -> Iterator[bytes]:
    for piece in [*pieces, b""]:
        yield b"%x\r\n%s\r\n" % (len(piece), piece)


def test_an_oversized_body_is_a_413_whether_its_length_is_announced_or_not(cp: Any) -> None:
    token = cp.token("acme")
    data = json.dumps(_body(token, hardware={"pad": "x" * (2 << 20)})).encode()
    slices = [data[i : i + (1 << 16)] for i in range(0, len(data), 1 << 16)]
    message = "the request body is larger than the 1 MiB this API accepts"

    announced = {"Content-Type": "application/json", "Content-Length": str(len(data))}
    status, answer = _raw_post(cp, announced, slices)
    assert (status, answer["error"]) == (413, {"code": "PAYLOAD_TOO_LARGE", "message": message})

    chunked = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    status, answer = _raw_post(cp, chunked, _chunked(slices))
    assert (status, answer["error"]) == (413, {"code": "PAYLOAD_TOO_LARGE", "message": message})
    assert cp.admin.introspect(token)["valid"] is True
    assert cp.admin.org_summary("acme")["nodes"] == []


def test_a_chunked_body_under_the_limit_is_read_whole(cp: Any) -> None:
    # One read of a chunked body may return only its first chunk: the body is read to its end.
    data = json.dumps(_body(cp.token("acme"), hardware={"pad": "y" * 300_000})).encode()
    head = {"Content-Type": "application/json", "Transfer-Encoding": "chunked", "Connection": "close"}
    status, answer = _raw_post(cp, head, _chunked([data[:100], data[100:70_000], data[70_000:]]))
    assert status == 200, answer
    assert answer["node_id"].startswith("node_")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"token": NaN}', "NaN is not JSON"),
        (b'{"token": "vtk_x", "n": ' + b"1" * 5000 + b"}", "the body is not valid JSON"),
        (b'{"token": "\xff\xfe"}', "the body is not valid JSON"),
        (b'{"token": ', "the body is not valid JSON"),
    ],
    ids=["nan", "huge-integer", "bad-utf8", "truncated"],
)
def test_bodies_that_are_not_standard_json_are_a_400(cp: Any, raw: bytes, message: str) -> None:
    for path in ("/v1/nodes/enroll", "/v1/provisioning-tokens/introspect"):
        resp = _post(cp, path, data=raw, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400 and message in resp.json()["error"]["message"], (path, resp.text)


@pytest.mark.parametrize(
    "changes",
    [
        {"hardware": {"units": "all"}},
        {"hardware": {"units": [{"iommu_group": 7}]}},
        {"hardware": []},
        {"gpu_mode": ["none"]},
        {"csr_pem": {"pem": "x"}},
    ],
    ids=["units-not-a-list", "group-not-a-string", "hardware-a-list", "gpu-mode-a-list", "csr-an-object"],
)
def test_fields_of_the_wrong_type_are_a_400_and_the_token_stays_unused(
    cp: Any, changes: dict[str, Any]
) -> None:
    token = cp.token("acme")
    resp = _post(cp, "/v1/nodes/enroll", json=_body(token, **changes))
    assert resp.status_code == 400, resp.text
    assert cp.admin.introspect(token)["valid"] is True


_A, _B = "0000:19:00.0", "0000:3b:00.0"


def _gpu(address: Any, group: str | None = None) -> dict[str, Any]:
    return {"address": address, "vendor_id": "10de", "device_id": "2330", "iommu_group": group}


def _unit(group: Any, gpus: list[Any]) -> dict[str, Any]:
    return {"iommu_group": group, "status": "ready", "gpus": gpus, "devices": gpus}


@pytest.mark.parametrize(
    ("gpu_mode", "hardware", "message"),
    [
        (
            "passthrough",
            {"gpus": [], "units": [_unit(str(i), []) for i in range(5000)]},
            "hardware.units lists 5000 GPU unit(s) but hardware.gpus only 0 GPU(s)",
        ),
        (
            "passthrough",
            {"gpus": [_gpu(_A)], "units": [_unit("1", ["0000:99:00.0"])]},
            "hardware.units[0] (group 1) holds a GPU that is not in hardware.gpus",
        ),
        ("passthrough", {"gpus": [_gpu(_A)], "units": [_unit("1", [])]}, "must list the GPUs it holds"),
        (
            "passthrough",
            {"gpus": [_gpu(_A), _gpu(_B)], "units": [_unit("1", [_A]), _unit("2", [_A])]},
            f"GPU {_A} is in more than one hardware unit",
        ),
        (
            "passthrough",
            {"gpus": [_gpu(_A), _gpu(_B)], "units": [_unit("1", [_A]), _unit("1", [_B])]},
            "hardware.units lists IOMMU group 1 twice",
        ),
        (
            "passthrough",
            {"gpus": [_gpu(_A, "5")], "units": [_unit("7", [_A])]},
            f"GPU {_A} is in IOMMU group 5, not 7",
        ),
        ("passthrough", {"gpus": [_gpu(_A + "\n")], "units": []}, "hardware.gpus[0] needs an address"),
        ("passthrough", {"gpus": [_gpu(_A)], "units": [_unit("7\n", [_A])]}, "needs an iommu_group"),
        ("passthrough", {"gpus": [_gpu(_A), _gpu(_A)]}, f"hardware.gpus lists {_A} twice"),
        # A container-mode node's units are its GPUs: 5,000 entries that are not GPUs are no units.
        ("container", {"gpus": [{}] * 5000}, "hardware.gpus must be a list of at most 1024 GPUs"),
        ("container", {"gpus": [{"ready": True}] * 8}, "hardware.gpus[0] needs an address"),
    ],
    ids=[
        "5000-units-no-gpus",
        "unit-with-unreported-gpu",
        "unit-without-gpus",
        "gpu-in-two-units",
        "group-twice",
        "gpu-in-another-group",
        "address-with-newline",
        "group-with-newline",
        "gpu-twice",
        "container-5000-non-gpus",
        "container-gpus-without-address",
    ],
)
def test_units_must_hold_gpus_the_node_reported_or_the_enrollment_is_a_400(
    cp: Any, gpu_mode: str, hardware: dict[str, Any], message: str
) -> None:
    token = cp.token("acme")
    resp = _post(cp, "/v1/nodes/enroll", json=_body(token, gpu_mode=gpu_mode, hardware=hardware))
    _refused(cp, token, resp, 400, message)


def test_a_hostname_ending_in_a_newline_is_a_400(cp: Any) -> None:
    token = cp.token("acme")
    resp = _post(cp, "/v1/nodes/enroll", json=_body(token, hostname="box\n"))
    _refused(cp, token, resp, 400, "hostname must be 1-253 characters")


def test_units_that_hold_the_gpus_reported_enroll_with_them(cp: Any) -> None:
    token = cp.token("acme")
    hardware = {"gpus": [_gpu(_A, "1"), _gpu(_B, "2")], "units": [_unit("1", [_A]), _unit("2", [_B])]}
    resp = _post(cp, "/v1/nodes/enroll", json=_body(token, gpu_mode="passthrough", hardware=hardware))
    assert resp.status_code == 200, resp.text
    (node,) = cp.admin.org_summary("acme")["nodes"]
    groups = cp.admin.db.conn().execute(
        "SELECT iommu_group FROM gpu_units WHERE node_id = ?", (node["node_id"],)
    )
    assert sorted(r[0] for r in groups) == ["1", "2"]
