from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bootstrap import artifacts
from bootstrap.errors import VectorlayError
from bootstrap.host import Host, TreeHost
from bootstrap.manifest import Artifact, verify_manifest

from .artifact_helpers import DirectoryDownloader, make_tarball, manifest_for


@pytest.fixture
def mirror(tmp_path: Path) -> DirectoryDownloader:
    return DirectoryDownloader(tmp_path / "mirror")


@pytest.fixture
def host(tmp_path: Path) -> Host:
    (tmp_path / "root").mkdir()
    return TreeHost(tmp_path / "root")


def _publish(mirror: DirectoryDownloader, name: str, version: str, data: bytes | None = None) -> Artifact:
    key = Ed25519PrivateKey.generate()
    blob = data if data is not None else make_tarball(name, version)
    mirror.put(name, version, blob)
    return verify_manifest(manifest_for({(name, version): blob}, key), [key.public_key()]).get(name)


def test_install_unpacks_into_a_versioned_directory_and_activate_switches_current(
    host: Host, mirror: DirectoryDownloader
) -> None:
    art = _publish(mirror, "node-agent", "2.0.0")
    assert artifacts.install(host, mirror, art).downloaded
    binary = host.path("/opt/vectorlay/releases/node-agent/2.0.0/bin/node-agent")
    assert binary.read_text().startswith("#!/usr/bin/env python3") and os.access(binary, os.X_OK)
    assert artifacts.activate(host, "node-agent", "2.0.0") is None
    assert artifacts.current_version(host, "node-agent") == "2.0.0"
    assert host.path("/opt/vectorlay/releases/node-agent/current/bin/node-agent").exists()


def test_an_artifact_present_with_the_right_hash_is_not_downloaded_again(
    host: Host, mirror: DirectoryDownloader
) -> None:
    art = _publish(mirror, "nebula", "1.9.5")
    artifacts.install(host, mirror, art)
    again = artifacts.install(host, mirror, art)
    assert not again.downloaded and mirror.fetched == ["/v1/artifacts/nebula/1.9.5"]


def test_a_tampered_artifact_is_refused_and_the_current_version_untouched(
    host: Host, mirror: DirectoryDownloader
) -> None:
    good = _publish(mirror, "nomad", "1.8.4")
    artifacts.install(host, mirror, good)
    artifacts.activate(host, "nomad", "1.8.4")
    before = sorted(p.name for p in host.path("/opt/vectorlay/releases/nomad").iterdir())

    new = _publish(mirror, "nomad", "1.9.0")
    tampered = make_tarball("nomad", "1.9.0", {"bin/backdoor": b"evil"})
    tampered = tampered[: new.size] + b"\0" * max(0, new.size - len(tampered))
    mirror.put("nomad", "1.9.0", tampered)
    with pytest.raises(VectorlayError) as e:
        artifacts.install(host, mirror, new)
    assert e.value.message.startswith("checksum mismatch / 502 ARTIFACT: nomad 1.9.0")
    assert e.value.hint == "a stale artifact — re-run; artifacts are re-fetched and verified each run"
    assert sorted(p.name for p in host.path("/opt/vectorlay/releases/nomad").iterdir()) == before
    assert artifacts.current_version(host, "nomad") == "1.8.4"


def test_a_truncated_or_oversized_download_is_refused(host: Host, mirror: DirectoryDownloader) -> None:
    art = _publish(mirror, "nebula", "1.9.5")
    mirror.put("nebula", "1.9.5", make_tarball("nebula", "1.9.5")[:-10])
    with pytest.raises(VectorlayError, match="bytes, the manifest announces"):
        artifacts.install(host, mirror, art)
    mirror.put("nebula", "1.9.5", make_tarball("nebula", "1.9.5") + b"trailing")
    with pytest.raises(VectorlayError, match="more than the"):
        artifacts.install(host, mirror, art)
    assert not artifacts.is_installed(host, art)


@pytest.mark.parametrize(
    ("member", "kind"),
    [("../../etc/cron.d/x", tarfile.REGTYPE), ("/etc/passwd", tarfile.REGTYPE), ("bin/tty", tarfile.CHRTYPE)],
)
def test_archives_that_escape_the_release_directory_are_refused(
    host: Host, mirror: DirectoryDownloader, member: str, kind: bytes
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.type = kind
        tar.addfile(info, io.BytesIO(b""))
    art = _publish(mirror, "evil", "1", buf.getvalue())
    with pytest.raises(VectorlayError, match="502 ARTIFACT"):
        artifacts.install(host, mirror, art)
    assert not host.path("/etc").exists()
    assert not host.path("/opt/vectorlay/releases/evil/1").exists()


def test_leftovers_of_a_killed_run_are_discarded_and_fetched_anew(
    host: Host, mirror: DirectoryDownloader
) -> None:
    art = _publish(mirror, "nebula", "1.9.5")
    base = host.path("/opt/vectorlay/releases/nebula")
    (base / ".staging-1.9.5/bin").mkdir(parents=True)
    (base / ".staging-1.9.5/bin/nebula").write_text("half")
    (base / ".download-1.9.5.part").write_bytes(b"half")
    (base / "1.9.5").mkdir()  # a directory without its marker is not trusted either
    assert artifacts.install(host, mirror, art).downloaded
    assert sorted(p.name for p in base.iterdir()) == ["1.9.5"]
    assert artifacts.is_installed(host, art)


def test_upgrades_keep_the_current_and_the_previous_version_and_roll_back(
    host: Host, mirror: DirectoryDownloader
) -> None:
    for v in ("1", "2", "3"):
        artifacts.install(host, mirror, _publish(mirror, "node-agent", v))
        artifacts.activate(host, "node-agent", v)
    assert artifacts.prune(host, "node-agent") == ["1"]
    assert (
        artifacts.current_version(host, "node-agent"),
        artifacts.previous_version(host, "node-agent"),
    ) == (
        "3",
        "2",
    )
    assert artifacts.rollback(host, "node-agent") == "2"
    assert artifacts.current_version(host, "node-agent") == "2"
    assert artifacts.previous_version(host, "node-agent") is None
    with pytest.raises(VectorlayError, match="no previous version"):
        artifacts.rollback(host, "node-agent")


@pytest.mark.slow
def test_current_is_never_missing_while_it_is_switched(host: Host, mirror: DirectoryDownloader) -> None:
    for v in ("1", "2"):
        artifacts.install(host, mirror, _publish(mirror, "nomad", v))
    artifacts.activate(host, "nomad", "1")
    link = host.path("/opt/vectorlay/releases/nomad/current", follow=False)
    seen: set[str] = set()
    missing = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal missing
        while not stop.is_set():
            try:
                seen.add(os.readlink(link))
                (link / "bin/nomad").stat()
            except FileNotFoundError:
                missing += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(2000):
            artifacts.activate(host, "nomad", "2" if i % 2 == 0 else "1")
    finally:
        stop.set()
        t.join()
    assert missing == 0
    assert seen == {"1", "2"}
