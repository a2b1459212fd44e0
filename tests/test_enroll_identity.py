"""The identity directory on its own: layout, modes, damage detection, sweeping interrupted writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from bootstrap.host import TreeHost
from bootstrap.identity import (
    IdentityError,
    NewIdentity,
    OverlayFiles,
    load_identity,
    write_identity,
)
from bootstrap.paths import IDENTITY_DIR


def _pem(banner: str, body: str) -> bytes:
    return f"-----BEGIN {banner}-----\n{body}\n-----END {banner}-----\n".encode()


def _new(node_id: str = "node_1", token: str = "vnt_" + "t" * 43) -> NewIdentity:
    node = {"node_id": node_id, "org_id": "org_1", "overlay_ip": "100.64.0.2", "api": "https://cp"}
    return NewIdentity(
        key_pem=_pem("PRIVATE KEY", "k"),
        cert_pem=_pem("CERTIFICATE", "c"),
        ca_pem=_pem("CERTIFICATE", "ca"),
        node_token=token,
        node=node,
        enrollment={**node, "nebula": {"lighthouses": []}, "nomad": {"servers": []}},
        overlay=OverlayFiles(
            nebula_key_pem=_pem("NEBULA X25519 PRIVATE KEY", "k"),
            nebula_cert_pem=_pem("NEBULA CERTIFICATE", "c"),
            nebula_ca_pem=_pem("NEBULA CERTIFICATE", "ca"),
            nomad_key_pem=_pem("PRIVATE KEY", "n"),
            nomad_cert_pem=_pem("CERTIFICATE", "n"),
            nomad_ca_pem=_pem("CERTIFICATE", "ca"),
        ),
    )


def test_an_unenrolled_node_has_no_identity(tmp_path: Path) -> None:
    assert load_identity(TreeHost(tmp_path)) is None


def test_writing_twice_switches_the_link_and_keeps_a_single_generation(tmp_path: Path) -> None:
    host = TreeHost(tmp_path)
    first = write_identity(host, _new("node_1"))
    second = write_identity(host, _new("node_2", "vnt_" + "u" * 43))
    assert (first.node_id, second.node_id) == ("node_1", "node_2")
    base = tmp_path / "etc/vectorlay"
    gens = [p.name for p in base.iterdir() if p.name != "identity"]
    assert gens == [os.readlink(base / "identity")]
    assert second.node_token() == "vnt_" + "u" * 43
    assert json.loads((second.path / "node.json").read_text())["node_id"] == "node_2"
    assert stat.S_IMODE((base / gens[0]).stat().st_mode) == 0o700


def test_a_plain_identity_directory_is_taken_over_by_the_first_switch(tmp_path: Path) -> None:
    host = TreeHost(tmp_path)
    plain = tmp_path / IDENTITY_DIR.lstrip("/")
    plain.mkdir(parents=True, mode=0o700)
    (plain / "stray").write_text("x")
    write_identity(host, _new())
    assert plain.is_symlink()
    assert not (tmp_path / "etc/vectorlay/.identity-legacy").exists()
    ident = load_identity(host)
    assert ident is not None and not (ident.path / "stray").exists()


def test_a_node_token_in_the_non_secret_files_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    bad = _new()
    leaky = NewIdentity(**{**bad.__dict__, "enrollment": {"oops": bad.node_token}})
    with pytest.raises(ValueError, match="must not contain the node token"):
        write_identity(TreeHost(tmp_path), leaky)
    assert load_identity(TreeHost(tmp_path)) is None


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "node.key").unlink(), "incomplete: node.key missing"),
        (lambda d: (d / "node-token").chmod(0o644), "node-token is readable by others"),
        (lambda d: (d / "nebula.key").chmod(0o640), "nebula.key is readable by others"),
        (lambda d: (d / "nomad.key").chmod(0o604), "nomad.key is readable by others"),
        (lambda d: (d / "nebula.crt").unlink(), "incomplete: nebula.crt missing"),
        (lambda d: d.chmod(0o755), "is open to others"),
        (lambda d: (d / "node.json").write_text("{"), "node.json is unreadable"),
    ],
)
def test_a_damaged_identity_is_reported_with_a_fix(tmp_path: Path, damage: object, message: str) -> None:
    host = TreeHost(tmp_path)
    ident = write_identity(host, _new())
    damage(ident.path.resolve())  # type: ignore[operator]
    with pytest.raises(IdentityError, match=message) as e:
        load_identity(host)
    assert e.value.hint


def test_debris_of_an_interrupted_write_is_swept_by_the_next_one(tmp_path: Path) -> None:
    host = TreeHost(tmp_path)
    write_identity(host, _new())
    base = tmp_path / "etc/vectorlay"
    (base / ".identity-20260101T000000-deadbeef").mkdir(mode=0o700)
    (base / ".identity-20260101T000000-deadbeef" / "node.key").write_text("half")
    os.symlink(".identity-x", base / ".identity.4242.tmp")
    write_identity(host, _new("node_2"))
    assert sorted(p.name for p in base.iterdir()) == sorted(["identity", os.readlink(base / "identity")])
