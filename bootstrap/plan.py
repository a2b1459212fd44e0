"""Plan, then apply: the discipline every stage follows (docs/contracts.md#stages-and-plans).

A stage describes the host it wants as a list of changes (file content with mode and owner, symlink,
removal, command). `compute` compares each with the tree and marks it `changed` or `ok`; rendering
shows unified diffs; `apply` writes only what changed (atomically, keeping owner and mode), backs up a
file the installer does not own once before its first change, and runs the commands whose trigger
files changed. Planning again after an apply gives an empty plan.

Three kinds are not files but actions (`Enroll`, `Fetch`, `Switch`): they are planned, rendered and
counted like the others so that `--plan` shows the whole run, and carried out by their stage's apply.
`apply` here refuses a plan that holds one: it has no way to enroll or download, and skipping one
silently would leave the run half done.

Commands are journalled in the run state before the first write and struck off as each succeeds, so a
crash between writing /etc/default/grub.d/... and running update-grub is repaired by the next run.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import shlex
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from bootstrap.errors import VectorlayError
from bootstrap.fsutil import atomic_symlink, atomic_write, fault_point, fsync_dir
from bootstrap.host import Host
from bootstrap.state import RunState, load_state, save_state

MARKER = "# Managed by vectorlay-bootstrap"
BACKUP_DIR = "/var/lib/vectorlay/backup"


def is_owned(content: bytes | None) -> bool:
    """The installer's files carry the marker on their first line (second after a `#!` line)."""
    if content is None:
        return False
    lines = content.split(b"\n", 2)
    marker = MARKER.encode()
    if lines[0].rstrip(b"\r") == marker:
        return True
    return lines[0].startswith(b"#!") and len(lines) > 1 and lines[1].rstrip(b"\r") == marker


@dataclass(frozen=True)
class FileChange:
    path: str
    content: bytes
    mode: int = 0o644
    # None: the owner is not managed (a new file gets the running user, root on a real box).
    owner: tuple[int, int] | None = None
    reason: str = ""


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str
    reason: str = ""


@dataclass(frozen=True)
class Removal:
    """Remove a file the installer owns and put back the backup of what it replaced, if any."""

    path: str
    reason: str = ""


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    # Run when one of these paths changes in the same plan (ansible's handlers), or when `force`.
    after: tuple[str, ...] = ()
    force: bool = False
    reason: str = ""
    timeout: float = 600.0
    # False: a failure is reported and the run goes on (the caller judges the outcome itself).
    check: bool = True


@dataclass(frozen=True)
class Enroll:
    """The token exchanged for the node's identity (the enroll stage carries it out)."""

    api: str
    gpu_mode: str
    reenroll: bool = False
    needed: bool = True
    reason: str = ""


OFFERED = "the version the signed manifest offers"


@dataclass(frozen=True)
class Fetch:
    """An agent's release downloaded and verified (the artifacts stage). `version` None: not known
    yet, because the manifest is fetched with the identity the node does not have before enrolling."""

    name: str
    version: str | None = None
    size: int | None = None
    sha256: str = ""
    needed: bool = True
    reason: str = ""


@dataclass(frozen=True)
class Switch:
    """An agent moved to another release: drain, switch, restart, health check (the agents stage)."""

    name: str
    from_version: str | None
    to_version: str | None  # None: OFFERED
    reason: str = ""

    @property
    def needed(self) -> bool:
        return self.to_version is None or self.from_version != self.to_version


Action = Enroll | Fetch | Switch
ACTIONS = (Enroll, Fetch, Switch)
Change = FileChange | Symlink | Removal | Command | Action


class Status(str, Enum):
    CHANGED = "changed"
    OK = "ok"


@dataclass(frozen=True)
class Item:
    change: Change
    status: Status
    before: bytes | None = None  # current content (files) / link target (symlinks)
    before_mode: int | None = None
    backup: bool = False  # the current file is not the installer's: back it up first
    restore: bytes | None = None  # Removal: the backup that will be put back
    note: str = ""

    @property
    def changed(self) -> bool:
        return self.status is Status.CHANGED

    @property
    def path(self) -> str | None:
        ch = self.change
        return ch.path if isinstance(ch, (FileChange, Symlink, Removal)) else None


@dataclass
class Plan:
    items: list[Item] = field(default_factory=list)

    @property
    def changes(self) -> list[Item]:
        return [i for i in self.items if i.changed]

    @property
    def empty(self) -> bool:
        return not self.changes

    @property
    def actions(self) -> list[Item]:
        return [i for i in self.items if isinstance(i.change, ACTIONS)]

    def without_actions(self) -> Plan:
        """What `apply` carries out; the actions are the stage's."""
        return Plan([i for i in self.items if not isinstance(i.change, ACTIONS)])


def backup_path(path: str) -> str:
    return f"{BACKUP_DIR}/{path.lstrip('/')}"


def _read(host: Host, path: str) -> tuple[bytes | None, int | None, tuple[int, int] | None]:
    real = host.path(path, follow=False)
    try:
        st = real.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None, None, None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        return None, None, None
    return real.read_bytes(), st.st_mode & 0o7777, (st.st_uid, st.st_gid)


def _plan_file(host: Host, ch: FileChange) -> Item:
    real = host.path(ch.path, follow=False)
    if real.is_symlink() or (real.exists() and not real.is_file()):
        raise VectorlayError(
            f"{ch.path} exists and is not a regular file",
            "move it away and re-run; the installer writes a regular file there",
        )
    before, mode, owner = _read(host, ch.path)
    if before is None:
        return Item(ch, Status.CHANGED, note="create")
    same = before == ch.content and mode == ch.mode and (ch.owner is None or owner == ch.owner)
    if same:
        return Item(ch, Status.OK, before, mode)
    backup = not is_owned(before) and not host.exists(backup_path(ch.path))
    notes = []
    if before != ch.content:
        notes.append("update")
    if mode != ch.mode:
        notes.append(f"mode {mode:04o} -> {ch.mode:04o}")
    if ch.owner is not None and owner != ch.owner:
        notes.append(f"owner {owner} -> {ch.owner}")
    if backup:
        notes.append("backed up first: not owned by vectorlay-bootstrap")
    return Item(ch, Status.CHANGED, before, mode, backup=backup, note=", ".join(notes))


def _plan_symlink(host: Host, ch: Symlink) -> Item:
    real = host.path(ch.path, follow=False)
    try:
        current = os.readlink(real)
    except FileNotFoundError:
        return Item(ch, Status.CHANGED, note="create")
    except OSError:
        raise VectorlayError(f"{ch.path} exists and is not a symlink", "move it away and re-run") from None
    if current == ch.target:
        return Item(ch, Status.OK, current.encode())
    return Item(ch, Status.CHANGED, current.encode(), note=f"was -> {current}")


def _plan_removal(host: Host, ch: Removal) -> Item:
    real = host.path(ch.path, follow=False)
    restore: bytes | None = None
    bpath = host.path(backup_path(ch.path))
    if bpath.is_file():
        restore = bpath.read_bytes()
    if real.is_symlink():
        return Item(ch, Status.CHANGED, os.readlink(real).encode(), note="remove link")
    before, mode, _ = _read(host, ch.path)
    if before is None:
        if restore is not None:
            return Item(ch, Status.CHANGED, None, restore=restore, note="restore backup")
        return Item(ch, Status.OK)
    if not is_owned(before):
        # Someone replaced the installer's file with their own: it is theirs now, leave it alone.
        return Item(ch, Status.OK, before, mode, note="not owned by vectorlay-bootstrap; left alone")
    note = "remove, restore backup" if restore is not None else "remove"
    return Item(ch, Status.CHANGED, before, mode, restore=restore, note=note)


def compute(host: Host, changes: Sequence[Change], state: RunState | None = None) -> Plan:
    """Compare every change with the tree. Reads only; writes nothing."""
    pending = {tuple(c) for c in (state.pending_commands if state else [])}
    items: list[Item] = []
    for ch in changes:
        if isinstance(ch, FileChange):
            items.append(_plan_file(host, ch))
        elif isinstance(ch, Symlink):
            items.append(_plan_symlink(host, ch))
        elif isinstance(ch, Removal):
            items.append(_plan_removal(host, ch))
    changed = {i.path for i in items if i.changed}
    for ch in changes:
        if not isinstance(ch, Command):
            continue
        hits = [p for p in ch.after if p in changed]
        if ch.force:
            items.append(Item(ch, Status.CHANGED, note=ch.reason))
        elif hits:
            items.append(Item(ch, Status.CHANGED, note=f"{', '.join(hits)} changed"))
        elif ch.argv in pending:
            items.append(Item(ch, Status.CHANGED, note="left over from an interrupted run"))
        else:
            items.append(Item(ch, Status.OK))
    for ch in changes:
        if isinstance(ch, ACTIONS):
            items.append(Item(ch, Status.CHANGED if ch.needed else Status.OK, note=ch.reason))
    return Plan(items)


# --- rendering --------------------------------------------------------------------------------------


def _describe(item: Item) -> str:
    ch = item.change
    if isinstance(ch, FileChange):
        what = f"file     {ch.path} ({ch.mode:04o})"
    elif isinstance(ch, Symlink):
        what = f"symlink  {ch.path} -> {ch.target}"
    elif isinstance(ch, Removal):
        what = f"remove   {ch.path}"
    elif isinstance(ch, Command):
        what = f"run      {shlex.join(ch.argv)}"
    elif isinstance(ch, Enroll):
        what = f"enroll   node with {ch.api} ({ch.gpu_mode})"
    elif isinstance(ch, Fetch):
        if ch.version is None:
            what = f"fetch    {ch.name} ({OFFERED})"
        else:
            what = f"fetch    {ch.name} {ch.version} ({ch.size} bytes, sha256 {ch.sha256[:12]}…)"
    else:
        what = f"switch   {ch.name} {ch.from_version or 'none'} -> {ch.to_version or OFFERED}"
    note = f"  [{item.note}]" if item.note and item.changed else ""
    return f"{item.status.value:<8} {what}{note}"


def _lines(data: bytes | None) -> list[str]:
    if data is None:
        return []
    return data.decode(errors="replace").splitlines(keepends=True)


def diff(item: Item) -> str:
    ch = item.change
    if not item.changed or isinstance(ch, (Command, Enroll, Fetch, Switch)):
        return ""
    before: bytes | None
    after: bytes | None
    if isinstance(ch, FileChange):
        before, after = item.before, ch.content
    elif isinstance(ch, Symlink):
        before = None if item.before is None else b"-> " + item.before + b"\n"
        after = f"-> {ch.target}\n".encode()
    else:
        before, after = item.before, item.restore
    old = "/dev/null" if before is None else f"a{ch.path}"
    new = "/dev/null" if after is None else f"b{ch.path}"
    out = "".join(difflib.unified_diff(_lines(before), _lines(after), old, new))
    if out and not out.endswith("\n"):
        out += "\n\\ No newline at end of file\n"
    return out


def render(plan: Plan, *, diffs: bool) -> list[str]:
    out: list[str] = []
    for item in plan.items:
        out.append("  " + _describe(item))
        if diffs and item.changed:
            d = diff(item)
            if d:
                out.extend("    " + line for line in d.splitlines())
    n = len(plan.changes)
    out.append(f"  {n} to change, {len(plan.items) - n} ok")
    return out


# --- apply ------------------------------------------------------------------------------------------


@dataclass
class Applied:
    written: list[str] = field(default_factory=list)
    commands: list[tuple[str, ...]] = field(default_factory=list)
    failed: list[tuple[str, ...]] = field(default_factory=list)


def _write_backup(host: Host, path: str) -> None:
    real = host.path(path, follow=False)
    st = real.stat()
    atomic_write(host.path(backup_path(path)), real.read_bytes(), mode=st.st_mode & 0o7777)


def _remove(host: Host, path: str) -> None:
    real = host.path(path, follow=False)
    fault_point(f"remove {real}")
    with contextlib.suppress(FileNotFoundError):
        real.unlink()
        fsync_dir(real.parent)


def apply(
    host: Host,
    plan: Plan,
    *,
    log: Callable[[str], None] = lambda _msg: None,
    state: RunState | None = None,
    persist: Callable[[], object] | None = None,
) -> Applied:
    """Carry out the changed items of `plan`. Raises VectorlayError when a command fails, and
    TypeError, before writing anything, when the plan holds an action (Plan.without_actions).
    `persist` makes `state` durable (the install run's Context.persist); without them, the state on
    disk is loaded and saved here."""
    acts = [type(i.change).__name__ for i in plan.actions]
    if acts:
        raise TypeError(f"plan.apply does not carry out {', '.join(acts)}: the stage's apply does")
    done = Applied()
    todo = plan.changes
    if not todo:
        return done
    commands = [i.change.argv for i in todo if isinstance(i.change, Command)]
    if state is None:
        state = load_state(host)
    journal = state
    if persist is None:

        def persist() -> None:
            save_state(host, journal)

    if commands:
        for argv in commands:
            if list(argv) not in state.pending_commands:
                state.pending_commands.append(list(argv))
        persist()

    for item in todo:
        ch = item.change
        if isinstance(ch, FileChange):
            if item.backup:
                _write_backup(host, ch.path)
            uid, gid = ch.owner if ch.owner is not None else (None, None)
            atomic_write(host.path(ch.path, follow=False), ch.content, mode=ch.mode, uid=uid, gid=gid)
            done.written.append(ch.path)
            log(f"wrote {ch.path}")
        elif isinstance(ch, Symlink):
            atomic_symlink(ch.target, host.path(ch.path, follow=False))
            done.written.append(ch.path)
            log(f"linked {ch.path} -> {ch.target}")
        elif isinstance(ch, Removal):
            _remove(host, ch.path)
            if item.restore is not None:
                bpath = host.path(backup_path(ch.path))
                mode = bpath.stat().st_mode & 0o7777
                atomic_write(host.path(ch.path, follow=False), item.restore, mode=mode)
                _remove(host, backup_path(ch.path))
                log(f"restored {ch.path} from its backup")
            else:
                log(f"removed {ch.path}")
            done.written.append(ch.path)

    for item in todo:
        ch = item.change
        if not isinstance(ch, Command):
            continue
        log(f"running {shlex.join(ch.argv)}")
        res = host.run(ch.argv, timeout=ch.timeout)
        done.commands.append(ch.argv)
        tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
        if not res.ok and not ch.check:
            log(f"{shlex.join(ch.argv)} failed (exit {res.returncode})")
            for line in tail:
                log(f"  {line}")
            done.failed.append(ch.argv)
        elif not res.ok:
            raise VectorlayError(
                f"{shlex.join(ch.argv)} failed (exit {res.returncode})"
                + (":\n    " + "\n    ".join(tail) if tail else ""),
                "fix the cause and re-run the same command; it picks up where it stopped",
            )
        state.pending_commands = [c for c in state.pending_commands if tuple(c) != ch.argv]
        persist()
    return done
