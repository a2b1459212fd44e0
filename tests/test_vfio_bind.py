from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap.cli import main
from bootstrap.commands.vfio_bind import run_bind
from bootstrap.discovery import UnitStatus, discover
from bootstrap.host import Host, RecordingRunner, TreeHost
from bootstrap.vfio import bind_all, reserved_addresses, select
from hostsim.host import SimHost
from hostsim.kernel import KernelSim, Services, install_handlers, simulated_host

MakeTree = Callable[..., Path]


def _driver(host: Host, addr: str) -> str | None:
    return host.readlink_name(f"/sys/bus/pci/devices/{addr}/driver")


def test_the_consumer_card_binds_all_four_functions_of_its_group(make_tree: MakeTree) -> None:
    host, sim, _ = simulated_host(make_tree("workstation-consumer"))
    result = run_bind(host, timeout=0.5)
    card = ["0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3"]
    assert result.ok
    assert result.bound == card
    for addr in card:
        assert _driver(host, addr) == "vfio-pci"
        assert host.read_text(f"/sys/bus/pci/devices/{addr}/driver_override") == "vfio-pci\n"
    # The root port of the group and the SATA controller outside it keep their drivers.
    assert _driver(host, "0000:00:01.0") == "pcieport"
    assert _driver(host, "0000:00:17.0") == "ahci"
    assert host.exists("/dev/vfio/1")
    unit = discover(host).units[0]
    assert unit.status is UnitStatus.READY
    # driver_override, unbind from the old driver, drivers_probe: never new_id.
    writes = [
        p for p, _ in sim.writes if p.endswith("01:00.0/driver_override") or "unbind" in p or "probe" in p
    ]
    assert "/sys/bus/pci/drivers/nvidia/unbind" in writes
    assert not any("new_id" in p for p, _ in sim.writes)


def test_the_hgx_binds_eight_gpus_and_four_nvswitches(make_tree: MakeTree) -> None:
    host, _sim, _ = simulated_host(make_tree("hgx-h100"))
    result = run_bind(host, timeout=0.5)
    inv = discover(host)
    assert result.ok
    assert len(result.bound) == 12
    assert sorted(result.bound) == sorted(d.address for d in inv.gpus + inv.nvswitches)
    assert all(d.driver == "vfio-pci" for d in inv.gpus + inv.nvswitches)
    # The ConnectX-7 NICs sit in groups of their own and are not GPU units: untouched.
    assert {_driver(host, f"0000:{0x19 + 16 * i:02x}:00.0") for i in range(8)} == {"mlx5_core"}
    assert all(u.status is UnitStatus.READY for u in inv.units + inv.nvswitch_units)


def test_the_nic_sharing_group_is_never_bound_and_the_reason_names_the_nic(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree("gpu-shares-nic")
    host, sim, _ = simulated_host(root)
    result = run_bind(host, timeout=0.5)
    assert result.bound == []
    assert result.already == ["0000:61:00.0"]
    assert [s.group for s in result.skipped] == ["20"]
    reason = result.skipped[0].reason
    assert "0000:42:00.0" in reason and "8086:1533" in reason and "igb" in reason
    assert _driver(host, "0000:41:00.0") == "nvidia"
    assert _driver(host, "0000:42:00.0") == "igb"
    assert not any("0000:41:00.0" in p or "0000:42:00.0" in p for p, _ in sim.writes)
    assert sim.writes == []


def test_the_vfio_bind_command_reports_the_unit_it_leaves_alone(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree("gpu-shares-nic")
    with pytest.raises(SystemExit) as e:
        main(["vfio-bind", "--root", str(root)])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "not bound: IOMMU group 20 also holds 0000:42:00.0" in out
    assert "0000:61:00.0: on vfio-pci" in out


def test_a_second_bind_run_writes_nothing(make_tree: MakeTree) -> None:
    host, sim, _ = simulated_host(make_tree("workstation-consumer"))
    assert run_bind(host, timeout=0.5).ok
    sim.writes.clear()
    again = run_bind(host, timeout=0.5)
    assert again.bound == [] and len(again.already) == 4
    assert sim.writes == []


def test_a_held_gpu_times_out_and_is_reported_instead_of_hanging(make_tree: MakeTree) -> None:
    host, sim, _ = simulated_host(make_tree("workstation-consumer"))
    release = threading.Event()
    sim.hang["0000:01:00.0"] = release
    try:
        result = run_bind(host, timeout=0.2)
    finally:
        release.set()
        for t in threading.enumerate():  # the unbind that was waiting finishes now
            if t.name.startswith("sysfs"):
                t.join(5)
    failed = dict(result.failed)
    assert "did not return within 0.2s" in failed["0000:01:00.0"]
    assert "reboot" in failed["0000:01:00.0"]
    assert set(result.bound) == {"0000:01:00.1", "0000:01:00.2", "0000:01:00.3"}


def test_a_bind_that_does_not_take_fails_loudly(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree("workstation-consumer")
    host = SimHost(root, RecordingRunner())
    sim = KernelSim(host).attach()
    sim.refuse.add("0000:01:00.2")
    install_handlers(host, Services())
    result = run_bind(host, timeout=0.1)
    assert dict(result.failed)["0000:01:00.2"].startswith("still on no driver after the bind")
    assert not result.ok


def test_nvidia_persistenced_is_stopped_before_taking_a_gpu_from_nvidia(make_tree: MakeTree) -> None:
    host, _sim, services = simulated_host(
        make_tree("workstation-consumer"), active={"nvidia-persistenced.service"}
    )
    run_bind(host, timeout=0.5)
    assert isinstance(host.runner, RecordingRunner)
    cmds = host.runner.commands
    stop = ("systemctl", "stop", "nvidia-persistenced.service")
    assert stop in cmds
    assert "nvidia-persistenced.service" not in services.active


def test_the_console_gpu_is_warned_about_before_it_is_bound(make_tree: MakeTree) -> None:
    host, _sim, _ = simulated_host(make_tree("workstation-consumer"))
    log: list[str] = []
    result = bind_all(host, discover(host), timeout=0.5, log=log.append)
    warning = next(i for i, m in enumerate(log) if "boot_vga=1" in m)
    first_bind = next(i for i, m in enumerate(log) if m.startswith("binding "))
    assert warning < first_bind
    assert "SSH, serial or IPMI" in result.warnings[0]


def test_vfio_pci_is_loaded_when_its_driver_is_missing(make_tree: MakeTree) -> None:
    host, _sim, _ = simulated_host(make_tree("workstation-consumer"))
    assert not host.path("/sys/bus/pci/drivers/vfio-pci").exists()
    assert run_bind(host, timeout=0.5).ok
    assert isinstance(host.runner, RecordingRunner)
    assert ("modprobe", "-a", "vfio", "vfio_pci", "vfio_iommu_type1") in host.runner.commands


def test_the_bind_service_refuses_with_the_iommu_off(make_tree: MakeTree) -> None:
    root = make_tree("iommu-off")
    with pytest.raises(SystemExit) as e:
        main(["vfio-bind", "--root", str(root)])
    assert e.value.code == 1


def test_a_wedged_gpu_is_not_touched_but_stays_reserved_for_after_the_power_cycle(
    make_tree: MakeTree,
) -> None:
    host = TreeHost(make_tree("wedged-gpu"))
    inv = discover(host)
    targets, skipped = select(inv)
    assert [t.address for t in targets] == ["0000:18:00.0"]
    assert "power-cycle" in skipped[0].reason
    assert reserved_addresses(inv) == ["0000:18:00.0", "0000:2a:00.0"]


def test_with_the_iommu_off_the_rule_reserves_the_gpus_and_their_slot_functions(make_tree: MakeTree) -> None:
    def edit(desc: dict[str, Any]) -> None:
        desc["iommu"] = False

    inv = discover(TreeHost(make_tree("workstation-consumer", edit)))
    assert reserved_addresses(inv) == ["0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3"]
