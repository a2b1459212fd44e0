from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bootstrap.errors import VectorlayError
from bootstrap.manifest import canonical_bytes, public_key_from_text, verify_manifest

from .artifact_helpers import make_tarball, manifest_for


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _doc(key: Ed25519PrivateKey) -> dict[str, object]:
    return manifest_for({("nebula", "1.9.5"): make_tarball("nebula", "1.9.5"), ("nomad", "1.8.4"): b"x"}, key)


def test_a_signed_manifest_verifies_and_parses(key: Ed25519PrivateKey) -> None:
    m = verify_manifest(_doc(key), [key.public_key()])
    assert [(a.name, a.version, a.size) for a in m.artifacts][1] == ("nomad", "1.8.4", 1)
    assert m.get("nebula").url == "/v1/artifacts/nebula/1.9.5"


def test_any_changed_byte_of_a_signed_manifest_is_refused(key: Ed25519PrivateKey) -> None:
    doc = _doc(key)
    doc["artifacts"][0]["sha256"] = "0" * 64  # type: ignore[index]
    with pytest.raises(VectorlayError, match="valid signature"):
        verify_manifest(doc, [key.public_key()])


def test_a_manifest_signed_by_another_key_is_refused(key: Ed25519PrivateKey) -> None:
    with pytest.raises(VectorlayError, match="502 ARTIFACT"):
        verify_manifest(_doc(Ed25519PrivateKey.generate()), [key.public_key()])


def test_a_rotated_key_is_accepted_while_both_are_pinned(key: Ed25519PrivateKey) -> None:
    new = Ed25519PrivateKey.generate()
    assert verify_manifest(_doc(new), [key.public_key(), new.public_key()]).version == "1"


@pytest.mark.parametrize("doc", [None, [], {"signature": "!!!"}, {"version": "1"}])
def test_garbage_instead_of_a_manifest_gets_a_clear_error(key: Ed25519PrivateKey, doc: object) -> None:
    with pytest.raises(VectorlayError):
        verify_manifest(doc, [key.public_key()])


def test_signed_but_malformed_entries_are_refused(key: Ed25519PrivateKey) -> None:
    from bootstrap.manifest import sign_manifest

    doc = sign_manifest(
        {
            "version": "1",
            "serial": 1,
            "issued_at": "2026-01-01T00:00:00Z",
            "expires_at": "2099-01-01T00:00:00Z",
            "artifacts": [{"name": "../etc", "version": "1", "url": "/x", "sha256": "0" * 64, "size": 1}],
        },
        key,
    )
    with pytest.raises(VectorlayError, match="bad artifact name"):
        verify_manifest(doc, [key.public_key()])


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "nebula\n"}, "bad artifact name 'nebula\\n'"),
        ({"version": "1.9.5\n"}, "bad version '1.9.5\\n' for nebula"),
        ({"sha256": "0" * 64 + "\n"}, "bad sha256 for nebula"),
        ({"name": "n" * 100_000}, "bad artifact name 'nnnnnnnn"),
    ],
    ids=["name-newline", "version-newline", "sha256-newline", "name-huge"],
)
def test_signed_entries_ending_in_a_newline_or_oversized_are_refused_and_never_echoed_whole(
    key: Ed25519PrivateKey, entry: dict[str, str], message: str
) -> None:
    from bootstrap.manifest import sign_manifest

    item = {
        "name": "nebula",
        "version": "1.9.5",
        "url": "/v1/artifacts/nebula/1.9.5",
        "sha256": "0" * 64,
        "size": 1,
    }
    doc = sign_manifest(
        {
            "version": "1",
            "serial": 1,
            "issued_at": "2026-01-01T00:00:00Z",
            "expires_at": "2099-01-01T00:00:00Z",
            "artifacts": [{**item, **entry}],
        },
        key,
    )
    with pytest.raises(VectorlayError) as refused:
        verify_manifest(doc, [key.public_key()])
    assert message in str(refused.value) and len(str(refused.value)) < 500


def test_jq_and_openssl_verify_the_same_bytes_install_sh_checks(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    doc = _doc(key)
    doc["note"] = 'ünïcode / slashes \\ and "quotes"'
    from bootstrap.manifest import sign_manifest

    doc = sign_manifest({k: v for k, v in doc.items() if k != "signature"}, key)
    (tmp_path / "m.json").write_text(json.dumps(doc, indent=2))
    jq = subprocess.run(
        ["jq", "-cSj", "del(.signature)", str(tmp_path / "m.json")], capture_output=True, check=True
    )
    assert jq.stdout == canonical_bytes(doc)

    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "key.pem").write_bytes(pem)
    (tmp_path / "msg").write_bytes(jq.stdout)
    (tmp_path / "sig").write_bytes(base64.b64decode(str(doc["signature"])))
    ok = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            str(tmp_path / "key.pem"),
            "-rawin",
            "-in",
            str(tmp_path / "msg"),
            "-sigfile",
            str(tmp_path / "sig"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert public_key_from_text(pem.decode()).public_bytes_raw() == key.public_key().public_bytes_raw()
