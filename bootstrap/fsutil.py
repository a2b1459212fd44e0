"""Crash-safe file writes: temp file in the same directory, fsync, rename, directory fsync."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path,
    data: bytes | str,
    *,
    mode: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file, never a mix.

    Without an explicit mode/owner the existing file's are kept (a new file gets 0644 and the
    caller's owner). The temp file is created 0600 so secrets are never briefly world-readable.
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

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if final_uid != -1 or final_gid != -1:
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), final_uid, final_gid)
            os.fchmod(f.fileno(), final_mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_symlink(target: str, link: Path) -> None:
    """Point `link` at `target` by renaming a fresh link over it: readers never see it missing."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(link.parent)
