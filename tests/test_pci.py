from __future__ import annotations

from pathlib import Path

from bootstrap.host import TreeHost
from bootstrap.pci import load_pci_ids, parse_lspci_nn

LSPCI = """\
0000:00:00.0 Host bridge [0600]: Intel Corporation Device [8086:09a2] (rev 04)
0000:18:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330] (rev a1)
0000:01:00.0 VGA compatible controller [0300]: NVIDIA Corporation TU102 [GeForce RTX 2080 Ti Rev. A] \
[10de:1e07] (rev a1) (prog-if 00 [VGA controller])
0000:05:00.0 Bridge [0680]: NVIDIA Corporation GH100 [H100 NVSwitch] [10de:22a3] (rev a1)
0001:00:00.0 Processing accelerators [1200]: Advanced Micro Devices, Inc. [AMD/ATI] Aqua Vanjaram \
[Instinct MI300X] [1002:74a1]
"""


def test_lspci_dnn_lines_parse_into_domain_qualified_lower_case_ids() -> None:
    entries = parse_lspci_nn(LSPCI)
    got = [(e.address, e.class_code, e.vendor_id, e.device_id, e.revision) for e in entries]
    assert got == [
        ("0000:00:00.0", "0600", "8086", "09a2", "04"),
        ("0000:18:00.0", "0302", "10de", "2330", "a1"),
        ("0000:01:00.0", "0300", "10de", "1e07", "a1"),
        ("0000:05:00.0", "0680", "10de", "22a3", "a1"),
        ("0001:00:00.0", "1200", "1002", "74a1", None),
    ]
    assert entries[1].description == "NVIDIA Corporation GH100 [H100 SXM5 80GB]"


def test_lspci_without_domain_assumes_domain_zero() -> None:
    (e,) = parse_lspci_nn("18:00.0 3D controller [0302]: NVIDIA Corporation Device [10de:2330] (rev a1)")
    assert e.address == "0000:18:00.0"


def test_pci_ids_scan_reads_device_names_and_skips_subsystems(tmp_path: Path) -> None:
    ids = tmp_path / "usr/share/hwdata/pci.ids"
    ids.parent.mkdir(parents=True)
    ids.write_text(
        "# comment\n10de  NVIDIA Corporation\n\t2330  GH100 [H100 SXM5 80GB]\n\t\t10de 16c1  H100 SXM5 80GB\n"
        "# a comment inside the block\n\t22a3  GH100 [H100 NVSwitch]\n"
        "10df  Emulex Corporation\n\t0720  OneConnect\n"
        "C 03  Display controller\n"
    )
    names = load_pci_ids(TreeHost(tmp_path), ["10de", "1002"])
    assert names.vendor("10de") == "NVIDIA Corporation"
    assert names.device("10de", "2330") == "GH100 [H100 SXM5 80GB]"
    assert names.device("10de", "22a3") == "GH100 [H100 NVSwitch]"
    assert names.device("10de", "16c1") is None
    assert names.vendor("10df") is None  # not asked for
    assert names.vendor("1002") is None


def test_no_pci_ids_file_means_no_names_not_an_error(tmp_path: Path) -> None:
    names = load_pci_ids(TreeHost(tmp_path), ["10de"])
    assert names.devices == {} and names.vendors == {}


def test_sysfs_names_that_only_look_like_addresses_or_group_numbers_are_not_devices(tmp_path: Path) -> None:
    """`$` matched before a final newline and str.isdigit() takes '²' for a digit (int() does not):
    a tree holding such names is read as if they were not there, never a crash."""
    from bootstrap.pci import iommu_groups, list_addresses

    devices = tmp_path / "sys/bus/pci/devices"
    for name in ("0000:00:01.0", "0000:00:02.0\n", "0000:00:03.0\n\n"):
        (devices / name).mkdir(parents=True)
    groups = tmp_path / "sys/kernel/iommu_groups"
    for name in ("7", "²", "7\n", "٣"):
        (groups / name / "devices").mkdir(parents=True)
    (groups / "7/devices/0000:00:01.0").mkdir()
    (groups / "7/devices/0000:00:02.0\n").mkdir()
    host = TreeHost(tmp_path)
    assert list_addresses(host) == ["0000:00:01.0"]
    assert iommu_groups(host) == {"7": ["0000:00:01.0"]}
