"""`vectorlay-bootstrap uninstall`: remove what the installer owns and put back what it replaced."""

from __future__ import annotations

import os
from pathlib import Path

from bootstrap.host import Host, open_host
from bootstrap.plan import BACKUP_DIR, Change, Removal, apply, compute, render
from bootstrap.stages import agents, gpu
from bootstrap.state import load_state


def _backed_up(host: Host) -> list[str]:
    base = host.path(BACKUP_DIR)
    out = []
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            out.append("/" + os.path.relpath(os.path.join(dirpath, name), base))
    return sorted(out)


def uninstall_changes(host: Host) -> list[Change]:
    changes = agents.owned_changes(host) + gpu.owned_changes(host)
    known = {c.path for c in changes if isinstance(c, Removal)}
    # Backups of files a later stage replaced are restored too, before the commands run.
    extra: list[Change] = [Removal(p) for p in _backed_up(host) if p not in known]
    return extra + changes


def run_uninstall(root: Path, *, plan_only: bool = False, host: Host | None = None) -> int:
    host = host or open_host(root)
    state = load_state(host)
    plan = compute(host, uninstall_changes(host), state)
    print("uninstall:")
    for line in render(plan, diffs=plan_only):
        print(line)
    if plan_only:
        print("plan only: nothing was changed")
        return 0
    apply(host, plan, log=lambda m: print(f"  {m}"), state=state)
    if plan.changes:
        print("done: GPUs stay on vfio-pci until the next reboot")
    else:
        print("done: nothing of vectorlay-bootstrap's was installed")
    return 0
