"""POST /v1/node/heartbeat and GET /v1/orgs/<org>/provider/nodes against the real control plane:
strict validation, the advertising rule, and a removed node staying removed."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from bootstrap.host import TreeHost
from bootstrap.identity import load_identity
from controlplane import testing
from hostsim import build_host, load_topology
from hostsim.demo import build_container_host
from tests.controlplane.unit_bodies import BASE, malformed_units
from tests.install.helpers import gpus_on_vfio

pytestmark = pytest.mark.slow

# A heartbeat of a healthy 8-GPU node, the one the per-unit bodies start from too.
GOOD: dict[str, Any] = BASE


def _with(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        target = body
        for p in path:
            target = target[p]
        target[last] = value
    return body


class Node:
    def __init__(self, cp: testing.RunningControlPlane, root: Path) -> None:
        ident = load_identity(TreeHost(root))
        assert ident is not None
        self.cp, self.ident = cp, ident

    @property
    def id(self) -> str:
        return self.ident.node_id

    def beat(self, body: Any, *, token: str | None = None, cert: bool = True) -> requests.Response:
        return requests.post(
            self.cp.url + "/v1/node/heartbeat",
            json=body,
            headers={"Authorization": f"Bearer {token or self.ident.node_token()}"},
            cert=(str(self.ident.cert_file), str(self.ident.key_file)) if cert else None,
            verify=str(self.cp.ca_file),
            timeout=30,
        )


@pytest.fixture
def enrolled(tmp_path: Path) -> Callable[..., Node]:
    counter = iter(range(1000))

    def _enroll(cp: testing.RunningControlPlane, org: str, *, gpus: bool = True) -> Node:
        desc = load_topology("hgx-h100" if gpus else "cpu-only")
        if gpus:
            gpus_on_vfio(desc)
        root = build_host(tmp_path / f"node-{next(counter)}", desc)
        res = cp.enroll(root, org, gpu_mode="passthrough" if gpus else "none")
        assert res.returncode == 0, res.stderr
        return Node(cp, root)

    return _enroll


def listing(cp: testing.RunningControlPlane, org: str, key: str) -> requests.Response:
    return requests.get(
        f"{cp.url}/v1/orgs/{org}/provider/nodes",
        headers={"Authorization": f"Bearer {key}"},
        verify=str(cp.ca_file),
        timeout=30,
    )


def only_node(cp: testing.RunningControlPlane, org: str, key: str) -> dict[str, Any]:
    r = listing(cp, org, key)
    assert r.status_code == 200, r.text
    (node,) = r.json()["nodes"]
    return dict(node)


def test_a_healthy_heartbeat_advertises_every_ready_unit_and_the_listing_shows_it(
    control_plane: testing.RunningControlPlane, enrolled: Callable[..., Node]
) -> None:
    control_plane.org("acme")
    key = control_plane.api_key("acme")
    node = enrolled(control_plane, "acme")
    before = only_node(control_plane, "acme", key)
    assert before["gpu_units"]["advertised"] == 0 and before["reason"] == "no heartbeat yet"
    r = node.beat(GOOD)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "active", "advertised_units": 8, "next_heartbeat_s": 240, "reason": None}
    seen = only_node(control_plane, "acme", key)
    assert seen["node_id"] == node.id and seen["status"] == "active" and seen["verdict"] == "PASS"
    assert seen["gpu_units"] == {"ready": 8, "total": 8, "enrolled": 8, "advertised": 8}
    assert seen["resources"] == GOOD["resources"] and seen["reason"] is None
    assert seen["last_heartbeat_at"].endswith("Z") and seen["agents"]["nebula"] == "1.9.5"


RULE_CASES: list[tuple[dict[str, Any], str | None, int]] = [
    (_with(doctor__verdict="FAIL"), "verdict FAIL", 0),
    (_with(draining=True), "draining", 0),
    (_with(resources__memory_percent=90), "memory 90% over 85%", 0),
    (
        _with(resources__cpu_percent=95.5, resources__disk_percent=91),
        "CPU 96% over 90%; storage 91% over 90%",
        0,
    ),
    (
        _with(doctor__gpu_units={"ready": 10_000, "total": 10_000}),
        "capped at the enrolled hardware (8 GPU unit(s))",
        8,
    ),
    # A node may hold itself to a stricter threshold, never a looser one.
    (_with(resources__thresholds={"memory_percent": 30}), "memory 40% over 30%", 0),
    (
        _with(resources__thresholds={"memory_percent": 100}, resources__memory_percent=90),
        "memory 90% over 85%",
        0,
    ),
    (_with(doctor__verdict="WARN", doctor__gpu_units={"ready": 5, "total": 8}), None, 5),
]


def test_the_advertising_rule_says_why_a_node_advertises_less_than_it_has_ready(
    control_plane: testing.RunningControlPlane, enrolled: Callable[..., Node]
) -> None:
    control_plane.org("acme")
    key = control_plane.api_key("acme")
    node = enrolled(control_plane, "acme")
    for body, reason, advertised in RULE_CASES:
        r = node.beat(body)
        assert r.status_code == 200, r.text
        assert (r.json()["advertised_units"], r.json()["reason"]) == (advertised, reason)
        seen = only_node(control_plane, "acme", key)
        assert (seen["gpu_units"]["advertised"], seen["reason"]) == (advertised, reason)
        # Each heartbeat replaces the last: a healthy one advertises everything again.
        assert node.beat(GOOD).json()["advertised_units"] == 8


def test_a_node_enrolled_without_gpus_that_claims_ten_thousand_is_capped_at_zero(
    control_plane: testing.RunningControlPlane, enrolled: Callable[..., Node]
) -> None:
    control_plane.org("acme")
    key = control_plane.api_key("acme")
    node = enrolled(control_plane, "acme", gpus=False)
    r = node.beat(_with(doctor__gpu_units={"ready": 10_000, "total": 10_000}))
    assert r.json()["advertised_units"] == 0
    seen = only_node(control_plane, "acme", key)
    assert seen["gpu_units"] == {"ready": 10_000, "total": 10_000, "enrolled": 0, "advertised": 0}
    assert seen["reason"] == "capped at the enrolled hardware (0 GPU unit(s))"


def test_a_container_mode_node_advertises_the_gpus_it_enrolled_with_and_no_more(
    tmp_path: Path, control_plane: testing.RunningControlPlane
) -> None:
    """A container-mode node enrolls no IOMMU groups (it shares each GPU through runsc): its cap is
    the GPUs it enrolled with, not 0."""
    control_plane.org("acme")
    key = control_plane.api_key("acme")
    root = tmp_path / "container-node"
    build_container_host(root)
    res = control_plane.enroll(root, "acme", gpu_mode="container")
    assert res.returncode == 0, res.stderr
    node = Node(control_plane, root)
    assert node.beat(GOOD).json() == {
        "status": "active",
        "advertised_units": 8,
        "next_heartbeat_s": 240,
        "reason": None,
    }
    assert only_node(control_plane, "acme", key)["gpu_units"] == {
        "ready": 8,
        "total": 8,
        "enrolled": 8,
        "advertised": 8,
    }
    r = node.beat(_with(doctor__gpu_units={"ready": 9, "total": 9}))
    assert (r.json()["advertised_units"], r.json()["reason"]) == (
        8,
        "capped at the enrolled hardware (8 GPU unit(s))",
    )


def test_three_intervals_without_a_heartbeat_on_the_control_planes_clock_advertise_nothing(
    tmp_path: Path, enrolled: Callable[..., Node]
) -> None:
    cp = testing.start(tmp_path / "cp")
    try:
        cp.org("acme")
        key = cp.api_key("acme")
        node = enrolled(cp, "acme")
        assert node.beat(GOOD).json()["advertised_units"] == 8
    finally:
        testing.stop(cp)
    # The same database and state, the clock three intervals (and a bit) later.
    later = testing.start(tmp_path / "cp", env={"VECTORLAY_CP_CLOCK_OFFSET": str(3 * 240 + 5)})
    try:
        seen = only_node(later, "acme", key)
        assert seen["gpu_units"]["advertised"] == 0
        assert seen["reason"].startswith("stale heartbeat (") and seen["reason"].endswith("limit 720 s)")
    finally:
        testing.stop(later)
    just_in_time = testing.start(tmp_path / "cp", env={"VECTORLAY_CP_CLOCK_OFFSET": str(3 * 240 - 300)})
    try:
        assert only_node(just_in_time, "acme", key)["gpu_units"]["advertised"] == 8
    finally:
        testing.stop(just_in_time)


def test_a_removed_nodes_heartbeat_is_answered_removed_and_never_revives_it(
    control_plane: testing.RunningControlPlane, enrolled: Callable[..., Node]
) -> None:
    control_plane.org("acme")
    key = control_plane.api_key("acme")
    node = enrolled(control_plane, "acme")
    assert node.beat(GOOD).json()["advertised_units"] == 8
    r = requests.patch(
        f"{control_plane.url}/v1/orgs/acme/provider/nodes/{node.id}",
        json={"status": "removed"},
        headers={"Authorization": f"Bearer {key}"},
        verify=str(control_plane.ca_file),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    for _ in range(3):
        r = node.beat(GOOD)
        assert r.status_code == 200
        assert r.json() == {
            "status": "removed",
            "advertised_units": 0,
            "next_heartbeat_s": 240,
            "reason": "removed",
        }
    seen = only_node(control_plane, "acme", key)
    assert (
        seen["status"] == "removed" and seen["gpu_units"]["advertised"] == 0 and seen["reason"] == "removed"
    )


def _malformed() -> list[Any]:
    cases: list[Any] = [
        [],
        "heartbeat",
        {},
        _with(doctor="PASS"),
        _with(doctor__verdict="GREEN"),
        _with(doctor__checks="all fine"),
        _with(doctor__checks=[{"name": "kvm", "status": "MAYBE"}]),
        _with(doctor__checks=[{"name": "x" * 100, "status": "PASS"}]),
        # Names ending in a newline: `$` matched before it, so they were stored as names.
        _with(doctor__checks=[{"name": "kvm\n", "status": "PASS"}]),
        _with(agents={"nebula\n": "1.9.5"}),
        _with(resources={**GOOD["resources"], "load1\n": 0.5}),
        _with(doctor__checks=[{"name": "kvm", "status": "PASS", "message": "m" * 5000}]),
        _with(doctor__checks=[{"name": "kvm", "status": "PASS"}] * 65),
        _with(doctor__gpu_units={"ready": 9, "total": 8}),
        _with(doctor__gpu_units={"ready": -1, "total": 8}),
        _with(doctor__gpu_units={"ready": True, "total": 8}),
        _with(doctor__gpu_units={"ready": 1e9, "total": 8}),
        _with(doctor__gpu_units={"ready": 10**9, "total": 10**9}),
        _with(resources={"cpu_percent": 1}),
        _with(resources__cpu_percent="12%"),
        _with(resources__cpu_percent=101),
        _with(resources__memory_percent=-3),
        _with(resources__memory_percent=None),
        _with(resources__thresholds={"gpu_percent": 10}),
        _with(resources__thresholds={"cpu_percent": 0}),
        _with(resources__Weird=1),
        _with(resources={**GOOD["resources"], **{f"x{i}": 1 for i in range(20)}}),
        _with(agents=["nebula"]),
        _with(agents__nebula=7),
        _with(agents__nebula="v" * 100),
        _with(agents={f"a{i}": "1" for i in range(20)}),
        _with(draining="no"),
        _with(draining=None),
        _with(interval_s=0),
        _with(interval_s=10**6),
        _with(interval_s=2.5),
        {**GOOD, "advertised_units": 10_000},
    ]
    del_draining = copy.deepcopy(GOOD)
    del del_draining["draining"]
    cases.append(del_draining)
    cases.extend(malformed_units())
    return cases


def test_malformed_heartbeats_get_400_with_a_message_and_never_500(
    control_plane: testing.RunningControlPlane, enrolled: Callable[..., Node]
) -> None:
    control_plane.org("acme")
    node = enrolled(control_plane, "acme")
    for body in _malformed():
        r = node.beat(body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json()["error"]["code"] == "BAD_REQUEST" and r.json()["error"]["message"]
    nan = requests.post(
        control_plane.url + "/v1/node/heartbeat",
        data=b'{"doctor": {"verdict": "PASS", "gpu_units": {"ready": 0, "total": 0}},'
        b' "resources": {"cpu_percent": NaN, "memory_percent": 1, "disk_percent": 1}, "draining": false}',
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {node.ident.node_token()}"},
        cert=(str(node.ident.cert_file), str(node.ident.key_file)),
        verify=str(control_plane.ca_file),
        timeout=30,
    )
    assert nan.status_code == 400
    big = node.beat(_with(agents__nebula="1" * 70_000))
    assert big.status_code == 413
    garbage = requests.post(
        control_plane.url + "/v1/node/heartbeat",
        data=b"<html>not json</html>",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {node.ident.node_token()}"},
        cert=(str(node.ident.cert_file), str(node.ident.key_file)),
        verify=str(control_plane.ca_file),
        timeout=30,
    )
    assert garbage.status_code == 400
    assert "Traceback" not in control_plane.log()


def test_a_heartbeat_needs_the_nodes_certificate_and_its_token(
    control_plane: testing.RunningControlPlane, enrolled: Callable[..., Node]
) -> None:
    control_plane.org("acme")
    node, other = enrolled(control_plane, "acme"), enrolled(control_plane, "acme")
    no_cert = node.beat(GOOD, cert=False)
    assert no_cert.status_code == 401 and no_cert.json()["error"]["code"] == "CLIENT_CERT_REQUIRED"
    wrong_token = node.beat(GOOD, token=other.ident.node_token())
    assert wrong_token.status_code == 401 and wrong_token.json()["error"]["code"] == "BAD_NODE_CREDENTIALS"
    assert node.beat(GOOD, token="vnt_" + "x" * 43).status_code == 401


def test_the_listing_needs_the_orgs_own_api_key(
    control_plane: testing.RunningControlPlane, enrolled: Callable[..., Node]
) -> None:
    control_plane.org("acme")
    control_plane.org("globex")
    control_plane.org("hobby", provider=False)
    enrolled(control_plane, "acme")
    assert listing(control_plane, "acme", "vlk_" + "n" * 43).status_code == 401
    assert listing(control_plane, "acme", control_plane.api_key("globex")).status_code == 404
    assert listing(control_plane, "hobby", control_plane.api_key("hobby")).status_code == 403
    assert listing(control_plane, "globex", control_plane.api_key("globex")).json() == {"nodes": []}
    by_id = listing(control_plane, control_plane.org("initech"), control_plane.api_key("initech"))
    assert by_id.status_code == 200 and by_id.json() == {"nodes": []}
