from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap.cli import main
from bootstrap.commands.install import run_install
from bootstrap.host import RecordingRunner, TreeHost
from hostsim.snapshot import snapshot

MakeTree = Callable[..., Path]


def quiet(fn: Callable[[], int]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = fn()
    return code, out.getvalue()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return int(e.value.code or 0), capsys.readouterr().out


def test_uninstall_removes_what_it_owns_and_restores_what_it_replaced(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    theirs = b"# my own drop-in\nGRUB_TIMEOUT=5\n"

    def edit(desc: dict[str, Any]) -> None:
        desc["files"] = {"/etc/default/grub.d/99-vectorlay-iommu.cfg": theirs.decode()}

    root = make_tree("iommu-off", edit)
    etc_before = snapshot(root / "etc")
    quiet(lambda: run_install(root, only="gpu"))
    assert (
        root / "var/lib/vectorlay/backup/etc/default/grub.d/99-vectorlay-iommu.cfg"
    ).read_bytes() == theirs

    code, out = cli(capsys, "uninstall", "--root", str(root))
    assert code == 0
    assert (root / "etc/default/grub.d/99-vectorlay-iommu.cfg").read_bytes() == theirs
    for p in (
        "etc/modules-load.d/vectorlay-vfio.conf",
        "etc/modprobe.d/vectorlay-vfio.conf",
        "etc/udev/rules.d/99-vectorlay-vfio.rules",
        "etc/systemd/system/vectorlay-vfio-bind.service",
        "etc/systemd/system/multi-user.target.wants/vectorlay-vfio-bind.service",
        "etc/initramfs-tools/hooks/vectorlay-vfio",
    ):
        assert not (root / p).exists() and not (root / p).is_symlink(), p
    assert not (root / "var/lib/vectorlay/backup/etc/default/grub.d/99-vectorlay-iommu.cfg").exists()

    # Every file of /etc is back with its bytes and mode (the restored one has a new mtime).
    def files(snap: dict[str, tuple[str, int, int, str]]) -> dict[str, tuple[int, str]]:
        return {k: (v[1], v[3]) for k, v in snap.items() if v[0] != "dir"}

    assert files(snapshot(root / "etc")) == files(etc_before)
    assert "GPUs stay on vfio-pci until the next reboot" in out


def test_uninstall_runs_the_commands_that_pick_up_the_removal(make_tree: MakeTree) -> None:
    from bootstrap.commands.uninstall import run_uninstall

    root = make_tree("iommu-off")
    quiet(lambda: run_install(root, only="gpu"))
    host = TreeHost(root)
    quiet(lambda: run_uninstall(root, host=host))
    assert isinstance(host.runner, RecordingRunner)
    assert host.runner.render() == [
        "/usr/sbin/update-grub",
        "systemctl daemon-reload",
        "udevadm control --reload",
        "update-initramfs -u",
    ]


def test_uninstall_plan_writes_nothing_and_a_second_uninstall_has_nothing_to_do(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree("workstation-consumer")
    quiet(lambda: run_install(root, only="gpu"))
    before = snapshot(root)
    code, out = cli(capsys, "uninstall", "--root", str(root), "--plan")
    assert code == 0 and snapshot(root) == before
    assert "--- a/etc/modprobe.d/vectorlay-vfio.conf" in out
    assert "changed  remove   /etc/default/grub.d/99-vectorlay-iommu.cfg" in out
    cli(capsys, "uninstall", "--root", str(root))
    code, out = cli(capsys, "uninstall", "--root", str(root))
    assert "0 to change" in out
    assert "nothing of vectorlay-bootstrap's was installed" in out


def test_after_uninstall_the_install_plan_shows_every_change_again(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree("workstation-consumer")
    _, first = cli(capsys, "install", "--root", str(root), "--only", "gpu", "--plan")
    cli(capsys, "install", "--root", str(root), "--only", "gpu")
    cli(capsys, "uninstall", "--root", str(root))
    _, again = cli(capsys, "install", "--root", str(root), "--only", "gpu", "--plan")
    assert again == first
    assert "12 to change, 0 ok" in again
