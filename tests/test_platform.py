"""The platform facts the installer acts on and the doctor explains, each defined once."""

from __future__ import annotations

from pathlib import Path

from bootstrap import platform
from bootstrap.host import TreeHost


def test_a_run_option_wins_over_node_yaml_and_detection_decides_last() -> None:
    assert platform.gpu_mode("container", "passthrough", has_gpus=True) == "container"
    assert platform.gpu_mode(None, "container", has_gpus=True) == "container"
    assert platform.gpu_mode(None, None, has_gpus=True) == "passthrough"
    assert platform.gpu_mode(None, "", has_gpus=False) == "none"


def test_os_release_reads_quoted_and_bare_values_and_the_family(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text(
        'PRETTY_NAME="Linux Mint 21"\nID=linuxmint\nVERSION_ID="21"\nID_LIKE="ubuntu debian"\n# comment\n'
    )
    rel = platform.os_release(TreeHost(tmp_path))
    assert (rel.id, rel.version_id, rel.pretty_name) == ("linuxmint", "21", "Linux Mint 21")
    assert rel.debian_family
    (tmp_path / "etc/os-release").write_text("ID=fedora\nVERSION_ID=40\n")
    assert not platform.os_release(TreeHost(tmp_path)).debian_family
    (tmp_path / "etc/os-release").unlink()
    assert platform.os_release(TreeHost(tmp_path)) == platform.OsRelease()


def test_amd_gets_no_amd_iommu_on_which_the_kernel_does_not_know() -> None:
    assert platform.iommu_args("amd") == ["iommu=pt"]
    assert platform.iommu_args("intel") == ["intel_iommu=on", "iommu=pt"]
    assert platform.iommu_args(None) == ["intel_iommu=on", "iommu=pt"]
