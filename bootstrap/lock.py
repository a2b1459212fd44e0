"""One installer run at a time (install, update, uninstall): an flock whose holder a second run names."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from datetime import datetime

from bootstrap.errors import VectorlayError
from bootstrap.host import Host
from bootstrap.paths import LOG_PATH

LOCK_PATH = "/run/vectorlay/bootstrap.lock"


def _lock_holder(fd: int) -> str:
    """'pid N, started HH:MM:SS' of the process holding the flock on `fd`, from /proc/locks."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return "pid unknown"
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK" or parts[5] != dev:
            continue
        pid = parts[4]
        return f"pid {pid}" + (f", started {started}" if (started := _start_time(pid)) else "")
    return "pid unknown"


def _start_time(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    when = datetime.fromtimestamp(btime + ticks / os.sysconf("SC_CLK_TCK"))
    return when.strftime("%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def run_lock(host: Host) -> Iterator[None]:
    """One run at a time: a second run fails at once, naming the run that holds the lock."""
    path = host.path(LOCK_PATH)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        hint = (
            "re-run it with sudo"
            if isinstance(e, PermissionError)
            else f"check {os.path.dirname(LOCK_PATH)} (a directory on a writable /run), then re-run"
        )
        raise VectorlayError(f"cannot take the run lock {LOCK_PATH}: {e.strerror or e}", hint) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VectorlayError(
                f"another vectorlay-bootstrap run is in progress ({_lock_holder(fd)})",
                f"wait for it to finish (its log: {LOG_PATH}), then re-run if needed",
            ) from None
        yield
    finally:
        os.close(fd)
