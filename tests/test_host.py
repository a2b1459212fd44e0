from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from bootstrap.fsutil import atomic_symlink, atomic_write
from bootstrap.host import CommandResult, LiveHost, RecordingRunner, SubprocessRunner, TreeHost, open_host
from hostsim.inject import LiveRootForbidden


def test_paths_resolve_inside_the_root_and_back(tmp_path: Path) -> None:
    host = TreeHost(tmp_path)
    assert host.path("/etc/default/grub") == tmp_path / "etc/default/grub"
    assert host.to_host(tmp_path / "etc/default/grub") == "/etc/default/grub"
    with pytest.raises(ValueError):
        host.path("etc/default/grub")


def test_a_tree_root_never_runs_commands_it_records_them(tmp_path: Path) -> None:
    host = TreeHost(tmp_path)
    assert isinstance(host.runner, RecordingRunner)
    marker = tmp_path / "would-be-created"
    result = host.run(["touch", str(marker)])
    assert result.ok and not marker.exists()
    assert host.runner.commands == [("touch", str(marker))]


def test_recording_runner_hands_a_program_to_its_simulator(tmp_path: Path) -> None:
    runner = RecordingRunner(handlers={"systemctl": lambda h, argv: CommandResult(argv, 3, "inactive\n")})
    host = TreeHost(tmp_path, runner)
    assert host.run(["/usr/bin/systemctl", "is-active", "nomad"]).stdout == "inactive\n"
    assert host.run(["modprobe", "vfio-pci"]).returncode == 0


def test_the_real_root_is_unreachable_under_the_test_suite() -> None:
    with pytest.raises(LiveRootForbidden):
        LiveHost()
    with pytest.raises(LiveRootForbidden):
        open_host("/")


def test_a_tree_host_refuses_the_real_root() -> None:
    # A tree at / would be this machine with its commands silently dropped.
    with pytest.raises(ValueError, match="LiveHost"):
        TreeHost("/")


@pytest.mark.live
def test_the_real_root_uses_the_subprocess_runner_when_asked_for() -> None:
    host = open_host("/")
    assert isinstance(host, LiveHost) and isinstance(host.runner, SubprocessRunner)
    assert host.is_live and host.runs_commands and host.root_uid == 0
    assert host.path("/proc/cmdline") == Path("/proc/cmdline")


def test_a_tree_host_runs_commands_only_through_a_runner_that_executes(tmp_path: Path) -> None:
    recorded = TreeHost(tmp_path)
    assert not recorded.is_live and not recorded.runs_commands

    class Executing:
        executes = True

        def run(self, argv: Sequence[str], **kwargs: Any) -> CommandResult:
            return CommandResult(tuple(argv), 0, "ran\n")

    executing = TreeHost(tmp_path, Executing())
    assert executing.runs_commands and not executing.is_live
    assert executing.run(["true"]).stdout == "ran\n"


def test_a_tree_stands_for_a_host_whose_root_is_the_trees_owner(tmp_path: Path) -> None:
    assert TreeHost(tmp_path).root_uid == tmp_path.stat().st_uid


def test_systemd_runs_services_where_run_systemd_system_is_a_directory(tmp_path: Path) -> None:
    from bootstrap.update import services_really_run

    host = TreeHost(tmp_path)
    # Nothing answers `systemctl is-system-running` in a recorded tree, and no marker: no systemd.
    assert not services_really_run(host)
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    assert services_really_run(host)
    assert isinstance(host.runner, RecordingRunner) and host.runner.commands == [
        ("systemctl", "is-system-running")
    ]


def test_a_tree_sysfs_write_replaces_the_attribute_in_one_write(tmp_path: Path) -> None:
    attr = tmp_path / "sys/bus/pci/devices/0000:01:00.0/driver_override"
    attr.parent.mkdir(parents=True)
    attr.write_text("nvidia-long-old-value\n")
    TreeHost(tmp_path).sysfs_write("/sys/bus/pci/devices/0000:01:00.0/driver_override", "vfio-pci")
    assert attr.read_text() == "vfio-pci"


def test_memory_comes_from_the_trees_proc_meminfo(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(
        "MemTotal:       33554432 kB\nMemFree:        1000 kB\nMemAvailable:   2000 kB\n"
        "Buffers:        0 kB\nCached:         0 kB\nShmem:          0 kB\nSReclaimable:   0 kB\n"
        "Active:         0 kB\nInactive:       0 kB\n"
    )
    assert TreeHost(tmp_path).memory_total_bytes() == 32 * 1024**3


def test_disk_free_is_what_an_unprivileged_writer_may_use_on_the_nearest_existing_ancestor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a copy of the product's arithmetic on a live filesystem (whose free space moves between
    # two calls): statvfs answers fixed figures, and the test checks which path was asked and that
    # the root's reserve (f_bfree - f_bavail) is not counted.
    asked: list[str] = []

    class Fixed:
        f_bavail, f_bfree, f_frsize, f_bsize = 1000, 5000, 4096, 1 << 20

    def statvfs(p: object) -> object:
        asked.append(str(p))
        return Fixed()

    (tmp_path / "var").mkdir()
    monkeypatch.setattr(os, "statvfs", statvfs)
    assert TreeHost(tmp_path).disk_free_bytes("/var/lib/vectorlay") == 1000 * 4096
    assert asked == [str(tmp_path / "var")]


def test_atomic_write_keeps_mode_and_leaves_no_temp_files(tmp_path: Path) -> None:
    p = tmp_path / "d" / "secret"
    atomic_write(p, "one", mode=0o600)
    atomic_write(p, b"two")
    assert p.read_text() == "two"
    assert p.stat().st_mode & 0o777 == 0o600
    assert os.listdir(p.parent) == ["secret"]


def test_atomic_write_failure_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "f"
    p.write_text("old")

    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(p, "new")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_write_passes_its_kill_point_unless_told_not_to(tmp_path: Path) -> None:
    from bootstrap.fsutil import set_fault_hook

    seen: list[str] = []
    previous = set_fault_hook(seen.append)
    try:
        atomic_write(tmp_path / "counted", "x")
        atomic_write(tmp_path / "runtime", "x", fault=False)
    finally:
        set_fault_hook(previous)
    assert seen == [f"write {tmp_path / 'counted'}"]
    assert (tmp_path / "runtime").read_text() == "x"


def test_the_agent_status_is_written_0644_redacted_and_as_no_kill_point(tmp_path: Path) -> None:
    from bootstrap.agent_status import STATUS_PATH, read_status, write_status
    from bootstrap.errors import hold_secret
    from bootstrap.fsutil import set_fault_hook

    host = TreeHost(tmp_path)
    secret = "vnt_status_secret_0123456789"
    hold_secret(secret)
    seen: list[str] = []
    previous = set_fault_hook(seen.append)
    try:
        write_status(host, {"reason": "first"})
        write_status(host, {"reason": "second"})
    finally:
        set_fault_hook(previous)
    path = host.path(STATUS_PATH)
    assert seen == []
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(path.parent) == ["status.json"]
    assert read_status(host) == {"reason": "second"}
    write_status(host, {"reason": f"again {secret}"})
    assert secret not in path.read_text()


def test_atomic_symlink_replaces_a_link_in_one_step(tmp_path: Path) -> None:
    link = tmp_path / "current"
    atomic_symlink("v1", link)
    atomic_symlink("v2", link)
    assert os.readlink(link) == "v2"
    assert sorted(os.listdir(tmp_path)) == ["current"]
