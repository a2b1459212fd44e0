from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap import grub
from bootstrap.cli import main
from bootstrap.host import TreeHost
from hostsim.snapshot import snapshot

MakeTree = Callable[..., Path]

# Ubuntu 22.04 cloud images ship exactly this file; it replaces GRUB_CMDLINE_LINUX_DEFAULT outright.
CLOUDIMG = """# Cloud Image specific Grub settings for Generic Cloud Images
# CLOUD_IMG: This file was created/modified by the Cloud Image build process

# Set the recordfail timeout
GRUB_RECORDFAIL_TIMEOUT=0

# Do not wait on grub prompt
GRUB_TIMEOUT=0

# Set the default commandline
GRUB_CMDLINE_LINUX_DEFAULT="console=tty1 console=ttyS0"

# Set the grub console type
GRUB_TERMINAL=console
"""


def bash_effective(root: Path) -> dict[str, str]:
    """What grub-mkconfig computes: source /etc/default/grub, then grub.d/*.cfg, in a real bash."""
    script = (
        'cd "$1"; . ./etc/default/grub; '
        'for x in ./etc/default/grub.d/*.cfg; do if [ -e "$x" ]; then . "$x"; fi; done; '
        'printf "%s\\0%s" "$GRUB_CMDLINE_LINUX" "$GRUB_CMDLINE_LINUX_DEFAULT"'
    )
    out = subprocess.run(
        ["bash", "-c", script, "bash", str(root)],
        capture_output=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    ).stdout.decode()
    linux, default = out.split("\0")
    return {"GRUB_CMDLINE_LINUX": linux, "GRUB_CMDLINE_LINUX_DEFAULT": default}


def kernel_args(root: Path) -> list[str]:
    v = bash_effective(root)
    return v["GRUB_CMDLINE_LINUX"].split() + v["GRUB_CMDLINE_LINUX_DEFAULT"].split()


def install_gpu(root: Path) -> int:
    with pytest.raises(SystemExit) as e:
        main(["install", "--root", str(root), "--only", "gpu"])
    return int(e.value.code or 0)


def with_files(files: dict[str, str]) -> Callable[[dict[str, Any]], None]:
    def edit(desc: dict[str, Any]) -> None:
        desc.setdefault("files", {}).update(files)

    return edit


def test_the_iommu_args_reach_the_kernel_line_exactly_once(make_tree: MakeTree) -> None:
    root = make_tree("iommu-off")
    assert install_gpu(root) == 3
    args = kernel_args(root)
    assert args.count("intel_iommu=on") == 1 and args.count("iommu=pt") == 1
    assert args[:2] == ["quiet", "splash"]


def test_the_args_survive_ubuntus_cloudimg_settings(make_tree: MakeTree) -> None:
    root = make_tree("iommu-off", with_files({"/etc/default/grub.d/50-cloudimg-settings.cfg": CLOUDIMG}))
    # Without the drop-in, an edit of /etc/default/grub would be lost: cloudimg has the last word.
    assert "quiet" not in kernel_args(root)
    assert install_gpu(root) == 3
    args = kernel_args(root)
    assert args == ["console=tty1", "console=ttyS0", "intel_iommu=on", "iommu=pt"]


def test_an_argument_already_in_etc_default_grub_is_not_repeated(make_tree: MakeTree) -> None:
    grub_text = 'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet intel_iommu=on"\nGRUB_CMDLINE_LINUX=""\n'

    def edit(desc: dict[str, Any]) -> None:
        desc["grub"] = grub_text

    root = make_tree("iommu-off", edit)
    assert install_gpu(root) == 3
    args = kernel_args(root)
    assert args.count("intel_iommu=on") == 1 and args.count("iommu=pt") == 1
    dropin = (root / "etc/default/grub.d/99-vectorlay-iommu.cfg").read_text()
    assert dropin.splitlines()[-1] == 'GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT iommu=pt"'


def test_an_argument_set_in_etc_default_grub_but_overridden_by_cloudimg_is_added(make_tree: MakeTree) -> None:
    def edit(desc: dict[str, Any]) -> None:
        desc["grub"] = 'GRUB_CMDLINE_LINUX_DEFAULT="quiet intel_iommu=on iommu=pt"\n'
        desc["files"] = {"/etc/default/grub.d/50-cloudimg-settings.cfg": CLOUDIMG}

    root = make_tree("iommu-off", edit)
    assert install_gpu(root) == 3
    args = kernel_args(root)
    assert args.count("intel_iommu=on") == 1 and args.count("iommu=pt") == 1


def test_no_drop_in_is_written_when_every_argument_is_already_there(make_tree: MakeTree) -> None:
    def edit(desc: dict[str, Any]) -> None:
        desc["grub"] = 'GRUB_CMDLINE_LINUX="intel_iommu=on"\nGRUB_CMDLINE_LINUX_DEFAULT="quiet iommu=pt"\n'

    root = make_tree("iommu-off", edit)
    install_gpu(root)
    assert not (root / "etc/default/grub.d/99-vectorlay-iommu.cfg").exists()
    assert kernel_args(root) == ["intel_iommu=on", "quiet", "iommu=pt"]


def test_amd_hosts_get_only_iommu_pt(make_tree: MakeTree) -> None:
    def edit(desc: dict[str, Any]) -> None:
        desc["cmdline"] = "BOOT_IMAGE=/boot/vmlinuz root=UUID=0b1e ro quiet splash"

    root = make_tree("amd-mi300x", edit)
    install_gpu(root)
    assert kernel_args(root) == ["quiet", "splash", "iommu=pt"]


SHELL_CASES = [
    'A="x y"\nGRUB_CMDLINE_LINUX_DEFAULT="$A ${A}z"\n',
    "GRUB_CMDLINE_LINUX_DEFAULT='quiet $HOME'  # comment\n",
    'GRUB_CMDLINE_LINUX_DEFAULT=quiet\\ splash; GRUB_CMDLINE_LINUX="a\\"b"\n',
    'GRUB_CMDLINE_LINUX_DEFAULT="one\ntwo"\nGRUB_CMDLINE_LINUX_DEFAULT+=" three"\n',
    'export GRUB_CMDLINE_LINUX_DEFAULT="exp"\nGRUB_CMDLINE_LINUX=`echo hi`\n',
    'GRUB_CMDLINE_LINUX_DEFAULT="a"\nGRUB_CMDLINE_LINUX_DEFAULT="b" true\n',
    'GRUB_CMDLINE_LINUX_DEFAULT="a \\\n b"\n'
    "GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`\n",
]


@pytest.mark.parametrize("text", SHELL_CASES)
def test_the_shell_evaluator_agrees_with_bash(tmp_path: Path, text: str) -> None:
    (tmp_path / "etc/default").mkdir(parents=True)
    (tmp_path / "etc/default/grub").write_text(text)
    expected = bash_effective(tmp_path)
    got = grub.effective_values(TreeHost(tmp_path))
    if "`echo hi`" in text:
        expected["GRUB_CMDLINE_LINUX"] = ""  # command substitutions are not run
    assert got == expected


def test_systemd_boot_hosts_are_blocked_and_nothing_is_written(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    def edit(desc: dict[str, Any]) -> None:
        desc["boot_loader"] = "systemd-boot"

    root = make_tree("iommu-off", edit)
    # /run is a tmpfs on a real box and holds the run lock; the run's log says what was refused.
    before = snapshot(root, skip=("run", "var/log"))
    assert install_gpu(root) == 1
    err = capsys.readouterr().err
    assert "boots with systemd-boot" in err and "nothing was written" in err
    assert "intel_iommu=on iommu=pt" in err and "/etc/kernel/cmdline" in err
    assert snapshot(root, skip=("run", "var/log")) == before


def test_an_unknown_boot_loader_is_blocked(make_tree: MakeTree, capsys: pytest.CaptureFixture[str]) -> None:
    def edit(desc: dict[str, Any]) -> None:
        desc["boot_loader"] = "none"

    root = make_tree("iommu-off", edit)
    # /run is a tmpfs on a real box and holds the run lock; the run's log says what was refused.
    before = snapshot(root, skip=("run", "var/log"))
    assert install_gpu(root) == 1
    assert "could not tell which boot loader" in capsys.readouterr().err
    assert snapshot(root, skip=("run", "var/log")) == before


def test_a_host_whose_running_kernel_already_has_the_args_is_not_blocked_by_its_loader(
    make_tree: MakeTree,
) -> None:
    def edit(desc: dict[str, Any]) -> None:
        desc["boot_loader"] = "systemd-boot"

    root = make_tree("gpu-shares-nic", edit)  # booted with intel_iommu=on iommu=pt
    host = TreeHost(root)
    assert grub.detect_loader(host).kind == "systemd-boot"
    assert install_gpu(root) in (0, 3)
    assert not (root / "etc/default/grub.d/99-vectorlay-iommu.cfg").exists()


def test_grub_mkconfig_is_used_when_update_grub_is_missing(make_tree: MakeTree) -> None:
    root = make_tree("iommu-off")
    (root / "usr/sbin/update-grub").unlink()
    tool = root / "usr/sbin/grub-mkconfig"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    loader = grub.detect_loader(TreeHost(root))
    assert loader.update == ("/usr/sbin/grub-mkconfig", "-o", "/boot/grub/grub.cfg")


def test_the_running_systemd_boot_efi_variable_wins_over_leftover_grub_files(make_tree: MakeTree) -> None:
    root = make_tree("iommu-off")
    var = root / grub.SYSTEMD_BOOT_EFIVAR.lstrip("/")
    var.parent.mkdir(parents=True)
    var.write_bytes(b"\x06\x00\x00\x00s\x00d\x00")
    assert grub.detect_loader(TreeHost(root)).kind == "systemd-boot"
