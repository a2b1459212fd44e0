"""Authorization on the control plane (issue 13, class 2), over real HTTPS with mTLS: the manifest and
the agents' artifacts only for an active node's certificate + node token (the installer stays
public), a used provisioning token never revives a removed node, and a token of an org that is not
an approved provider is reported as such by introspection and stops the installer's preflight."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from bootstrap.manifest import public_key_from_text, verify_manifest
from hostsim import inject
from hostsim.agents import publish, publish_agents
from hostsim.snapshot import snapshot
from tests.controlplane.cp_nodes import Enrolled
from tests.install.helpers import install


def _anonymous(cp: Any, path: str) -> requests.Response:
    return requests.get(cp.url + path, verify=str(cp.ca_file), timeout=30)


@pytest.fixture
def cp(start_control_plane: Callable[..., Any], tmp_path: Path) -> Any:
    art = tmp_path / "artifacts"
    publish_agents(art)
    publish(art, "installer", "0.1.0", b"\x1f\x8bwheelhouse", "wheelhouse.tar.gz")
    started = start_control_plane(args=("--artifacts", str(art)))
    started.org("acme", provider=True)
    return started


def _remove(cp: Any, node_id: str) -> None:
    r = requests.patch(
        f"{cp.url}/v1/orgs/acme/provider/nodes/{node_id}",
        json={"status": "removed"},
        headers={"Authorization": f"Bearer {cp.api_key('acme')}"},
        verify=str(cp.ca_file),
        timeout=30,
    )
    assert r.status_code == 200, r.text


@pytest.mark.slow
def test_without_credentials_only_the_installer_is_listed_and_served(cp: Any) -> None:
    got = _anonymous(cp, "/v1/artifacts/manifest")
    assert got.status_code == 200
    key = public_key_from_text((cp.state_dir / "manifest-signing.pub").read_text())
    manifest = verify_manifest(got.json(), [key])
    assert [a.name for a in manifest.artifacts] == ["installer"]
    assert _anonymous(cp, "/v1/artifacts/installer/0.1.0").content == b"\x1f\x8bwheelhouse"
    for path in ("/v1/artifacts/nebula/1.0.0", "/v1/artifacts/node-agent/1.0.0", "/v1/artifacts/nebula/9.9"):
        r = _anonymous(cp, path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "CLIENT_CERT_REQUIRED", path


def test_an_active_nodes_certificate_and_token_get_everything(cp: Any, tmp_path: Path) -> None:
    node = Enrolled(cp, "acme", tmp_path / "n")
    got = node.get("/v1/artifacts/manifest")
    assert got.status_code == 200
    names = {a["name"] for a in got.json()["artifacts"]}
    assert names == {"installer", "nebula", "nomad", "node-agent"}
    # Both views carry the serial of the whole set.
    assert got.json()["serial"] == _anonymous(cp, "/v1/artifacts/manifest").json()["serial"]
    assert node.get("/v1/artifacts/nebula/1.0.0").status_code == 200


@pytest.mark.parametrize(
    ("cert", "token", "code"),
    [
        (True, None, "UNAUTHORIZED"),  # certificate alone
        (False, "current", "CLIENT_CERT_REQUIRED"),  # token alone
        (True, "vnt_" + "x" * 43, "BAD_NODE_CREDENTIALS"),  # another token
    ],
)
@pytest.mark.slow
def test_half_or_wrong_credentials_are_refused_not_given_the_public_view(
    cp: Any, tmp_path: Path, cert: bool, token: str | None, code: str
) -> None:
    node = Enrolled(cp, "acme", tmp_path / "n")
    for path in ("/v1/artifacts/manifest", "/v1/artifacts/nomad/1.0.0"):
        r = node.get(path, cert=cert, token=token)
        assert r.status_code == 401 and r.json()["error"]["code"] == code, (path, r.text)


def test_the_token_a_re_enrollment_replaced_no_longer_fetches_artifacts(cp: Any, tmp_path: Path) -> None:
    node = Enrolled(cp, "acme", tmp_path / "n")
    old_token = node.token
    again = requests.post(
        cp.url + "/v1/nodes/enroll",
        json={**node.body, "token": cp.token("acme")},
        cert=(str(node.cert_file), str(node.key_file)),
        headers={"Authorization": f"Bearer {old_token}"},
        verify=str(cp.ca_file),
        timeout=30,
    )
    assert again.status_code == 200 and again.json()["node_id"] == node.answer["node_id"]
    node.cert_file.write_text(again.json()["certificate_pem"])
    node.token = again.json()["node_token"]
    assert node.get("/v1/artifacts/manifest").status_code == 200  # the new pair, first use
    stale = node.get("/v1/artifacts/manifest", token=old_token)
    assert stale.status_code == 401 and stale.json()["error"]["code"] == "BAD_NODE_CREDENTIALS"


def test_a_removed_node_gets_403_node_removed_for_the_manifest_and_artifacts(cp: Any, tmp_path: Path) -> None:
    node = Enrolled(cp, "acme", tmp_path / "n")
    _remove(cp, node.answer["node_id"])
    for path in ("/v1/artifacts/manifest", "/v1/artifacts/nebula/1.0.0"):
        r = node.get(path)
        assert r.status_code == 403 and r.json()["error"]["code"] == "NODE_REMOVED", path


@pytest.mark.slow
def test_a_removed_node_no_longer_updates(cp: Any, tmp_path: Path) -> None:
    from hostsim import build_host, load_topology

    root = build_host(tmp_path / "node", load_topology("cpu-only"))
    res = cp.enroll(root, "acme")
    assert res.returncode == 0, res.stderr
    node_id = cp.admin.org_summary("acme")["nodes"][0]["node_id"]
    _remove(cp, node_id)
    env = inject.env(forbid_live=False)
    upd = subprocess.run(
        [sys.executable, "-m", "bootstrap.cli", "update", "--root", str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert upd.returncode == 1 and "Traceback" not in upd.stderr
    assert "403 NODE_REMOVED: this node was decommissioned by its provider" in upd.stderr
    assert "re-run the install one-liner with a new provisioning token" in upd.stderr
    assert not (root / "opt/vectorlay/releases").exists()


def test_a_used_token_re_sent_with_the_same_csr_never_revives_a_removed_node(cp: Any, tmp_path: Path) -> None:
    node = Enrolled(cp, "acme", tmp_path / "n")
    assert node.enroll().status_code == 200  # before removal: a retry of a lost answer, still fine
    _remove(cp, node.answer["node_id"])
    replay = node.enroll()
    assert replay.status_code == 401
    assert replay.json()["error"]["code"] == "TOKEN_USED"
    assert "a used token never brings a removed node back" in replay.json()["error"]["message"]
    assert cp.admin.org_summary("acme")["nodes"][0]["status"] == "removed"
    # The same token with the removed node's own credentials does not either.
    with_creds = requests.post(
        cp.url + "/v1/nodes/enroll",
        json=node.body,
        cert=(str(node.cert_file), str(node.key_file)),
        headers={"Authorization": f"Bearer {node.token}"},
        verify=str(cp.ca_file),
        timeout=30,
    )
    assert with_creds.status_code == 401 and with_creds.json()["error"]["code"] == "TOKEN_USED"
    assert cp.admin.org_summary("acme")["nodes"][0]["status"] == "removed"
    # A fresh token with its credentials is the documented way back.
    revived = requests.post(
        cp.url + "/v1/nodes/enroll",
        json={**node.body, "token": cp.token("acme")},
        cert=(str(node.cert_file), str(node.key_file)),
        headers={"Authorization": f"Bearer {node.token}"},
        verify=str(cp.ca_file),
        timeout=30,
    )
    assert revived.status_code == 200 and revived.json()["node_id"] == node.answer["node_id"]
    assert cp.admin.org_summary("acme")["nodes"][0]["status"] == "active"


def _introspect(cp: Any, token: str) -> dict[str, Any]:
    r = requests.post(
        cp.url + "/v1/provisioning-tokens/introspect",
        json={"token": token},
        verify=str(cp.ca_file),
        timeout=30,
    )
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


def test_introspection_says_when_the_tokens_org_is_not_an_approved_provider(cp: Any) -> None:
    cp.org("hobby", provider=False)
    seen = _introspect(cp, cp.token("hobby"))
    assert seen["valid"] is False and seen["reason"] == "not_a_provider"
    # An org whose approval is withdrawn after the token was minted: the same answer.
    token = cp.token("acme")
    assert _introspect(cp, token)["valid"] is True
    cp.admin.update_org("acme", provider=False, node_quota=None)
    assert _introspect(cp, token) == {**_introspect(cp, token), "valid": False, "reason": "not_a_provider"}


@pytest.mark.slow
def test_preflight_stops_a_non_provider_token_before_the_gpu_stage_touches_grub(
    start_control_plane: Callable[..., Any], make_tree: Callable[..., Path]
) -> None:
    cp = start_control_plane()
    cp.org("hobby", provider=False)
    root = make_tree("hgx-h100")  # GPUs on nvidia, IOMMU off: the gpu stage would rewrite GRUB
    before = snapshot(root, skip=("run", "var/log"))
    res = install(root, cp=cp, token=cp.token("hobby"))
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "Traceback" not in out
    assert f"{cp.url}: 403 NOT_A_PROVIDER: this org isn't an approved provider yet" in out
    assert "ask vectorlay to approve your org as a provider, then re-run with a new token" in out
    assert "reboot" not in out.lower()
    after = snapshot(root, skip=("run", "var/log"))
    assert {k: v for k, v in after.items() if not k.startswith("var/lib/vectorlay")} == before
    assert not (root / "etc/default/grub.d/99-vectorlay-iommu.cfg").exists()
