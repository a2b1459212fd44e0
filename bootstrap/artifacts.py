"""Artifacts from the signed manifest: streamed to disk while hashed, unpacked into versioned
directories, and switched into use by renaming a `current` link.

Layout under /opt/vectorlay/releases/<name>/:
    <version>/            unpacked tarball; complete once it exists (renamed from a staging dir)
    <version>/.sha256     the artifact's sha256, so a present, verified version is not fetched again
    current -> <version>  what the units run; switched by renaming a fresh link over it
    previous -> <version> the last version that ran before current: the rollback target
Only the versions behind `current` and `previous` are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

from bootstrap.answers import shown
from bootstrap.errors import VectorlayError
from bootstrap.fsutil import atomic_symlink, fsync_dir
from bootstrap.host import Host
from bootstrap.manifest import STALE_HINT, Artifact

RELEASES = "/opt/vectorlay/releases"
MARKER = ".sha256"


class Downloader(Protocol):
    def stream(self, url: str, *, size: int | None = None) -> AbstractContextManager[Iterable[bytes]]:
        """Open `url` (absolute, or relative to the control plane) and yield its body in chunks
        (at most `size` bytes when given)."""
        ...


@dataclass(frozen=True)
class InstallResult:
    name: str
    version: str
    downloaded: bool


def release_root(host: Host, name: str) -> Path:
    return host.path(f"{RELEASES}/{name}")


def _link_target(link: Path) -> str | None:
    try:
        return os.readlink(link)
    except OSError:
        return None


def current_version(host: Host, name: str) -> str | None:
    return _link_target(release_root(host, name) / "current")


def previous_version(host: Host, name: str) -> str | None:
    return _link_target(release_root(host, name) / "previous")


def is_installed(host: Host, art: Artifact) -> bool:
    marker = release_root(host, art.name) / art.version / MARKER
    try:
        return marker.read_text().strip() == art.sha256
    except OSError:
        return False


def _mismatch(art: Artifact, what: str) -> VectorlayError:
    return VectorlayError(f"checksum mismatch / 502 ARTIFACT: {art.name} {art.version}: {what}", STALE_HINT)


def _download(downloader: Downloader, art: Artifact, part: Path) -> None:
    digest = hashlib.sha256()
    size = 0
    with open(part, "wb") as f, downloader.stream(art.url, size=art.size) as chunks:
        for chunk in chunks:
            size += len(chunk)
            if size > art.size:
                raise _mismatch(art, f"more than the {art.size} bytes the manifest announces")
            digest.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    if size != art.size:
        raise _mismatch(art, f"got {size} bytes, the manifest announces {art.size}")
    if digest.hexdigest() != art.sha256:
        raise _mismatch(art, f"sha256 {digest.hexdigest()} does not match the signed manifest's {art.sha256}")


@dataclass(frozen=True)
class UnpackLimits:
    """What one release may unpack to. A signed artifact can still be a decompression bomb (the
    control plane's key signs whatever it is given): the headers are checked as the archive is read,
    so a member declaring too much stops the unpack before its data is inflated."""

    max_bytes: int = 4 << 30  # the largest agent (nomad) unpacks to ~150 MB
    max_members: int = 20_000


# What an agent's release needs of a tar archive's headers, and no more: tarfile reads a GNU long
# name or a pax header whole into memory before anything sees the member, so a 254 KB archive could
# declare a name of 256 MB and take gigabytes to decode it.
MAX_EXTENDED_HEADER = 64 * 1024
MAX_NAME = 1024  # a path in the archive
MAX_COMPONENT = 255  # one name in that path, as Linux file systems allow
MAX_CHAINED_HEADERS = 8  # extended headers in a row before a member (tarfile reads them recursively)
_EXTENDED = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class _RefusedHeader(tarfile.HeaderError):
    pass


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's TarInfo (the `tarinfo` class tarfile.open takes), refusing before it reads them an
    extended header (GNU long name or link, pax) over MAX_EXTENDED_HEADER, more than
    MAX_CHAINED_HEADERS of them in a row, and GNU sparse members, whose chained sparse maps tarfile
    also reads whole."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _RefusedHeader("a GNU sparse member, which no release needs")
        if self.type not in _EXTENDED:
            return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]
        if self.size > MAX_EXTENDED_HEADER:
            raise _RefusedHeader(f"an extended header of {self.size} bytes (at most {MAX_EXTENDED_HEADER})")
        depth = getattr(tarfile_, "_vectorlay_chain", 0)
        if depth >= MAX_CHAINED_HEADERS:
            raise _RefusedHeader(f"more than {MAX_CHAINED_HEADERS} extended headers in a row")
        setattr(tarfile_, "_vectorlay_chain", depth + 1)  # noqa: B010
        try:
            return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]
        finally:
            setattr(tarfile_, "_vectorlay_chain", depth)  # noqa: B010


def _bad_name(name: str) -> str | None:
    """Why `name` (a member's path or link target) is not one a release holds, or None."""
    if len(name) > MAX_NAME:
        return f"a name of {len(name)} characters (at most {MAX_NAME})"
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        return "a name with a control character"
    if any(len(part) > MAX_COMPONENT for part in name.split("/")):
        return f"a path component over {MAX_COMPONENT} characters"
    return None


def _safe_members(tar: tarfile.TarFile, art: Artifact, limits: UnpackLimits) -> Iterator[tarfile.TarInfo]:
    total = 0
    files: set[str] = set()  # regular files so far: what a hard link may point at
    # Iterating the archive reads it header by header; getmembers() would inflate all of it first.
    for count, m in enumerate(tar, 1):
        total += max(m.size, 0)
        if count > limits.max_members:
            raise _mismatch(art, f"the archive holds more than {limits.max_members} members")
        why = _bad_name(m.name) or ((m.issym() or m.islnk()) and _bad_name(m.linkname)) or None
        if why:
            raise _mismatch(art, f"member {shown(m.name)} has {why}")
        if total > limits.max_bytes:
            raise _mismatch(
                art, f"the archive unpacks to more than {limits.max_bytes} bytes (at {shown(m.name)})"
            )
        p = PurePosixPath(m.name)
        if p.is_absolute() or ".." in p.parts:
            raise _mismatch(art, f"unsafe path {shown(m.name)} in the archive")
        if m.issym() or m.islnk():
            target = PurePosixPath(m.linkname)
            if target.is_absolute() or ".." in (p.parent / target).parts:
                raise _mismatch(art, f"link {shown(m.name)} points outside the release")
            # tarfile looks a hard link's target up among the members before it (a KeyError when
            # it is not there): a link to a file the archive does not hold is a broken archive.
            if m.islnk() and posixpath.normpath(m.linkname) not in files:
                raise _mismatch(
                    art,
                    f"hard link {shown(m.name)} points at {shown(m.linkname)}, "
                    "not at a file before it in the archive",
                )
        elif not (m.isfile() or m.isdir()):
            raise _mismatch(art, f"special file {shown(m.name)} in the archive")
        if m.isfile():
            files.add(posixpath.normpath(m.name))
        m.mode &= 0o755  # no setuid/setgid/world-writable bits from an archive
        m.uid = m.gid = 0
        m.uname = m.gname = "root"
        yield m


def _read_mode(part: Path) -> Literal["r:", "r:gz", "r:bz2", "r:xz"]:
    """tarfile's mode for the archive's compression, from its magic bytes: "r:*" tries every method
    in turn and reports the failure of each, burying the one that matters."""
    with open(part, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return "r:gz"
    if magic.startswith(b"BZh"):
        return "r:bz2"
    return "r:xz" if magic.startswith(b"\xfd7zXZ\x00") else "r:"


def _unpack(part: Path, staging: Path, art: Artifact, limits: UnpackLimits) -> None:
    staging.mkdir(mode=0o755)
    try:
        with tarfile.open(part, _read_mode(part), tarinfo=_BoundedTarInfo) as tar:
            members = list(_safe_members(tar, art, limits))
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, members=members, filter="data")
            else:  # Python < 3.11.4 / 3.10.12: the members were vetted above
                tar.extractall(staging, members=members)
    except tarfile.TarError as e:
        raise _mismatch(art, f"not a readable tar archive ({e})") from None
    marker = staging / MARKER
    marker.write_text(art.sha256 + "\n")
    for dirpath, _dirs, files in os.walk(staging):
        for fname in files:
            fp = os.path.join(dirpath, fname)
            if not os.path.islink(fp):
                with open(fp, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def install(
    host: Host, downloader: Downloader, art: Artifact, limits: UnpackLimits | None = None
) -> InstallResult:
    """Make <name>/<version> present and verified; does not switch `current`."""
    if is_installed(host, art):
        return InstallResult(art.name, art.version, downloaded=False)
    base = release_root(host, art.name)
    base.mkdir(parents=True, exist_ok=True)
    part = base / f".download-{art.version}.part"
    staging = base / f".staging-{art.version}"
    # Leftovers of a run killed half-way are never trusted: they are removed and fetched anew.
    with contextlib.suppress(FileNotFoundError):
        part.unlink()
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _download(downloader, art, part)
        _unpack(part, staging, art, limits or UnpackLimits())
        # Gone before the switch: a kill right after it would leave the download behind for good,
        # since the next run finds the version installed and never comes back here.
        part.unlink()
        final = base / art.version
        if final.exists():
            # Present without a matching marker: damaged or of another build. Swap it out whole.
            trash = base / f".trash-{art.version}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
            os.rename(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, final)
        fsync_dir(base)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        shutil.rmtree(staging, ignore_errors=True)
    return InstallResult(art.name, art.version, downloaded=True)


def activate(host: Host, name: str, version: str) -> str | None:
    """Point `current` at `version`; the version it replaces becomes `previous`. Returns that one."""
    base = release_root(host, name)
    if not (base / version / MARKER).exists():
        raise VectorlayError(f"{name} {version} is not installed; cannot switch to it")
    old = current_version(host, name)
    if old == version:
        return None
    if old is not None:
        atomic_symlink(old, base / "previous")
    atomic_symlink(version, base / "current")
    return old


def rollback(host: Host, name: str) -> str:
    """Switch `current` back to `previous` (the last version that worked)."""
    base = release_root(host, name)
    prev = previous_version(host, name)
    if prev is None or not (base / prev / MARKER).exists():
        raise VectorlayError(f"{name}: no previous version to roll back to")
    bad = current_version(host, name)
    atomic_symlink(prev, base / "current")
    if bad is not None:
        with contextlib.suppress(FileNotFoundError):
            (base / "previous").unlink()
    return prev


def prune(host: Host, name: str) -> list[str]:
    """Remove every version but `current` and `previous`; returns what was removed."""
    base = release_root(host, name)
    keep = {current_version(host, name), previous_version(host, name)}
    removed = []
    try:
        entries = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    for entry in entries:
        path = base / entry
        if entry in ("current", "previous") or entry in keep or path.is_symlink() or not path.is_dir():
            continue
        if entry.startswith("."):
            shutil.rmtree(path, ignore_errors=True)  # staging/trash of an interrupted run
            continue
        shutil.rmtree(path)
        removed.append(entry)
    return removed
