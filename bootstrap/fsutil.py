"""Crash-safe file writes: temp file in the same directory, fsync, rename, directory fsync."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

FaultHook = Callable[[str], None]


def _no_fault(what: str) -> None:
    return None


# Every file and link switch, directory sync and changing command passes a fault point named after
# it ("write /etc/...", "run systemctl ...", "enroll switched"). The product's hook does nothing; the
# crash-consistency harness (hostsim.inject) installs one that kills the process at the N-th point,
# or fails that write as on a full disk, to prove that a run killed anywhere resumes cleanly.
_fault_hook: FaultHook = _no_fault


def set_fault_hook(hook: FaultHook | None) -> FaultHook:
    """Install `hook` (None: the no-op) as the one fault hook; returns the hook it replaces."""
    global _fault_hook
    previous, _fault_hook = _fault_hook, hook or _no_fault
    return previous


def fault_point(what: str) -> None:
    _fault_hook(what)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(directory: Path, name: str) -> None:
    """Temp files of `name` left by a writer that died (its pid is in the name) are removed, so an
    interrupted run leaves nothing behind once the file is written again."""
    prefix = f".{name}."
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return
    for entry in entries:
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        pid = entry[len(prefix) :].split(".", 1)[0]
        if pid.isascii() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / entry)


def fsync_dir(path: Path, *, fault: bool = True) -> None:
    # A directory made durable marks a step of a multi-file write (an unpacked release, an identity
    # generation): a kill point. atomic_write's own calls pass fault=False (their point is the rename).
    if fault:
        fault_point(f"sync {path}")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(directory: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """tempfile.mkstemp's contract (a new name, O_EXCL, no symlink followed, mode 0600) without
    importing tempfile (shutil, random, hashlib): `vectorlay-node-doctor --prometheus`, run by a timer
    and timed against virt-host-validate, writes just this one file."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        name = os.path.join(directory, f"{prefix}{os.urandom(6).hex()}{suffix}")
        try:
            return os.open(name, flags, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no usable temporary file name", os.fspath(directory))


def atomic_write(
    path: Path,
    data: bytes | str,
    *,
    mode: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
    durable: bool = True,
    fault: bool = True,
) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file, never a mix.

    Without an explicit mode/owner the existing file's are kept (a new file gets 0644 and the
    caller's owner). The temp file is created 0600 so secrets are never briefly world-readable.
    `durable=False` skips syncing the directory: still old-or-new after a crash, but a crash right
    after the rename may bring the old file back (for files rewritten on every run anyway).
    `fault=False` passes no kill point: for runtime state that is no step of an install run
    (the node-agent's status.json), which the crash harness must not count among a run's points.
    """
    if isinstance(data, str):
        data = data.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.stat()
        keep_mode, keep_uid, keep_gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
    except FileNotFoundError:
        keep_mode, keep_uid, keep_gid = 0o644, -1, -1
    final_mode = keep_mode if mode is None else mode
    final_uid = keep_uid if uid is None else uid
    final_gid = keep_gid if gid is None else gid

    _remove_stale_temps(path.parent, path.name)
    fd, tmp = _create_temp(path.parent, f".{path.name}.{os.getpid()}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if final_uid != -1 or final_gid != -1:
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), final_uid, final_gid)
            os.fchmod(f.fileno(), final_mode)
            os.fsync(f.fileno())
        if fault:
            fault_point(f"write {path}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent, fault=False)


def atomic_symlink(target: str, link: Path) -> None:
    """Point `link` at `target` by renaming a fresh link over it: readers never see it missing."""
    link.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(link.parent, link.name)
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    try:
        fault_point(f"link {link}")
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(link.parent, fault=False)


class NotRegularFile(OSError):
    """A path where a file is expected holds a directory, a FIFO, a socket or a device."""


# Larger than any file the tools read (a 256-core /proc/cpuinfo is ~400 KB).
READ_LIMIT = 8 << 20


def read_regular(path: str | os.PathLike[str], limit: int = READ_LIMIT) -> bytes:
    """At most `limit` bytes of a regular file. Opened non-blocking and checked before reading, so a
    FIFO planted where a sysfs attribute or a config file belongs never hangs the reader."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", os.fspath(path))
        chunks: list[bytes] = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
