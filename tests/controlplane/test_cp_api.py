"""The control plane's HTTP API (docs/contracts.md#control-plane-api), spoken to directly over HTTPS."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bootstrap import nebula
from tests.controlplane.cp_nodes import Enrolled


def _post(cp: Any, path: str, body: Any, bearer: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return requests.post(cp.url + path, json=body, headers=headers, verify=str(cp.ca_file), timeout=30)


def _csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "box")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _enroll_body(token: str, csr: str) -> dict[str, Any]:
    return {
        "token": token,
        "csr_pem": csr,
        "nebula_public_key": nebula.generate_keypair()[1].decode(),
        "nomad_csr_pem": _csr(),
        "hostname": "box",
        "hardware": {},
        "gpu_mode": "none",
    }


def test_an_api_key_mints_a_one_hour_token_that_introspection_does_not_consume(control_plane: Any) -> None:
    control_plane.org("acme")
    key = control_plane.api_key("acme")
    minted = _post(control_plane, "/v1/provisioning-tokens", {}, bearer=key)
    assert minted.status_code == 200
    token = minted.json()["token"]
    for _ in range(2):
        seen = _post(control_plane, "/v1/provisioning-tokens/introspect", {"token": token}).json()
        assert seen["valid"] is True and seen["expires_at"] == minted.json()["expires_at"]
    assert _post(control_plane, "/v1/nodes/enroll", _enroll_body(token, _csr())).status_code == 200
    used = _post(control_plane, "/v1/provisioning-tokens/introspect", {"token": token}).json()
    assert used == {"valid": False, "expires_at": minted.json()["expires_at"], "reason": "used"}
    unknown = _post(control_plane, "/v1/provisioning-tokens/introspect", {"token": "vtk_" + "x" * 43}).json()
    assert unknown["valid"] is False and unknown["reason"] == "unknown"


def test_bad_keys_get_401_and_non_providers_get_403(control_plane: Any) -> None:
    control_plane.org("hobby", provider=False)
    r = _post(control_plane, "/v1/provisioning-tokens", {}, bearer="vlk_" + "n" * 43)
    assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"
    assert _post(control_plane, "/v1/provisioning-tokens", {}).status_code == 401
    r = _post(control_plane, "/v1/provisioning-tokens", {}, bearer=control_plane.api_key("hobby"))
    assert r.status_code == 403
    assert r.json()["error"] == {
        "code": "NOT_A_PROVIDER",
        "message": "org hobby isn't an approved provider yet",
    }


@pytest.mark.slow
def test_a_retried_enrollment_with_the_same_key_is_answered_again_and_anyone_else_is_refused(
    control_plane: Any,
) -> None:
    control_plane.org("acme")
    token, csr = control_plane.token("acme"), _csr()
    first = _post(control_plane, "/v1/nodes/enroll", _enroll_body(token, csr))
    again = _post(control_plane, "/v1/nodes/enroll", _enroll_body(token, csr))
    assert first.status_code == again.status_code == 200
    assert first.json()["node_id"] == again.json()["node_id"]
    assert first.json()["reenrolled"] is again.json()["reenrolled"] is False
    assert first.json()["node_token"] != again.json()["node_token"]
    other = _post(control_plane, "/v1/nodes/enroll", _enroll_body(token, _csr()))
    assert other.status_code == 401 and other.json()["error"]["code"] == "TOKEN_USED"
    assert len(control_plane.admin.org_summary("acme")["nodes"]) == 1


def test_malformed_enrollments_get_400_without_consuming_the_token(control_plane: Any) -> None:
    control_plane.org("acme")
    token = control_plane.token("acme")
    bad_csr = _post(control_plane, "/v1/nodes/enroll", _enroll_body(token, "not a csr"))
    assert bad_csr.status_code == 400 and "certificate signing request" in bad_csr.json()["error"]["message"]
    bad_mode = _post(control_plane, "/v1/nodes/enroll", {**_enroll_body(token, _csr()), "gpu_mode": "x"})
    assert bad_mode.status_code == 400
    for field, value, says in (
        ("nebula_public_key", None, "nebula_public_key is required"),
        ("nebula_public_key", "-----BEGIN NEBULA X25519 PUBLIC KEY-----\nAAAA\n", "nebula_public_key: "),
        ("nebula_public_key", nebula.generate_keypair()[0].decode(), "nebula_public_key: "),
        ("nomad_csr_pem", None, "nomad_csr_pem is required"),
        ("nomad_csr_pem", "not a csr", "nomad_csr_pem: "),
    ):
        body = {**_enroll_body(token, _csr()), field: value}
        if value is None:
            del body[field]
        res = _post(control_plane, "/v1/nodes/enroll", body)
        assert res.status_code == 400, (field, res.text)
        assert res.json()["error"]["message"].startswith(says), res.text
    not_json = requests.post(
        control_plane.url + "/v1/nodes/enroll", data="{", verify=str(control_plane.ca_file), timeout=30
    )
    assert not_json.status_code == 400
    assert control_plane.admin.introspect(token)["valid"] is True


def test_patching_a_node_needs_the_orgs_own_key_and_only_removal_is_accepted(control_plane: Any) -> None:
    org = control_plane.org("acme")
    control_plane.org("rival")
    node = _post(control_plane, "/v1/nodes/enroll", _enroll_body(control_plane.token("acme"), _csr())).json()

    def patch(org_ref: str, key: str, body: Any) -> requests.Response:
        return requests.patch(
            f"{control_plane.url}/v1/orgs/{org_ref}/provider/nodes/{node['node_id']}",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            verify=str(control_plane.ca_file),
            timeout=30,
        )

    key = control_plane.api_key("acme")
    assert patch(org, control_plane.api_key("rival"), {"status": "removed"}).status_code == 404
    assert patch(org, key, {"status": "active"}).status_code == 400
    assert patch(org, "vlk_" + "z" * 43, {"status": "removed"}).status_code == 401
    done = patch("acme", key, {"status": "removed"})  # the org's name works as well as its ID
    assert done.status_code == 200
    assert done.json() == {"node_id": node["node_id"], "status": "removed", "units_freed": 0}
    assert control_plane.admin.org_summary("acme")["nodes"][0]["status"] == "removed"


@pytest.mark.slow
def test_the_artifact_manifest_is_404_until_an_artifacts_directory_provides_one(
    control_plane: Any, start_control_plane: Callable[..., Any], tmp_path: Path
) -> None:
    from bootstrap.manifest import public_key_from_text, verify_manifest

    r = requests.get(
        control_plane.url + "/v1/artifacts/manifest", verify=str(control_plane.ca_file), timeout=30
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"

    art = tmp_path / "artifacts"
    for version, payload in (("1.9.4", b"\x1f\x8bold"), ("1.9.10", b"\x1f\x8bpayload")):
        (art / "nebula" / version).mkdir(parents=True)
        (art / "nebula" / version / "nebula-linux-amd64.tar.gz").write_bytes(payload)
    cp = start_control_plane(args=("--artifacts", str(art)))
    cp.org("acme")
    node = Enrolled(cp, "acme", tmp_path / "node")
    got = node.get("/v1/artifacts/manifest")
    assert got.status_code == 200
    key = public_key_from_text((cp.state_dir / "manifest-signing.pub").read_text())
    manifest = verify_manifest(got.json(), [key])
    # 1.9.10 is newer than 1.9.4 (natural order), and offered as the current version.
    (nebula,) = manifest.artifacts
    assert (nebula.version, nebula.size, nebula.url) == ("1.9.10", 9, "/v1/artifacts/nebula/1.9.10")
    blob = node.get("/v1/artifacts/nebula/1.9.10")
    assert blob.status_code == 200 and blob.content == b"\x1f\x8bpayload"
    # An operator pins the offered version with a `current` pointer.
    (art / "nebula" / "current").write_text("1.9.4\n")
    again = node.get("/v1/artifacts/manifest").json()
    assert verify_manifest(again, [key]).get("nebula").version == "1.9.4"
    assert node.get("/v1/artifacts/nebula/..").status_code == 404


def test_install_sh_is_served_with_the_api_url_ca_and_manifest_key_filled_in(
    start_control_plane: Callable[..., Any], tmp_path: Path
) -> None:
    cp = start_control_plane(args=("--artifacts", str(tmp_path)))
    r = requests.get(cp.url + "/install.sh", verify=str(cp.ca_file), timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/x-shellscript")
    script = r.text
    assert "@@VECTORLAY" not in script
    assert f"local default_api='{cp.url}'" in script
    assert cp.ca_file.read_text().strip() in script
    assert (cp.state_dir / "manifest-signing.pub").read_text().strip() in script
    assert script.rstrip().endswith('vectorlay_install "$@" --end-of-script')
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0


@pytest.mark.slow
def test_enrollment_answers_carry_the_manifest_key_to_pin(
    start_control_plane: Callable[..., Any], tmp_path: Path
) -> None:
    cp = start_control_plane(args=("--artifacts", str(tmp_path)))
    cp.org("acme", provider=True)
    from bootstrap.host import TreeHost
    from bootstrap.identity import load_identity

    root = tmp_path / "node"
    root.mkdir()
    res = cp.enroll(root, "acme")
    assert res.returncode == 0, res.stderr
    ident = load_identity(TreeHost(root))
    assert ident is not None
    assert ident.enrollment()["manifest_keys"] == [(cp.state_dir / "manifest-signing.pub").read_text()]
