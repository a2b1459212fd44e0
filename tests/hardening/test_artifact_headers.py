"""A signed artifact whose tar headers are the bomb (bootstrap.artifacts): names and extended headers
are bounded before tarfile reads them, links must point at what the archive holds, and no message
echoes more than a few dozen characters of what the archive says. Each is refused as a stale
artifact, nothing is left under the release directory, and memory stays bounded."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
import zlib
from collections.abc import Iterable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bootstrap import artifacts
from bootstrap.errors import VectorlayError
from bootstrap.host import Host, TreeHost
from bootstrap.manifest import Artifact, verify_manifest
from tests.agents.artifact_helpers import DirectoryDownloader, manifest_for


def _gzip(parts: Iterable[bytes]) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    return b"".join(z.compress(p) for p in parts) + z.flush()


def _header(name: str, kind: bytes, size: int, linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, linkname
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _padded(size: int) -> int:
    return -size % tarfile.BLOCKSIZE


def _extended(kind: bytes, size: int, fill: bytes = b"a") -> Iterable[bytes]:
    """An extended header (GNU long name, pax) declaring `size` bytes, and those bytes, streamed."""
    yield _header("././@LongLink", kind, size)
    left = size
    while left:
        n = min(left, 1 << 20)
        yield fill * n
        left -= n
    yield bytes(_padded(size))


def _member(name: str) -> bytes:
    return _header(name, tarfile.REGTYPE, 0)


END = bytes(2 * tarfile.BLOCKSIZE)


def _tarball(members: Iterable[tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(bytes(m.size)) if m.isfile() else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, size
    return info


@pytest.fixture
def host(tmp_path: Path) -> Host:
    (tmp_path / "root").mkdir()
    return TreeHost(tmp_path / "root")


@pytest.fixture
def mirror(tmp_path: Path) -> DirectoryDownloader:
    return DirectoryDownloader(tmp_path / "mirror")


def _signed(mirror: DirectoryDownloader, blob: bytes) -> Artifact:
    key = Ed25519PrivateKey.generate()
    mirror.put("agent", "1", blob)
    return verify_manifest(manifest_for({("agent", "1"): blob}, key), [key.public_key()]).get("agent")


def _refused(host: Host, mirror: DirectoryDownloader, blob: bytes, message: str) -> None:
    art = _signed(mirror, blob)
    with pytest.raises(VectorlayError) as refused:
        artifacts.install(host, mirror, art)
    text = refused.value.message
    assert text.startswith("checksum mismatch / 502 ARTIFACT: agent 1: ") and message in text, text
    assert len(text) < 300, text  # never the archive's own unbounded words
    base = host.path("/opt/vectorlay/releases/agent")
    assert [p.name for p in base.iterdir()] == []  # no version, no staging directory, no download


def test_a_254_kb_archive_with_a_256_mb_member_name_is_refused_before_the_name_is_read(
    host: Host, mirror: DirectoryDownloader
) -> None:
    size = 256 << 20
    blob = _gzip([*_extended(tarfile.GNUTYPE_LONGNAME, size), _member("bin/x"), END])
    assert len(blob) < 300_000
    tracemalloc.start()
    try:
        _refused(host, mirror, blob, f"an extended header of {size} bytes (at most 65536)")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes allocated to refuse it"


def test_a_pax_header_of_a_megabyte_is_refused(host: Host, mirror: DirectoryDownloader) -> None:
    record = b"path=" + b"p" * (1 << 20)
    record = str(len(record) + 9).encode() + b" " + record + b"\n"
    parts = [_header("././@PaxHeader", tarfile.XHDTYPE, len(record)), record, bytes(_padded(len(record)))]
    _refused(
        host, mirror, _gzip([*parts, _member("bin/x"), END]), f"an extended header of {len(record)} bytes"
    )


def test_a_hard_link_to_a_member_the_archive_does_not_hold_is_refused_not_a_key_error(
    host: Host, mirror: DirectoryDownloader
) -> None:
    blob = _tarball([_info("bin/x", tarfile.LNKTYPE, "bin/missing")])
    _refused(
        host,
        mirror,
        blob,
        "hard link 'bin/x' points at 'bin/missing', not at a file before it in the archive",
    )


def test_a_hard_link_to_a_member_that_comes_later_is_refused(host: Host, mirror: DirectoryDownloader) -> None:
    blob = _tarball([_info("bin/x", tarfile.LNKTYPE, "bin/y"), _info("bin/y", size=3)])
    _refused(host, mirror, blob, "hard link 'bin/x' points at 'bin/y'")


def test_a_hard_link_to_a_file_before_it_unpacks(host: Host, mirror: DirectoryDownloader) -> None:
    blob = _tarball([_info("bin/y", size=3), _info("./bin/x", tarfile.LNKTYPE, "./bin/y")])
    artifacts.install(host, mirror, _signed(mirror, blob))
    got = host.path("/opt/vectorlay/releases/agent/1/bin")
    assert (got / "x").read_bytes() == (got / "y").read_bytes() == bytes(3)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "bin/" + "n" * 5000,
            "member 'bin/nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn'... has a name of 5004",
        ),
        ("bin/" + "c" * 300 + "/x", "has a path component over 255 characters"),
        ("bin/\x1b[2Jcleared", "member 'bin/\\x1b[2Jcleared' has a name with a control character"),
        ("bin/two\nlines", "has a name with a control character"),
    ],
    ids=["5000-chars", "component-300", "escape-sequence", "newline"],
)
def test_member_names_are_bounded_and_never_echoed_whole(
    host: Host, mirror: DirectoryDownloader, name: str, message: str
) -> None:
    _refused(host, mirror, _tarball([_info(name)]), message)


def test_a_symlink_target_is_bounded_like_a_name(host: Host, mirror: DirectoryDownloader) -> None:
    blob = _tarball([_info("bin/x", tarfile.SYMTYPE, "t" * 3000)])
    _refused(host, mirror, blob, "member 'bin/x' has a name of 3000 characters")


def test_thousands_of_chained_extended_headers_are_refused_without_recursion_error(
    host: Host, mirror: DirectoryDownloader
) -> None:
    # tarfile reads each long-name header by recursing into the next one.
    chain = [part for _ in range(5000) for part in _extended(tarfile.GNUTYPE_LONGNAME, 10, b"b")]
    _refused(host, mirror, _gzip([*chain, _member("bin/x"), END]), "more than 8 extended headers in a row")


def test_a_gnu_sparse_member_is_refused(host: Host, mirror: DirectoryDownloader) -> None:
    _refused(host, mirror, _gzip([_header("bin/s", tarfile.GNUTYPE_SPARSE, 0), END]), "a GNU sparse member")
