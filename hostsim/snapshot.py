"""A fingerprint of a whole tree (content, mode, mtime, link targets) to prove a run wrote nothing."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def snapshot(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, tuple[str, int, int, str]]:
    """`skip`: paths left out (with what is under them), e.g. "run" (tmpfs on a real box: the run lock
    lives there) or "var/log" (the install run appends its log on every run)."""
    out: dict[str, tuple[str, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if os.path.normpath(os.path.join(here, d)) not in skip]
        filenames = [f for f in filenames if os.path.normpath(os.path.join(here, f)) not in skip]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", st.st_mode, st.st_mtime_ns, os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir", st.st_mode, st.st_mtime_ns, "")
            elif not stat.S_ISREG(st.st_mode):
                out[rel] = ("special", st.st_mode, st.st_mtime_ns, "")  # a FIFO is never read
            else:
                digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
                out[rel] = ("file", st.st_mode, st.st_mtime_ns, digest)
    return out
