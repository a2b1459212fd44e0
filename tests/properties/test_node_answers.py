"""Property tests of the answers the node receives (issue 22, class 5): the enrollment and
introspection answers of the real control plane with a random field replaced on the way (random
wrong types, nesting up to 3,000 deep, strings up to 300 KB, the field dropped), random heartbeat
answers, randomly changed signed manifests and randomly damaged artifact archives. The node never
raises anything but its own clear error, never writes anything from an answer it refused, and
what it keeps of an answer it accepted is bounded. The deadline is a hang detector, generous
enough to never measure speed."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bootstrap import artifacts
from bootstrap.api import ApiClient
from bootstrap.enroll import enroll, introspect_token
from bootstrap.errors import VectorlayError
from bootstrap.host import TreeHost
from bootstrap.identity import load_identity
from bootstrap.manifest import sign_manifest, verify_manifest
from nodeagent.agent import HeartbeatError, _check_answer
from tests.agents.artifact_helpers import DirectoryDownloader, make_tarball, manifest_for
from tests.tampering import TamperingControlPlane

HANG = timedelta(seconds=60)
PROPS = settings(
    max_examples=60,
    deadline=HANG,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DEEP = "\x00deep\x00"  # stands for a nesting spliced into the JSON text (json.dumps would recurse)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),  # control characters included
    st.sampled_from(["", "0.0.0.0/0", "127.0.0.1", "100.64.0.1:4647\n", "../../etc", "vnt_" + "a" * 43]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
# Replacements: a random JSON value, a nesting of random depth, a long string, or the field removed.
replacement = st.one_of(
    json_values,
    st.integers(1, 3000).map(lambda d: (DEEP, d)),
    st.integers(1000, 300_000).map(lambda n: "x" * n),
    st.just(KeyError),
)
ENROLL_FIELDS = (
    "node_id",
    "org_id",
    "overlay_ip",
    "certificate_pem",
    "ca_pem",
    "node_token",
    "reenrolled",
    "manifest_keys",
    "nebula",
    "nebula.certificate",
    "nebula.ca",
    "nebula.overlay_cidr",
    "nebula.overlay_ip",
    "nebula.lighthouses",
    "nebula.lighthouses.0",
    "nebula.lighthouses.0.overlay_ip",
    "nebula.lighthouses.0.endpoints",
    "nebula.groups",
    "nebula.listen_port",
    "nomad",
    "nomad.region",
    "nomad.datacenter",
    "nomad.servers",
    "nomad.node_class",
    "nomad.meta",
    "nomad.certificate_pem",
    "nomad.ca_pem",
)


def _replaced(answer: Any, dotted: str, value: Any) -> bytes:
    """`answer` as JSON bytes with the field at `dotted` replaced by `value` (or removed)."""
    answer = copy.deepcopy(answer)
    *path, last = dotted.split(".")
    target = answer
    for p in path:
        target = target[int(p)] if isinstance(target, list) else target[p]
    key: Any = int(last) if isinstance(target, list) else last
    depth = 0
    if value is KeyError:
        del target[key]
    elif isinstance(value, tuple):
        target[key], depth = DEEP, value[1]
    else:
        target[key] = value
    text = json.dumps(answer)
    if depth:
        text = text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    return text.encode()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TamperingControlPlane]:
    from controlplane import testing

    with testing.running(tmp_path_factory.mktemp("cp-answers")) as cp:
        cp.org("acme", provider=True, node_quota=10_000)
        front = TamperingControlPlane(cp)
        yield front
        front.close()


@PROPS
@given(field=st.sampled_from(ENROLL_FIELDS), value=replacement)
@example(field="manifest_keys", value=5)
@example(field="overlay_ip", value=(DEEP, 100_000))
@pytest.mark.slow
def test_an_enrollment_answer_with_any_field_replaced_is_refused_cleanly_or_enrolls(
    proxy: TamperingControlPlane, tmp_path_factory: pytest.TempPathFactory, field: str, value: Any
) -> None:
    proxy.tamper = lambda path, _req, answer: (
        _replaced(answer, field, value) if path == "/v1/nodes/enroll" else answer
    )
    root = tmp_path_factory.mktemp("node")
    api = ApiClient(proxy.url, ca_file=proxy.cp.ca_file, attempts=1)
    try:
        enroll(TreeHost(root), api, proxy.cp.token("acme"), gpu_mode="none", hardware={})
    except VectorlayError as e:
        assert len(e.message) < 600, e.message
        assert not (root / "etc").exists(), f"written from a refused answer ({e.message})"
    else:
        ident = load_identity(TreeHost(root))
        assert ident is not None and len(json.dumps(ident.enrollment())) < 100_000
    finally:
        api.close()


@PROPS
@given(
    answer=st.one_of(
        json_values, st.dictionaries(st.sampled_from(["valid", "expires_at", "reason"]), json_values)
    )
)
@example(answer={"valid": False, "reason": {"code": "used"}})
def test_any_introspection_answer_is_understood_or_refused_cleanly(
    proxy: TamperingControlPlane, answer: Any
) -> None:
    proxy.tamper = lambda path, _req, real: answer if path.endswith("/introspect") else real
    api = ApiClient(proxy.url, ca_file=proxy.cp.ca_file, attempts=1)
    try:
        info = introspect_token(api, "vtk_" + "a" * 43)
    except VectorlayError as e:
        assert len(e.message) < 600, e.message
    else:
        assert isinstance(info.valid, bool) and (info.reason is None or len(info.reason) <= 64)
    finally:
        api.close()


GOOD_BEAT = {"status": "active", "advertised_units": 8, "next_heartbeat_s": 240, "reason": None}


@settings(max_examples=300, deadline=HANG)
@given(
    answer=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {},
            optional={
                k: st.one_of(json_values, st.integers(-(2**70), 2**70), st.text(min_size=400, max_size=5000))
                for k in GOOD_BEAT
            },
        ).map(lambda d: {**GOOD_BEAT, **d}),
    )
)
def test_any_heartbeat_answer_is_kept_bounded_or_refused_cleanly(answer: Any) -> None:
    try:
        kept = _check_answer(answer)
    except HeartbeatError as e:
        assert len(e.message) < 400, e.message
    else:
        assert set(kept) == set(GOOD_BEAT) and len(json.dumps(kept)) < 1000


KEY = Ed25519PrivateKey.generate()
MANIFEST = manifest_for({("nebula", "1.9.5"): b"n", ("nomad", "1.8.4"): b"m"}, KEY)
MANIFEST_FIELDS = (
    "version",
    "serial",
    "issued_at",
    "expires_at",
    "artifacts",
    "artifacts.0",
    "artifacts.0.name",
    "artifacts.0.version",
    "artifacts.0.url",
    "artifacts.0.sha256",
    "artifacts.0.size",
)


@settings(max_examples=300, deadline=HANG)
@given(
    field=st.sampled_from(MANIFEST_FIELDS),
    value=st.one_of(json_values, st.integers(0, 2**70), st.just(KeyError)),
)
def test_any_signed_manifest_with_a_field_replaced_is_parsed_bounded_or_refused_cleanly(
    field: str, value: Any
) -> None:
    doc = json.loads(_replaced({k: v for k, v in MANIFEST.items() if k != "signature"}, field, value))
    try:
        manifest = verify_manifest(sign_manifest(doc, KEY), [KEY.public_key()])
    except VectorlayError as e:
        assert len(e.message) < 600, e.message
    else:
        assert len(manifest.artifacts) <= 64
        assert all(len(a.url) <= 2048 and 0 <= a.size <= 1 << 40 for a in manifest.artifacts)


TARBALL = make_tarball("agent", "1", {"bin/helper": b"h" * 3000, "share/doc": b"d" * 100})


def _raw_tar(blob: bytes) -> bytearray:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        members = [(m, tar.extractfile(m)) for m in tar.getmembers()]
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as raw:
            for m, f in members:
                raw.addfile(m, f)
    return bytearray(out.getvalue())


RAW = _raw_tar(TARBALL)


@settings(max_examples=200, deadline=HANG, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, len(RAW) - 1), st.integers(0, 255)), min_size=1, max_size=20),
    cut=st.integers(0, len(RAW)),
)
@pytest.mark.slow
def test_a_randomly_damaged_archive_installs_or_is_refused_with_nothing_left(
    tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[int, int]], cut: int
) -> None:
    """Bytes of the headers and data changed at random, the archive cut short: a signed artifact
    (the signature covers whatever the key signed) that is not what it claims."""
    blob = bytearray(RAW)
    for pos, byte in edits:
        blob[pos] = byte
    data = bytes(blob[: max(cut, 512)])
    work = tmp_path_factory.mktemp("art")
    (work / "root").mkdir()
    host, mirror = TreeHost(work / "root"), DirectoryDownloader(work / "mirror")
    mirror.put("agent", "1", data)
    art = verify_manifest(manifest_for({("agent", "1"): data}, KEY), [KEY.public_key()]).get("agent")
    base = host.path("/opt/vectorlay/releases/agent")
    try:
        artifacts.install(host, mirror, art)
    except VectorlayError as e:
        assert len(e.message) < 600, e.message
        assert sorted(p.name for p in base.iterdir()) == []
    else:
        assert sorted(p.name for p in base.iterdir()) == ["1"]
        for path in (base / "1").rglob("*"):
            assert path.resolve().is_relative_to(base / "1")
