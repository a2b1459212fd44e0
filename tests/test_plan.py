from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootstrap.errors import VectorlayError
from bootstrap.host import CommandResult, Host, RecordingRunner, TreeHost
from bootstrap.plan import (
    MARKER,
    Change,
    Command,
    FileChange,
    Removal,
    Status,
    Symlink,
    apply,
    backup_path,
    compute,
    diff,
    is_owned,
    render,
)
from bootstrap.state import load_state
from hostsim.snapshot import snapshot

OWNED = f"{MARKER}\nkey=value\n".encode()


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return TreeHost(tmp_path, RecordingRunner())


def commands(host: Host) -> list[tuple[str, ...]]:
    assert isinstance(host.runner, RecordingRunner)
    return host.runner.commands


def test_a_new_file_is_changed_then_ok_and_the_plan_after_apply_is_empty(host: Host) -> None:
    changes: list[Change] = [
        FileChange("/etc/x/a.conf", OWNED, 0o640),
        Command(("reload-x",), after=("/etc/x/a.conf",)),
    ]
    plan = compute(host, changes)
    assert [i.status for i in plan.items] == [Status.CHANGED, Status.CHANGED]
    apply(host, plan)
    assert host.path("/etc/x/a.conf").read_bytes() == OWNED
    assert host.path("/etc/x/a.conf").stat().st_mode & 0o777 == 0o640
    assert commands(host) == [("reload-x",)]
    again = compute(host, changes)
    assert again.empty
    assert [i.status for i in again.items] == [Status.OK, Status.OK]


def test_compute_and_render_write_nothing(host: Host) -> None:
    host.path("/etc").mkdir()
    host.path("/etc/b.conf").write_bytes(b"theirs\n")
    before = snapshot(host.root)
    plan = compute(
        host, [FileChange("/etc/b.conf", OWNED), Symlink("/etc/l", "/etc/b.conf"), Removal("/etc/c")]
    )
    lines = render(plan, diffs=True)
    assert snapshot(host.root) == before
    assert "    -theirs" in lines and f"    +{MARKER}" in lines


def test_a_mode_change_alone_is_a_change(host: Host) -> None:
    apply(host, compute(host, [FileChange("/etc/m", OWNED, 0o644)]))
    plan = compute(host, [FileChange("/etc/m", OWNED, 0o600)])
    assert plan.changes[0].note == "mode 0644 -> 0600"
    apply(host, plan)
    assert host.path("/etc/m").stat().st_mode & 0o777 == 0o600


def test_a_file_not_owned_is_backed_up_once_before_its_first_change(host: Host) -> None:
    host.path("/etc").mkdir()
    host.path("/etc/f").write_bytes(b"original\n")
    os.chmod(host.path("/etc/f"), 0o600)
    plan = compute(host, [FileChange("/etc/f", OWNED, 0o600)])
    assert plan.changes[0].backup
    apply(host, plan)
    bak = host.path(backup_path("/etc/f"))
    assert bak.read_bytes() == b"original\n" and bak.stat().st_mode & 0o777 == 0o600
    # The installer's own file is never backed up, so the first backup stays the original.
    apply(host, compute(host, [FileChange("/etc/f", OWNED + b"more\n", 0o600)]))
    assert bak.read_bytes() == b"original\n"


def test_removal_deletes_the_owned_file_and_restores_the_backup(host: Host) -> None:
    host.path("/etc").mkdir()
    host.path("/etc/f").write_bytes(b"original\n")
    apply(host, compute(host, [FileChange("/etc/f", OWNED)]))
    plan = compute(host, [Removal("/etc/f")])
    assert "-key=value" in diff(plan.changes[0]) and "+original" in diff(plan.changes[0])
    apply(host, plan)
    assert host.path("/etc/f").read_bytes() == b"original\n"
    assert not host.path(backup_path("/etc/f")).exists()
    assert compute(host, [Removal("/etc/f")]).empty


def test_removal_leaves_a_file_someone_else_put_there(host: Host) -> None:
    host.path("/etc").mkdir()
    host.path("/etc/f").write_bytes(b"mine now\n")
    plan = compute(host, [Removal("/etc/f")])
    assert plan.empty
    assert "left alone" in plan.items[0].note


def test_a_symlink_is_created_and_then_ok(host: Host) -> None:
    change = Symlink("/etc/wants/u.service", "/etc/u.service")
    apply(host, compute(host, [change]))
    assert os.readlink(host.path("/etc/wants/u.service", follow=False)) == "/etc/u.service"
    assert compute(host, [change]).empty


def test_a_command_only_runs_when_its_trigger_changed(host: Host) -> None:
    apply(host, compute(host, [FileChange("/etc/a", OWNED)]))
    plan = compute(host, [FileChange("/etc/a", OWNED), Command(("x",), after=("/etc/a",))])
    assert plan.empty
    apply(host, plan)
    assert commands(host) == []


def test_a_crash_before_the_command_ran_is_repaired_by_the_next_run(host: Host) -> None:
    def fail(h: Host, argv: tuple[str, ...]) -> CommandResult:
        return CommandResult(argv, 1, "", "grub-mkconfig: error: out of disk\n")

    assert isinstance(host.runner, RecordingRunner)
    host.runner.handlers["update-grub"] = fail
    changes: list[Change] = [FileChange("/etc/g", OWNED), Command(("update-grub",), after=("/etc/g",))]
    with pytest.raises(VectorlayError) as e:
        apply(host, compute(host, changes))
    assert "out of disk" in e.value.message
    assert load_state(host).pending_commands == [["update-grub"]]

    del host.runner.handlers["update-grub"]
    plan = compute(host, changes, load_state(host))
    assert [i.status for i in plan.items] == [Status.OK, Status.CHANGED]
    assert plan.items[1].note == "left over from an interrupted run"
    apply(host, plan)
    assert load_state(host).pending_commands == []
    assert compute(host, changes, load_state(host)).empty


def test_an_unchecked_command_failure_is_reported_and_the_run_goes_on(host: Host) -> None:
    assert isinstance(host.runner, RecordingRunner)
    host.runner.handlers["bind"] = lambda h, a: CommandResult(a, 1, "", "held")
    log: list[str] = []
    done = apply(host, compute(host, [Command(("bind",), force=True, check=False)]), log=log.append)
    assert done.failed == [("bind",)]
    assert "bind failed (exit 1)" in log


def test_a_directory_in_the_way_is_a_clear_error(host: Host) -> None:
    host.path("/etc/d").mkdir(parents=True)
    with pytest.raises(VectorlayError) as e:
        compute(host, [FileChange("/etc/d", OWNED)])
    assert "is not a regular file" in e.value.message


def test_ownership_is_the_marker_on_the_first_line_or_after_a_shebang() -> None:
    assert is_owned(OWNED)
    assert is_owned(b"#!/bin/sh\n" + OWNED)
    assert not is_owned(b"# a comment\n" + OWNED)
    assert not is_owned(None)


def test_the_owner_is_kept_when_the_change_does_not_manage_it(host: Host) -> None:
    path = host.path("/etc/o")
    path.parent.mkdir()
    path.write_bytes(OWNED)
    os.chown(path, 1234, 5678)
    apply(host, compute(host, [FileChange("/etc/o", OWNED + b"x=1\n")]))
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    plan = compute(host, [FileChange("/etc/o", OWNED + b"x=1\n", owner=(0, 0))])
    assert plan.changes[0].note == "owner (1234, 5678) -> (0, 0)"
    apply(host, plan)
    assert (path.stat().st_uid, path.stat().st_gid) == (0, 0)
