"""A tree run never reaches outside its root: links planted in the tree are resolved as a chroot would
(an absolute target starts again at the root, `..` stops there), so a write, an append or a removal
through them lands inside the tree. Each case runs the real installer CLI on a tree and fingerprints a
directory next to it that the links point at."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bootstrap.errors import VectorlayError
from bootstrap.host import TreeHost, resolve_in_root
from hostsim import inject
from hostsim.snapshot import snapshot
from tests.install.helpers import gpus_on_vfio, install

MakeTree = Callable[..., Path]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the tree, standing for the real machine's /etc and /var/log."""
    d = tmp_path / "outside"
    (d / "grub.d").mkdir(parents=True)
    (d / "grub.d" / "keep.cfg").write_text("GRUB_TIMEOUT=5\n")
    (d / "modprobe.d").mkdir()
    (d / "modprobe.d" / "vectorlay-vfio.conf").write_text("# Managed by vectorlay-bootstrap\noptions x\n")
    (d / "log").mkdir()
    (d / "log" / "bootstrap.log").write_text("the machine's own log\n")
    return d


def _link(tree: Path, host_path: str, target: str) -> None:
    link = tree / host_path.lstrip("/")
    if link.is_dir() and not link.is_symlink():
        for p in sorted(link.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        link.rmdir()
    elif link.exists() or link.is_symlink():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)


def _plant(tree: Path, outside: Path, absolute: bool) -> None:
    def target(p: Path, link_dir: str) -> str:
        return str(p) if absolute else os.path.relpath(p, tree / link_dir)

    _link(tree, "/etc/default/grub.d", target(outside / "grub.d", "etc/default"))
    _link(tree, "/etc/modprobe.d", target(outside / "modprobe.d", "etc"))
    log = target(outside / "log/bootstrap.log", "var/log/vectorlay")
    _link(tree, "/var/log/vectorlay/bootstrap.log", log)


@pytest.mark.parametrize("absolute", [True, False], ids=["absolute-links", "dotdot-links"])
def test_an_install_run_through_planted_links_changes_nothing_outside_the_tree(
    make_tree: MakeTree, outside: Path, absolute: bool
) -> None:
    tree = make_tree("hgx-h100", gpus_on_vfio)
    _plant(tree, outside, absolute)
    before = snapshot(outside)
    res = install(tree, "--only", "gpu")
    assert "Traceback" not in res.stdout + res.stderr
    assert res.returncode in (0, 3), res.stdout[-3000:] + res.stderr
    assert snapshot(outside) == before
    # The drop-in and the modprobe options went where a chroot would have put them: inside the tree.
    landed = list(tree.rglob("99-vectorlay-iommu.cfg"))
    assert landed and all(tree in p.parents for p in landed)
    assert any(tree in p.parents for p in tree.rglob("bootstrap.log"))


@pytest.mark.slow
def test_uninstall_through_a_planted_link_removes_nothing_outside_the_tree(
    make_tree: MakeTree, outside: Path
) -> None:
    tree = make_tree("hgx-h100", gpus_on_vfio)
    assert install(tree, "--only", "gpu").returncode in (0, 3)
    # Someone swaps the tree's modprobe.d for a link to the machine's own, which holds a file of the
    # same name with the installer's marker: removing "the installer's file" must not delete it.
    _link(tree, "/etc/modprobe.d", str(outside / "modprobe.d"))
    before = snapshot(outside)
    res = subprocess.run(
        [sys.executable, "-m", "bootstrap.cli", "uninstall", "--root", str(tree)],
        env=inject.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in res.stdout + res.stderr
    assert res.returncode == 0, res.stdout + res.stderr
    assert snapshot(outside) == before


def test_a_link_loop_in_the_tree_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    os.symlink("b", tmp_path / "etc/a")
    os.symlink("a", tmp_path / "etc/b")
    with pytest.raises(VectorlayError, match="too many levels of symbolic links"):
        TreeHost(tmp_path).path("/etc/a/x")


def test_dotdot_and_absolute_targets_stop_at_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink("/../../../../etc", root / "etc/up")
    os.symlink("../../../../../../..", root / "etc/dots")
    assert resolve_in_root(root.resolve(), "/etc/up/passwd") == root.resolve() / "etc/passwd"
    assert resolve_in_root(root.resolve(), "/etc/dots/x") == root.resolve() / "x"
    assert resolve_in_root(root.resolve(), "/../../x") == root.resolve() / "x"
    # The link itself, for a rename or unlink over it.
    assert resolve_in_root(root.resolve(), "/etc/up", follow=False) == root.resolve() / "etc/up"
