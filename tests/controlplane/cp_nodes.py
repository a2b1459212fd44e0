"""A node enrolled over the control plane's raw API, for tests that speak HTTPS to it directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bootstrap import nebula


def heartbeat_request(host: str, port: int | str, token: str, body: bytes) -> bytes:
    """A node's heartbeat on the wire, as HTTP/1.1 bytes, for clients that speak to the socket."""
    head = (
        f"POST /v1/node/heartbeat HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    return head.encode() + body


def _csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "box")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


class Enrolled:
    """A node enrolled over the raw API, with its key and certificate on disk for mTLS."""

    def __init__(self, cp: Any, org: str, workdir: Path, token: str | None = None) -> None:
        self.cp = cp
        self.key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "box")]))
            .sign(self.key, hashes.SHA256())
        )
        self.body: dict[str, Any] = {
            "token": token or cp.token(org),
            "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "nebula_public_key": nebula.generate_keypair()[1].decode(),
            "nomad_csr_pem": _csr(),
            "hostname": "box",
            "hardware": {},
            "gpu_mode": "none",
        }
        got = self.enroll()
        assert got.status_code == 200, got.text
        self.answer = got.json()
        workdir.mkdir(parents=True, exist_ok=True)
        self.cert_file, self.key_file = workdir / "node.crt", workdir / "node.key"
        self.cert_file.write_text(self.answer["certificate_pem"])
        self.key_file.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.token = self.answer["node_token"]

    def enroll(self) -> requests.Response:
        return requests.post(
            self.cp.url + "/v1/nodes/enroll", json=self.body, verify=str(self.cp.ca_file), timeout=30
        )

    def get(self, path: str, *, cert: bool = True, token: str | None = "current") -> requests.Response:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.token if token == 'current' else token}"
        return requests.get(
            self.cp.url + path,
            cert=(str(self.cert_file), str(self.key_file)) if cert else None,
            headers=headers,
            verify=str(self.cp.ca_file),
            timeout=30,
        )
