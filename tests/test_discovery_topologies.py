"""Every bundled topology yields the GPUs, NVSwitches and unit statuses a person would expect."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bootstrap.discovery import UnitStatus, discover
from bootstrap.host import Host, TreeHost
from bootstrap.settings import Settings

MakeHost = Callable[..., Host]


def _statuses(inv: Any) -> list[str]:
    return [u.status.value for u in inv.units]


def test_hgx_h100_on_nvidia_has_eight_gpus_four_nvswitches_all_needing_binding(make_host: MakeHost) -> None:
    inv = discover(make_host("hgx-h100"))
    assert [g.address for g in inv.gpus] == [f"0000:{b:02x}:00.0" for b in range(0x18, 0x98, 0x10)]
    assert {(g.vendor_id, g.device_id, g.class_id) for g in inv.gpus} == {("10de", "2330", "030200")}
    assert [n.address for n in inv.nvswitches] == [
        "0000:05:00.0",
        "0000:06:00.0",
        "0000:07:00.0",
        "0000:08:00.0",
    ]
    assert {n.device_id for n in inv.nvswitches} == {"22a3"}
    assert _statuses(inv) == ["needs_binding"] * 8
    assert [u.status for u in inv.nvswitch_units] == [UnitStatus.NEEDS_BINDING] * 4
    # ConnectX-7 NICs sit in their own groups; they are neither GPUs nor part of any unit.
    unit_members = {a for u in inv.units + inv.nvswitch_units for a in u.devices}
    assert not any(inv.devices[a].vendor_id == "15b3" for a in unit_members)
    assert inv.iommu.active and inv.iommu.vendor == "intel"
    assert inv.name("0000:18:00.0") == "GH100 [H100 SXM5 80GB]"


def test_hgx_h100_bound_to_vfio_pci_is_eight_ready_units(make_host: MakeHost) -> None:
    def bind(desc: dict[str, Any]) -> None:
        for d in desc["devices"]:
            if d["id"].startswith("10de:"):
                d["driver"] = "vfio-pci"

    inv = discover(make_host("hgx-h100", bind))
    assert _statuses(inv) == ["ready"] * 8
    assert [u.status for u in inv.nvswitch_units] == [UnitStatus.READY] * 4


def test_cloud_vm_a100_gpus_each_in_its_own_pci_domain(make_host: MakeHost) -> None:
    inv = discover(make_host("cloud-a100"))
    assert [g.address for g in inv.gpus] == [f"{d:04x}:00:00.0" for d in range(1, 9)]
    assert [n.address for n in inv.nvswitches] == [f"{d:04x}:00:00.0" for d in range(9, 15)]
    assert {n.device_id for n in inv.nvswitches} == {"1af1"}
    assert len(inv.units) == 8 and len({u.iommu_group for u in inv.units}) == 8
    assert inv.iommu.vendor == "amd"


def test_mi300x_processing_accelerators_are_gpus(make_host: MakeHost) -> None:
    inv = discover(make_host("amd-mi300x"))
    assert len(inv.gpus) == 8
    assert {(g.vendor_id, g.device_id, g.class_id) for g in inv.gpus} == {("1002", "74a1", "120000")}
    assert {g.driver for g in inv.gpus} == {"amdgpu"}
    assert _statuses(inv) == ["needs_binding"] * 8
    assert inv.nvswitches == []
    assert inv.name(inv.gpus[0].address) == "Aqua Vanjaram [Instinct MI300X]"


def test_consumer_card_unit_holds_all_four_functions_and_the_root_port(make_host: MakeHost) -> None:
    inv = discover(make_host("workstation-consumer"))
    assert [g.address for g in inv.gpus] == ["0000:01:00.0"]
    assert inv.gpus[0].boot_vga
    (unit,) = inv.units
    assert unit.status is UnitStatus.NEEDS_BINDING
    assert unit.devices == ("0000:00:01.0", "0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3")
    # The root port may stay on pcieport; the card's four functions must move to vfio-pci.
    assert unit.unbound == ("0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3")
    assert unit.blockers == ()


def test_consumer_card_on_vfio_pci_with_root_port_on_pcieport_is_ready(make_host: MakeHost) -> None:
    def bind(desc: dict[str, Any]) -> None:
        for d in desc["devices"]:
            if d["id"].startswith("10de:"):
                d["driver"] = "vfio-pci"

    (unit,) = discover(make_host("workstation-consumer", bind)).units
    assert unit.status is UnitStatus.READY


def test_gpu_sharing_its_group_with_a_nic_is_not_isolatable_and_names_the_nic(make_host: MakeHost) -> None:
    inv = discover(make_host("gpu-shares-nic"))
    by_group = {u.iommu_group: u for u in inv.units}
    assert by_group["20"].status is UnitStatus.NOT_ISOLATABLE
    assert by_group["20"].blockers == ("0000:42:00.0",)
    assert "I210" in inv.describe("0000:42:00.0") and "igb" in inv.describe("0000:42:00.0")
    assert by_group["30"].status is UnitStatus.READY


def test_wedged_gpu_is_found_by_its_live_config_space_not_its_cached_ids(make_host: MakeHost) -> None:
    inv = discover(make_host("wedged-gpu"))
    wedged = inv.devices["0000:2a:00.0"]
    assert (wedged.vendor_id, wedged.device_id) == ("10de", "2330")  # cached by sysfs
    assert wedged.wedged and wedged.power_state == "D3cold"
    assert [d.address for d in inv.wedged] == ["0000:2a:00.0"]
    assert _statuses(inv) == ["ready", "wedged"]


def test_cpu_only_host_has_no_gpus_and_no_units(make_host: MakeHost) -> None:
    inv = discover(make_host("cpu-only"))
    assert (inv.gpus, inv.nvswitches, inv.units) == ([], [], [])
    assert inv.iommu.active


def test_iommu_off_in_the_kernel_gives_no_iommu_units_and_keeps_the_firmware_table(
    make_host: MakeHost,
) -> None:
    inv = discover(make_host("iommu-off"))
    assert not inv.iommu.active and inv.iommu.groups == 0
    assert inv.iommu.firmware_table == "DMAR"
    assert [(u.iommu_group, u.status) for u in inv.units] == [(None, UnitStatus.NO_IOMMU)] * 2


def test_iommu_off_in_the_bios_has_no_firmware_table(make_host: MakeHost) -> None:
    def bios_off(desc: dict[str, Any]) -> None:
        desc["firmware_iommu"] = False

    inv = discover(make_host("iommu-off", bios_off))
    assert inv.iommu.firmware_table is None and inv.iommu.vendor is None


@pytest.mark.parametrize("vendor", ["8086", "1234"])
def test_a_deployment_can_count_further_vendors_as_gpus(make_host: MakeHost, vendor: str) -> None:
    def add(desc: dict[str, Any]) -> None:
        desc["devices"].append({"address": "0000:70:00.0", "id": f"{vendor}:0bd5", "class": "038000"})

    host = make_host("cpu-only", add)
    assert discover(host).gpus == []
    inv = discover(host, Settings(extra_gpu_vendor_ids=(vendor,)))
    assert [g.address for g in inv.gpus] == ["0000:70:00.0"]


def test_an_extra_nvswitch_device_id_from_settings_is_recognised(make_host: MakeHost) -> None:
    def add(desc: dict[str, Any]) -> None:
        desc["devices"].append({"address": "0000:70:00.0", "id": "10de:2324", "class": "068000"})

    host = make_host("cpu-only", add)
    assert discover(host).nvswitches == []
    assert len(discover(host, Settings(extra_nvswitch_device_ids=("2324",))).nvswitches) == 1


def test_a_recorded_tree_asks_no_command_for_names(make_tree: Callable[..., Any]) -> None:
    def no_ids(desc: dict[str, Any]) -> None:
        desc["pci_ids"] = False

    host = TreeHost(make_tree("gpu-shares-nic", no_ids))
    discover(host)
    assert host.runner.commands == []  # type: ignore[attr-defined]


def test_names_fall_back_to_lspci_when_pci_ids_lacks_them(make_tree: Callable[..., Any]) -> None:
    from bootstrap.host import CommandResult

    lspci = (
        "0000:41:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330] (rev a1)\n"
    )

    class GuestRunner:
        """Stands for a runner that really executes (the VM harness's), answering lspci."""

        executes = True

        def __init__(self) -> None:
            self.commands: list[tuple[str, ...]] = []

        def run(self, argv: Any, **kwargs: Any) -> CommandResult:
            self.commands.append(tuple(argv))
            return CommandResult(tuple(argv), 0, lspci if argv[0] == "lspci" else "")

    def no_ids(desc: dict[str, Any]) -> None:
        desc["pci_ids"] = False

    runner = GuestRunner()
    inv = discover(TreeHost(make_tree("gpu-shares-nic", no_ids), runner))
    assert runner.commands == [("lspci", "-Dnn")]
    assert inv.name("0000:41:00.0") == "NVIDIA Corporation GH100 [H100 SXM5 80GB]"
    assert inv.name("0000:61:00.0") == ""
