"""The node holds the control plane's answers to their contract before it writes or does anything
with them (bootstrap.answers): introspection and enrollment answers of the wrong type, size, depth
or content are refused with what was wrong, no traceback, and nothing written. The answers come
from the real control plane, changed on the way (tests.tampering)."""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from bootstrap.api import ApiClient
from bootstrap.cli import main
from bootstrap.enroll import enroll, introspect_token
from bootstrap.errors import VectorlayError
from bootstrap.host import TreeHost
from bootstrap.identity import load_identity
from controlplane.nebula_ca import NebulaCA
from tests.tampering import TamperingControlPlane

ENROLL = "/v1/nodes/enroll"
INTROSPECT = "/v1/provisioning-tokens/introspect"


@pytest.fixture
def cp(control_plane: Any) -> Any:
    control_plane.org("acme")
    return control_plane


@pytest.fixture
def tampering(cp: Any) -> Iterator[TamperingControlPlane]:
    proxy = TamperingControlPlane(cp)
    yield proxy
    proxy.close()


def _on(path: str, change: Callable[[Any], Any]) -> Callable[[str, Any, Any], Any]:
    def tamper(p: str, _request: Any, answer: Any) -> Any:
        return change(copy.deepcopy(answer)) if p == path else answer

    return tamper


def _set(dotted: str, value: Any) -> Callable[[Any], Any]:
    def change(answer: Any) -> Any:
        *path, last = dotted.split(".")
        target = answer
        for p in path:
            target = target[p]
        target[last] = value
        return answer

    return change


def _enroll(proxy: TamperingControlPlane, root: Path) -> None:
    api = ApiClient(proxy.url, ca_file=proxy.cp.ca_file, attempts=1)
    try:
        enroll(TreeHost(root), api, proxy.cp.token("acme"), gpu_mode="none", hardware={})
    finally:
        api.close()


def _refused(proxy: TamperingControlPlane, tmp_path: Path, message: str) -> None:
    root = tmp_path / "node"
    root.mkdir()
    with pytest.raises(VectorlayError) as refused:
        _enroll(proxy, root)
    assert message in refused.value.message, refused.value.message
    assert len(refused.value.message) < 400  # never the whole value
    assert not (root / "etc").exists(), "something was written from a refused answer"


def test_an_unchanged_answer_enrolls(tampering: TamperingControlPlane, tmp_path: Path) -> None:
    (tmp_path / "node").mkdir()
    _enroll(tampering, tmp_path / "node")
    assert load_identity(TreeHost(tmp_path / "node")) is not None


# The two crashes, its "seven other cases" of wrong types saved as the identity, and more.
WRONG: list[tuple[str, Any, str]] = [
    ("manifest_keys", 5, "manifest_keys is 5, not a list"),
    ("manifest_keys", ["not a key"], "manifest_keys[0] is not an Ed25519 public key"),
    ("reenrolled", "no", "reenrolled is 'no', not true or false"),
    ("node_id", 12345, "node_id is 12345, not a string"),
    ("node_id", "../../etc/passwd", "node_id '../../etc/passwd' is not of the expected form"),
    ("org_id", {"id": "org_1"}, "org_id is an object, not a string"),
    (
        "node_token",
        "vnt_abcdefghijklmnop\r\nX-Evil: 1",
        # The node token is redacted from every message, even from one about its own form.
        "node_token '[redacted]\\r\\nX-Evil: 1' is not",
    ),
    ("certificate_pem", "x" * 1_000_000, "certificate_pem must be 1-65536 characters, not 1000000"),
    ("nebula.lighthouses", "lighthouse", "nebula.lighthouses is 'lighthouse', not a list"),
    ("nebula.lighthouses", [{"overlay_ip": 5, "endpoints": []}], "nebula.lighthouses[0].overlay_ip is 5"),
    ("nebula.groups", [1], "nebula.groups[0] is 1, not a string"),
    ("nebula.listen_port", "4242", "nebula.listen_port is '4242', not a whole number from 0 to 65535"),
    ("nomad.servers", 7, "nomad.servers is 7, not a list"),
    (
        "nomad.servers",
        ["100.64.0.1:4647\nextra"],
        "nomad.servers[0] holds a control character",
    ),
    ("nomad.meta", ["a"], "nomad.meta is a list, not an object"),
    ("nomad.region", "global\n", "nomad.region 'global\\n' is not of the expected form"),
    ("nomad.datacenter", 5, "nomad.datacenter is 5, not a string"),
    ("nebula", None, "nebula is None, not an object"),
]


@pytest.mark.parametrize(
    ("field", "value", "message"), WRONG, ids=[f"{f}={str(v)[:20]!r}" for f, v, _ in WRONG]
)
def test_an_enrollment_answer_with_a_field_of_the_wrong_type_or_form_is_refused_and_nothing_written(
    tampering: TamperingControlPlane, tmp_path: Path, field: str, value: Any, message: str
) -> None:
    tampering.tamper = _on(ENROLL, _set(field, value))
    _refused(tampering, tmp_path, message)


def _resign(cp: Any, interface: str, *, cidr: str | None = "keep") -> Callable[[str, Any, Any], Any]:
    """The answer with a nebula certificate (signed by the control plane's own nebula CA, for the
    node's key) for `interface`, and overlay_ip set to its address: a control plane that means it."""
    ca = NebulaCA.load_or_create(cp.state_dir, datetime.now(timezone.utc))

    def tamper(path: str, request: Any, answer: Any) -> Any:
        if path != ENROLL:
            return answer
        iface = ipaddress.IPv4Interface(interface)
        answer["nebula"]["certificate"] = ca.sign(
            request["nebula_public_key"],
            name=answer["node_id"],
            ip=iface,
            groups=["vectorlay-node"],
            now=datetime.now(timezone.utc),
        )
        answer["overlay_ip"] = answer["nebula"]["overlay_ip"] = str(iface.ip)
        if cidr is None:
            del answer["nebula"]["overlay_cidr"]
        elif cidr != "keep":
            answer["nebula"]["overlay_cidr"] = cidr
        return answer

    return tamper


@pytest.mark.parametrize(
    ("interface", "cidr", "message"),
    [
        ("10.1.2.3/10", "keep", "overlay_ip 10.1.2.3 is not a host address of the overlay 100.64.0.0/10"),
        ("0.0.0.5/0", "keep", "overlay_ip 0.0.0.5 is not a host address of the overlay 100.64.0.0/10"),
        ("127.0.0.9/8", "keep", "overlay_ip 127.0.0.9 is not a host address of the overlay 100.64.0.0/10"),
        # A control plane that does not say its overlay: the certificate's network is held to the rules.
        ("0.0.0.5/0", None, "overlay_ip 0.0.0.5 is not inside 10/8, 172.16/12, 192.168/16 or 100.64/10"),
        ("127.0.0.9/8", None, "overlay_ip 127.0.0.9 is not inside 10/8, 172.16/12, 192.168/16 or 100.64/10"),
        ("10.1.2.3/0", None, "the nebula certificate's network 0.0.0.0/0 is a /0"),
        # ...and one that says an overlay which is no overlay.
        ("0.0.0.5/0", "0.0.0.0/0", "nebula.overlay_cidr 0.0.0.0/0 is a /0"),
        ("127.0.0.9/8", "127.0.0.0/8", "nebula.overlay_cidr 127.0.0.0/8 is not inside"),
        # The right address, but a certificate whose network is wider than the overlay.
        ("100.64.0.77/8", "keep", "the nebula certificate's network 100.0.0.0/8 is not inside"),
    ],
    ids=[
        "10/10",
        "0/0",
        "127/8",
        "0/0-no-cidr",
        "127/8-no-cidr",
        "/0-cert",
        "cidr-/0",
        "cidr-loopback",
        "wide-cert",
    ],
)
def test_an_overlay_ip_outside_the_overlay_is_refused_and_nothing_written(
    tampering: TamperingControlPlane, cp: Any, tmp_path: Path, interface: str, cidr: str | None, message: str
) -> None:
    tampering.tamper = _resign(cp, interface, cidr=cidr)
    _refused(tampering, tmp_path, message)


def test_an_enrollment_answer_nested_100000_deep_is_refused_without_recursion_error(
    tampering: TamperingControlPlane, tmp_path: Path
) -> None:
    tampering.tamper = _on(ENROLL, lambda _a: b"[" * 100_000 + b"]" * 100_000)
    _refused(tampering, tmp_path, "nested too deep for an answer of this API")


INTROSPECTION: list[tuple[Any, str]] = [
    ({"valid": False, "reason": {"code": "used"}}, "reason is an object, not a string"),
    ({"valid": "yes", "expires_at": None}, "valid is 'yes', not true or false"),
    ({"valid": True, "expires_at": 5}, "expires_at is 5, not a string"),
    ({"valid": False, "reason": "r" * 10_000}, "reason must be 1-64 characters, not 10000"),
    ({"expires_at": None}, "valid is missing"),
]


@pytest.mark.parametrize(
    ("answer", "message"),
    INTROSPECTION,
    ids=["reason-object", "valid-string", "expiry-number", "reason-huge", "no-valid"],
)
def test_a_wrong_typed_introspection_answer_is_refused_with_what_was_wrong(
    tampering: TamperingControlPlane, cp: Any, answer: Any, message: str
) -> None:
    tampering.tamper = _on(INTROSPECT, lambda _a: answer)
    api = ApiClient(tampering.url, ca_file=cp.ca_file, attempts=1)
    try:
        with pytest.raises(VectorlayError) as refused:
            introspect_token(api, cp.token("acme"))
    finally:
        api.close()
    assert refused.value.message.endswith(message), refused.value.message


def test_the_enroll_command_says_what_was_wrong_with_the_answer_without_a_traceback(
    tampering: TamperingControlPlane,
    cp: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's crash: `reason` as an object in the introspection, then `manifest_keys=5`."""
    root = tmp_path / "node"
    root.mkdir()
    monkeypatch.setenv("VECTORLAY_TOKEN", cp.token("acme"))
    args = ["enroll", "--root", str(root), "--api", tampering.url, "--ca-file", str(cp.ca_file)]
    for path, change, message in (
        (INTROSPECT, lambda _a: {"valid": False, "reason": {"x": 1}}, "reason is an object, not a string"),
        (ENROLL, _set("manifest_keys", 5), "manifest_keys is 5, not a list"),
    ):
        tampering.tamper = _on(path, change)
        with pytest.raises(SystemExit) as exited:
            main(args)
        out = capsys.readouterr()
        assert exited.value.code == 1, out
        assert message in out.err and "Traceback" not in out.err + out.out, out.err
    # The command runs the enroll stage: nothing from the answer is written, only the key pair the
    # node made before asking, kept so that a re-run with the same token completes the enrollment.
    written = [p.relative_to(root) for p in (root / "etc").rglob("*") if not p.is_dir()]
    assert [str(p) for p in written] == ["etc/vectorlay/.enroll-pending.key"]


@pytest.mark.parametrize(
    ("interface", "message"),
    [
        ("0.0.0.5/0", "the network of /etc/vectorlay/identity/nebula.crt 0.0.0.0/0 is a /0"),
        ("127.0.0.9/8", "the network of /etc/vectorlay/identity/nebula.crt 127.0.0.0/8 is not inside"),
        ("10.1.2.3/10", "nebula.crt is for the network 10.0.0.0/10, not the overlay 100.64.0.0/10"),
    ],
)
def test_the_doctor_fails_an_identity_whose_overlay_ip_is_outside_the_overlay(
    tampering: TamperingControlPlane, cp: Any, tmp_path: Path, interface: str, message: str
) -> None:
    """An identity written before the enrollment answer was checked (or edited since): the doctor
    no longer says PASS."""
    import json

    from doctor.identity import check_identity
    from doctor.model import Status

    requests: list[Any] = []

    def keep(path: str, request: Any, answer: Any) -> Any:
        if path == ENROLL:
            requests.append(request)
        return answer

    tampering.tamper = keep
    root = tmp_path / "node"
    root.mkdir()
    _enroll(tampering, root)
    host = TreeHost(root)
    assert check_identity(host).status is Status.PASS
    ca = NebulaCA.load_or_create(cp.state_dir, datetime.now(timezone.utc))
    iface = ipaddress.IPv4Interface(interface)
    ident = host.path("/etc/vectorlay/identity")
    (ident / "nebula.crt").write_text(
        ca.sign(
            requests[-1]["nebula_public_key"],
            name="n",
            ip=iface,
            groups=["vectorlay-node"],
            now=datetime.now(timezone.utc),
        )
    )
    node = json.loads((ident / "node.json").read_text())
    (ident / "node.json").write_text(json.dumps({**node, "overlay_ip": str(iface.ip)}))
    result = check_identity(host)
    assert result.status is Status.FAIL and message in result.message, result.message
