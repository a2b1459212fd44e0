from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

from bootstrap import host as host_module
from bootstrap.fsutil import atomic_symlink, atomic_write
from bootstrap.host import CommandResult, Host, RecordingRunner, SubprocessRunner, open_host, set_host_factory
from hostsim import inject
from hostsim.inject import LiveRootForbidden


def test_paths_resolve_inside_the_root_and_back(tmp_path: Path) -> None:
    host = Host(tmp_path)
    assert host.path("/etc/default/grub") == tmp_path / "etc/default/grub"
    assert host.to_host(tmp_path / "etc/default/grub") == "/etc/default/grub"
    with pytest.raises(ValueError):
        host.path("etc/default/grub")


def test_a_tree_root_never_runs_commands_it_records_them(tmp_path: Path) -> None:
    host = Host(tmp_path)
    assert isinstance(host.runner, RecordingRunner)
    marker = tmp_path / "would-be-created"
    result = host.run(["touch", str(marker)])
    assert result.ok and not marker.exists()
    assert host.runner.commands == [("touch", str(marker))]


def test_recording_runner_hands_a_program_to_its_simulator(tmp_path: Path) -> None:
    runner = RecordingRunner(handlers={"systemctl": lambda h, argv: CommandResult(argv, 3, "inactive\n")})
    host = Host(tmp_path, runner)
    assert host.run(["/usr/bin/systemctl", "is-active", "nomad"]).stdout == "inactive\n"
    assert host.run(["modprobe", "vfio-pci"]).returncode == 0


def test_the_real_root_is_unreachable_under_the_test_suite() -> None:
    with pytest.raises(LiveRootForbidden):
        Host("/")


@pytest.mark.live
def test_the_real_root_uses_the_subprocess_runner_when_asked_for() -> None:
    host = Host("/")
    assert host.is_live and isinstance(host.runner, SubprocessRunner)
    assert host.path("/proc/cmdline") == Path("/proc/cmdline")


def test_memory_comes_from_the_trees_proc_meminfo(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(
        "MemTotal:       33554432 kB\nMemFree:        1000 kB\nMemAvailable:   2000 kB\n"
        "Buffers:        0 kB\nCached:         0 kB\nShmem:          0 kB\nSReclaimable:   0 kB\n"
        "Active:         0 kB\nInactive:       0 kB\n"
    )
    assert Host(tmp_path).memory_total_bytes() == 32 * 1024**3


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
    assert Host(tmp_path).disk_free_bytes("/var/lib/vectorlay") == 1000 * 4096
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


def test_atomic_symlink_replaces_a_link_in_one_step(tmp_path: Path) -> None:
    link = tmp_path / "current"
    atomic_symlink("v1", link)
    atomic_symlink("v2", link)
    assert os.readlink(link) == "v2"
    assert sorted(os.listdir(tmp_path)) == ["current"]


def test_the_simulating_host_factory_simulates_tree_roots_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_module, "_host_factory", host_module._host_factory)
    set_host_factory(inject.simulating_host)
    host = open_host(tmp_path)
    assert isinstance(host.runner, RecordingRunner)
    assert "systemctl" in host.runner.handlers and "modprobe" in host.runner.handlers
    assert host.sysfs_hooks
    # A runner given explicitly is left alone.
    plain = Host(tmp_path, RecordingRunner())
    assert isinstance(plain.runner, RecordingRunner) and plain.runner.handlers == {}
    # The real root never gets the simulator, whatever the factory: commands run for real
    # and sysfs writes reach the kernel. (Building the host reads and runs nothing.)
    monkeypatch.setattr(Host, "__init__", inspect.unwrap(Host.__init__))
    live = open_host("/")
    assert isinstance(live.runner, SubprocessRunner) and live.sysfs_hooks == []
