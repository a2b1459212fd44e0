from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap import grub, runsc
from bootstrap.errors import UsageError
from bootstrap.host import CommandResult, Host, RecordingRunner
from bootstrap.paths import RUNSC
from bootstrap.resources import units_dir
from doctor.checks import run_checks
from doctor.model import CheckResult, Status
from doctor.render import render_text
from hostsim.host import SimHost
from hostsim.runsc import NVPROXY, PRE_NVPROXY

GB = 1000**3
Make = Callable[..., Host]
MakeSim = Callable[..., SimHost]


def statuses(host: Host, **kw: Any) -> dict[str, Status]:
    return {r.name: r.status for r in run_checks(host, env={}, **kw).results}


def test_hgx_h100_bound_to_vfio_with_running_agents_passes_with_8_of_8_units(
    sim_host: Make, agents: Callable[..., None], vfio: Callable[[dict[str, Any]], None]
) -> None:
    host = sim_host("hgx-h100", vfio)
    agents(host)
    report = run_checks(host, env={})

    assert {r.name: r.status for r in report.results} == {
        "agents": Status.PASS,
        "autoupdate": Status.PASS,
        "kvm": Status.PASS,
        "iommu": Status.PASS,
        "gpu_units": Status.PASS,
        "wedged": Status.PASS,
        "disk": Status.PASS,
        "memory": Status.PASS,
        "identity": Status.SKIP,
        "overlay": Status.SKIP,
        "control_plane": Status.SKIP,
    }
    assert report.verdict is Status.PASS and report.exit_code == 0
    assert (report.units_ready, report.units_total) == (8, 8)
    assert report.get("gpu_units").message == "8/8 GPU unit(s) ready to rent"
    assert len(report.get("gpu_units").details) == 8
    assert all(d.endswith(": ready") for d in report.get("gpu_units").details)
    text = render_text(report)
    assert text.splitlines()[-1].startswith("Verdict: PASS")
    assert "8/8 GPU unit(s) ready to rent" in text


def test_hgx_h100_still_on_nvidia_has_0_of_8_units_and_the_restart_hint(
    sim_host: Make, agents: Callable[..., None]
) -> None:
    host = sim_host("hgx-h100")
    agents(host)
    report = run_checks(host, env={})
    units = report.get("gpu_units")

    assert units.status is Status.FAIL
    assert units.message == "0/8 GPU unit(s) ready to rent"
    assert units.hint == "sudo systemctl restart vectorlay-vfio-bind or re-run the bootstrap"
    assert "group 24: 0000:18:00.0 GH100 [H100 SXM5 80GB]: not on vfio-pci (0000:18:00.0 on nvidia)" in (
        units.details
    )
    assert (report.units_ready, report.units_total) == (0, 8)
    assert report.verdict is Status.FAIL and report.exit_code == 1
    text = render_text(report)
    line = next(ln for ln in text.splitlines() if "0/8 GPU unit(s) ready to rent" in ln)
    assert line.rstrip().endswith("FAIL (sudo systemctl restart vectorlay-vfio-bind or re-run the bootstrap)")


def test_a_wedged_gpu_names_its_address_and_withholds_only_its_unit(
    sim_host: Make, agents: Callable[..., None]
) -> None:
    host = sim_host("wedged-gpu")
    agents(host)
    report = run_checks(host, env={})
    wedged = report.get("wedged")

    # A WARN, not a FAIL: the verdict stays WARN so the control plane keeps renting the healthy unit.
    assert wedged.status is Status.WARN
    assert report.verdict is Status.WARN
    assert wedged.message == "GPU 0000:2a:00.0 fell off the bus (D3cold reset bug)"
    assert wedged.hint == "power-cycle the host; a soft reboot may not clear it"
    assert report.wedged == ("0000:2a:00.0",)
    # The healthy GPU still rents: one of two units.
    assert report.get("gpu_units").status is Status.WARN
    assert report.get("gpu_units").message == "1/2 GPU unit(s) ready to rent"
    assert "group 45: 0000:2a:00.0 GH100 [H100 SXM5 80GB]: WEDGED (fell off the bus)" in (
        report.get("gpu_units").details
    )


def test_wedged_gpus_leaving_no_unit_to_rent_are_a_fail(sim_host: Make, agents: Callable[..., None]) -> None:
    host = sim_host("wedged-gpu")
    agents(host)
    config = Path(host.root) / "sys/bus/pci/devices/0000:18:00.0/config"
    config.write_bytes(b"\xff\xff" + config.read_bytes()[2:])
    report = run_checks(host, env={})

    assert report.get("wedged").status is Status.FAIL
    assert report.get("wedged").message == "GPUs 0000:18:00.0, 0000:2a:00.0 fell off the bus (D3cold reset bug)"
    assert report.get("gpu_units").message == "0/2 GPU unit(s) ready to rent"
    assert report.verdict is Status.FAIL


XID_LINES = (
    "Nov 21 03:12:44 gpu7 kernel: NVRM: Xid (PCI:0000:2a:00): 79, pid='<unknown>', name=<unknown>, "
    "GPU has fallen off the bus.\n"
    "Nov 21 03:12:44 gpu7 kernel: vfio-pci 0000:2a:00.0: Unable to change power state from D3cold to D0, "
    "device inaccessible\n"
    "Nov 21 03:12:45 gpu7 kernel: NVRM: Xid (PCI:0000:18:00): 31, pid=4242, Ch 00000008, MMU Fault\n"
)


def test_the_wedged_check_quotes_the_kernel_log_lines_about_the_fall(
    sim_host: Make, agents: Callable[..., None]
) -> None:
    host = sim_host("wedged-gpu")
    agents(host)
    host.runner.handlers["journalctl"] = lambda h, argv: CommandResult(argv, 0, XID_LINES)  # type: ignore[attr-defined]
    wedged = run_checks(host, env={}, only=["wedged"]).get("wedged")

    assert wedged.status is Status.WARN  # the other GPU still rents
    assert len(wedged.details) == 2  # Xid 31 (an MMU fault) is not about falling off the bus
    assert "Xid (PCI:0000:2a:00): 79" in wedged.details[0]
    assert "Unable to change power state from D3cold to D0" in wedged.details[1]


def test_a_fall_seen_only_in_dmesg_warns_when_the_journal_is_empty(
    sim_host: Make, agents: Callable[..., None], vfio: Callable[[dict[str, Any]], None]
) -> None:
    host = sim_host("hgx-h100", vfio)
    handlers = host.runner.handlers  # type: ignore[attr-defined]
    handlers["journalctl"] = lambda h, argv: CommandResult(argv, 0, "-- No entries --\n")
    handlers["dmesg"] = lambda h, argv: CommandResult(argv, 0, "[ 12.5] " + XID_LINES.splitlines()[0])
    wedged = run_checks(host, env={}, only=["wedged"]).get("wedged")

    assert wedged.status is Status.WARN
    assert wedged.message == "kernel log reports a GPU falling off the bus this boot (1 line(s))"
    commands = host.runner.commands  # type: ignore[attr-defined]
    assert ("journalctl", "-k", "-b", "--no-pager", "-q") in commands and ("dmesg",) in commands


def test_a_gpu_sharing_its_group_with_a_nic_is_not_isolatable_and_names_the_nic(
    sim_host: Make, agents: Callable[..., None]
) -> None:
    host = sim_host("gpu-shares-nic")
    agents(host)
    units = run_checks(host, env={}).get("gpu_units")

    assert units.status is Status.WARN
    assert units.message == "1/2 GPU unit(s) ready to rent"
    assert units.details == (
        "group 20: 0000:41:00.0 GH100 [H100 SXM5 80GB]: not isolatable, shares its IOMMU group with "
        "0000:42:00.0 I210 Gigabit Network Connection [8086:1533] on igb",
        "group 30: 0000:61:00.0 GH100 [H100 SXM5 80GB]: ready",
    )
    assert units.hint is not None and "0000:42:00.0 I210 Gigabit Network Connection" in units.hint


def test_iommu_in_firmware_but_off_in_the_kernel_gets_the_kernel_hint(sim_host: Make) -> None:
    iommu = run_checks(sim_host("iommu-off"), env={}).get("iommu")

    assert iommu.status is Status.FAIL
    assert iommu.message == "IOMMU in firmware (DMAR) but not enabled by the kernel"
    assert iommu.hint is not None
    assert "the installer adds intel_iommu=on iommu=pt" in iommu.hint and "reboot" in iommu.hint
    assert "BIOS" not in iommu.hint


def _no_firmware_iommu(desc: dict[str, Any]) -> None:
    desc["firmware_iommu"] = False


def test_iommu_missing_from_firmware_gets_the_bios_hint(sim_host: Make) -> None:
    report = run_checks(sim_host("iommu-off", _no_firmware_iommu), env={})
    iommu = report.get("iommu")

    assert iommu.status is Status.FAIL
    assert iommu.message == "IOMMU off: no DMAR/IVRS ACPI table (disabled in BIOS/UEFI)"
    assert iommu.hint == "enable VT-x and VT-d in BIOS/UEFI, then reboot and re-run the install one-liner"
    assert report.get("gpu_units").message == "0/2 GPU unit(s) ready to rent"


def test_an_amd_host_without_ivrs_is_told_to_set_iommu_to_enabled_not_auto(sim_host: Make) -> None:
    def amd(desc: dict[str, Any]) -> None:
        _no_firmware_iommu(desc)
        desc["cpu"] = {"vendor": "amd", "count": 8}

    iommu = run_checks(sim_host("iommu-off", amd), env={}).get("iommu")
    assert iommu.hint is not None and "SVM and IOMMU (set to Enabled, not Auto)" in iommu.hint


def test_the_kernel_hint_follows_the_cpu_vendor_and_flags_a_foreign_option(sim_host: Make) -> None:
    def amd_with_intel_flag(desc: dict[str, Any]) -> None:
        desc["cpu"] = {"vendor": "amd", "count": 8}
        desc["cmdline"] = "BOOT_IMAGE=/boot/vmlinuz root=UUID=0b1e ro intel_iommu=on"

    iommu = run_checks(sim_host("iommu-off", amd_with_intel_flag), env={}).get("iommu")
    assert iommu.message == "IOMMU in firmware (IVRS) but not enabled by the kernel"
    # What the doctor says the installer adds is what the installer's GRUB drop-in carries.
    assert iommu.hint is not None and "the installer adds iommu=pt to the kernel" in iommu.hint
    assert grub.iommu_args("amd") == ["iommu=pt"] and "amd_iommu" not in iommu.hint
    assert "intel_iommu=on has no effect on this amd CPU" in iommu.details


def test_the_doctor_names_the_arguments_the_installer_writes_for_each_vendor(sim_host: Make) -> None:
    for vendor in ("intel", "amd"):

        def cpu(desc: dict[str, Any], vendor: str = vendor) -> None:
            desc["cpu"] = {"vendor": vendor, "count": 8}

        iommu = run_checks(sim_host("iommu-off", cpu), env={}).get("iommu")
        args = " ".join(grub.iommu_args(vendor))
        assert iommu.hint is not None and f"the installer adds {args} to the kernel" in iommu.hint


def test_iommu_disabled_on_the_command_line_is_named(sim_host: Make) -> None:
    def off(desc: dict[str, Any]) -> None:
        desc["cmdline"] = "BOOT_IMAGE=/boot/vmlinuz root=UUID=0b1e ro intel_iommu=off"

    iommu = run_checks(sim_host("iommu-off", off), env={}).get("iommu")
    assert iommu.status is Status.FAIL
    assert iommu.message.endswith("but disabled on the kernel command line (intel_iommu=off)")


@pytest.mark.parametrize(
    ("free", "status"),
    [
        (19_999_999_999, Status.FAIL),
        (20 * GB, Status.WARN),
        (49_999_999_999, Status.WARN),
        (50 * GB, Status.PASS),
    ],
)
def test_disk_warns_below_50_gb_and_fails_below_20_gb(sim_host: Make, free: int, status: Status) -> None:
    host = sim_host("cpu-only", disk_free=free)
    disk = run_checks(host, env={}, only=["disk"]).get("disk")
    assert disk.status is status
    assert disk.message.startswith(f"{free / GB:.1f} GB free at /var/lib/vectorlay")


def test_disk_is_measured_where_the_settings_put_vm_images(sim_host: Make) -> None:
    host = sim_host("cpu-only")
    host.path("/etc/vectorlay").mkdir(parents=True)
    host.path("/etc/vectorlay/node.yaml").write_text("disk_path: /srv/images\n")
    disk = run_checks(host, env={}, only=["disk"]).get("disk")
    assert disk.message == "500.0 GB free at /srv/images"


def test_disk_free_space_comes_from_the_filesystem_without_an_override(sim_host: MakeSim) -> None:
    import shutil

    host = sim_host("cpu-only")
    host.disk_free_override = None
    disk = run_checks(host, env={}, only=["disk"]).get("disk")
    # psutil measures the filesystem holding the tree (the nearest existing ancestor of the path).
    expected = shutil.disk_usage(host.root).free / GB
    assert abs(float(disk.message.split()[0]) - expected) < 1.0


@pytest.mark.parametrize(
    ("mem_total_kb", "status"),
    [
        (31_249_999, Status.FAIL),
        (31_250_000, Status.WARN),
        (62_499_999, Status.WARN),
        (62_500_000, Status.PASS),
    ],
)
def test_memory_fails_below_32_gb_and_warns_below_64_gb(
    sim_host: Make, mem_total_kb: int, status: Status
) -> None:
    host = sim_host("cpu-only")
    meminfo = host.path("/proc/meminfo")
    lines = meminfo.read_text().splitlines()
    lines[0] = f"MemTotal:       {mem_total_kb} kB"
    meminfo.write_text("\n".join(lines) + "\n")
    memory = run_checks(host, env={}, only=["memory"]).get("memory")
    assert memory.status is status
    assert memory.message.startswith(f"{mem_total_kb * 1024 / GB:.1f} GB RAM")


def test_a_cpu_only_node_skips_the_gpu_checks(sim_host: Make, agents: Callable[..., None]) -> None:
    host = sim_host("cpu-only")
    agents(host)
    report = run_checks(host, env={})
    for name in ("iommu", "gpu_units", "wedged"):
        assert report.get(name).status is Status.SKIP
        assert report.get(name).message == "no GPUs (CPU-only node)"
    assert report.mode == "none" and report.verdict is Status.PASS
    assert (report.units_ready, report.units_total) == (0, 0)


def test_a_box_not_yet_installed_fails_agents_with_the_install_one_liner(sim_host: Make) -> None:
    report = run_checks(sim_host("cpu-only"), env={})
    assert report.get("agents") == CheckResult(
        "agents", Status.FAIL, "vectorlay agents are not installed", "run the install one-liner"
    )
    assert report.get("autoupdate").status is Status.SKIP


def test_a_stopped_agent_fails_naming_it_with_a_restart_fix(
    sim_host: Make, agents: Callable[..., None]
) -> None:
    host = sim_host("cpu-only")
    agents(host)
    host.run(["systemctl", "stop", "nomad"])
    result = run_checks(host, env={}, only=["agents"]).get("agents")
    assert result.status is Status.FAIL
    assert result.message == "nomad is inactive"
    assert result.hint == "sudo systemctl restart nomad; if it fails again: journalctl -u nomad.service -n 50"


def test_agents_that_were_enabled_but_not_started_are_not_active(
    sim_host: Make, agents: Callable[..., None]
) -> None:
    host = sim_host("cpu-only")
    agents(host, start=False)
    result = run_checks(host, env={}, only=["agents"]).get("agents")
    assert result.message == "nebula is inactive, nomad is inactive, node-agent is inactive"


def test_a_missing_unit_file_fails_with_reinstall(sim_host: Make, agents: Callable[..., None]) -> None:
    host = sim_host("cpu-only")
    agents(host)
    host.path("/etc/systemd/system/nebula.service").unlink()
    result = run_checks(host, env={}, only=["agents"]).get("agents")
    assert (result.status, result.message) == (Status.FAIL, "unit(s) missing: nebula.service")


class _NoSystemd:
    """Commands that run on a machine not booted with systemd: systemctl's own words there
    (systemd's src/systemctl/systemctl-util.c, "System has not been booted with systemd as init
    system (PID 1). Can't operate.")."""

    executes = True

    def run(self, argv: Any, **_: Any) -> CommandResult:
        why = "System has not been booted with systemd as init system (PID 1). Can't operate."
        return CommandResult(tuple(argv), 1, "", why + "\nFailed to connect to bus: Host is down\n")


def test_a_machine_whose_systemd_does_not_answer_is_a_fail_not_a_pass(make_tree: Callable[..., Path]) -> None:
    from bootstrap.host import TreeHost

    host = TreeHost(make_tree("cpu-only"), _NoSystemd())
    for name in ("nebula.service", "nomad.service", "node-agent.service"):
        host.path(f"/etc/systemd/system/{name}").parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(units_dir() / name, host.path(f"/etc/systemd/system/{name}"))
    result = run_checks(host, env={}, only=["agents"]).get("agents")
    assert result.status is Status.FAIL
    assert (
        result.message == "cannot ask systemd about the agents: System has not been booted with systemd "
        "as init system (PID 1). Can't operate."
    )


def test_a_tree_whose_commands_are_recorded_skips_what_only_systemd_can_answer(
    make_host: Callable[..., Host],
) -> None:
    host = make_host("cpu-only")  # a plain RecordingRunner: systemctl answers nothing
    for name in ("nebula.service", "nomad.service", "node-agent.service"):
        host.path(f"/etc/systemd/system/{name}").parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(units_dir() / name, host.path(f"/etc/systemd/system/{name}"))
    result = run_checks(host, env={}, only=["agents"]).get("agents")
    assert result.status is Status.SKIP and "no systemd to ask" in result.message


def test_a_disabled_update_timer_warns_that_auto_update_is_off(
    sim_host: Make, agents: Callable[..., None]
) -> None:
    host = sim_host("cpu-only")
    agents(host)
    host.run(["systemctl", "disable", "--now", "node-agent-update.timer"])
    result = run_checks(host, env={}, only=["autoupdate"]).get("autoupdate")
    assert result.status is Status.WARN
    assert result.message == "auto-update is off: node-agent-update.timer is disabled"
    assert result.hint == "to turn it back on: sudo systemctl enable --now node-agent-update.timer"


def test_opting_out_with_node_agent_autoupdate_0_is_a_warning_saying_so(
    sim_host: Make, agents: Callable[..., None]
) -> None:
    host = sim_host("cpu-only")
    agents(host, timer=False)
    result = run_checks(host, env={"NODE_AGENT_AUTOUPDATE": "0"}, only=["autoupdate"]).get("autoupdate")
    assert result.status is Status.WARN
    assert result.message.startswith("auto-update opted out (NODE_AGENT_AUTOUPDATE=0)")


def test_opting_out_in_node_yaml_is_the_same_warning(sim_host: Make, agents: Callable[..., None]) -> None:
    host = sim_host("cpu-only")
    agents(host, timer=False)
    host.path("/etc/vectorlay").mkdir(parents=True)
    host.path("/etc/vectorlay/node.yaml").write_text("autoupdate: false\n")
    assert statuses(host, only=["autoupdate"]) == {"autoupdate": Status.WARN}


def test_a_missing_kvm_device_on_a_cpu_with_vmx_suggests_loading_the_module(sim_host: Make) -> None:
    host = sim_host("hgx-h100")
    host.path("/dev/kvm").unlink()
    kvm = run_checks(host, env={}, only=["kvm"]).get("kvm")
    assert (kvm.status, kvm.message) == (Status.FAIL, "/dev/kvm does not exist")
    assert kvm.hint is not None and kvm.hint.startswith("sudo modprobe kvm_intel")
    assert kvm.details == ("CPU flags: vmx",)


def test_a_missing_kvm_device_without_cpu_flags_points_at_the_bios(sim_host: Make) -> None:
    def no_virt(desc: dict[str, Any]) -> None:
        desc["kvm"] = False
        desc["cpu"] = {"vendor": "amd", "flags": ["fpu", "sse2"]}

    kvm = run_checks(sim_host("cpu-only", no_virt), env={}, only=["kvm"]).get("kvm")
    assert kvm.message == "/dev/kvm does not exist and the CPU shows no SVM"
    assert kvm.hint == "enable SVM (CPU virtualization) in BIOS/UEFI, then reboot"


def _container_mode(host: Host) -> None:
    host.path("/etc/vectorlay").mkdir(parents=True, exist_ok=True)
    host.path("/etc/vectorlay/node.yaml").write_text("gpu_mode: container\n")


def _install_runsc(host: Host, binary: Path) -> None:
    """What the artifacts stage leaves: the release's bin/runsc behind the `current` link."""
    release = host.path("/opt/vectorlay/releases/runsc/1/bin")
    release.mkdir(parents=True)
    # A copy, not a link: a tree resolves absolute links inside itself, as a chroot would.
    shutil.copy2(binary, release / "runsc")
    host.path("/opt/vectorlay/releases/runsc/current").symlink_to("1")
    assert host.path(RUNSC).is_file()


def test_container_mode_checks_the_nvidia_driver_and_runsc_instead_of_vfio(
    sim_host: Make, agents: Callable[..., None], runsc_releases: dict[str, Path]
) -> None:
    host = sim_host("hgx-h100")
    agents(host)
    _container_mode(host)
    host.path("/sys/module/nvidia").mkdir(parents=True)
    host.path("/sys/module/nvidia/version").write_text("550.90.07\n")
    _install_runsc(host, runsc_releases[NVPROXY])
    report = run_checks(host, env={})

    assert [r.name for r in report.results] == [
        "agents", "autoupdate", "kvm", "iommu", "gpu_units", "nvidia_driver", "runsc",
        "wedged", "disk", "memory", "identity", "overlay", "control_plane",
    ]  # fmt: skip
    assert report.mode == "container"
    assert report.get("iommu").status is Status.SKIP
    units = report.get("gpu_units")
    assert (units.status, units.message) == (
        Status.PASS,
        "8/8 GPU(s) on the nvidia driver, shared through runsc",
    )
    assert units.details[0] == "0000:18:00.0 GH100 [H100 SXM5 80GB]: on nvidia"
    assert (report.units_ready, report.units_total) == (8, 8)
    assert report.get("nvidia_driver").message == "NVIDIA driver 550.90.07 loaded"
    assert report.get("runsc").message == (
        "runsc 0.0~20240729.0 accepts --nvproxy=true; nvproxy supports driver 550.90.07"
    )
    assert report.verdict is Status.PASS


def test_the_runsc_check_fails_debian_12s_runsc_that_predates_nvproxy_naming_the_release_needed(
    sim_host: Make, runsc_releases: dict[str, Path]
) -> None:
    host = sim_host("hgx-h100")
    _container_mode(host)
    _install_runsc(host, runsc_releases[PRE_NVPROXY])
    result = run_checks(host, env={}, only=["runsc"]).get("runsc")
    assert result.status is Status.FAIL
    assert result.message == (
        "runsc 0.0~20221219.0 refuses --nvproxy=true (flag provided but not defined: -nvproxy)"
    )
    assert result.hint is not None and "gVisor release-20230529 or later" in result.hint


def test_the_runsc_check_fails_a_driver_the_installed_runscs_nvproxy_does_not_support(
    sim_host: Make, runsc_releases: dict[str, Path]
) -> None:
    host = sim_host("hgx-h100")
    _container_mode(host)
    host.path("/sys/module/nvidia").mkdir(parents=True)
    host.path("/sys/module/nvidia/version").write_text("550.127.05\n")  # newer than 20240729 knows
    _install_runsc(host, runsc_releases[NVPROXY])
    result = run_checks(host, env={}, only=["runsc"]).get("runsc")
    assert result.status is Status.FAIL
    assert result.message == (
        "runsc 0.0~20240729.0 has no nvproxy support for NVIDIA driver 550.127.05: "
        "GPU containers cannot start"
    )
    assert result.hint == (
        "install an NVIDIA driver it supports (newest: 550.54.14, 550.54.15, 550.90.07; all: runsc "
        "nvproxy list-supported-drivers), or the control plane must serve a runsc that supports 550.127.05"
    )


def test_the_runsc_check_runs_exactly_the_arguments_docker_is_given(
    sim_host: Make, runsc_releases: dict[str, Path]
) -> None:
    host = sim_host("hgx-h100")
    _container_mode(host)
    _install_runsc(host, runsc_releases[NVPROXY])
    run_checks(host, env={}, only=["runsc"])
    runner, docker_args = host.runner, runsc.docker_runtime()["runtimeArgs"]
    assert isinstance(runner, RecordingRunner) and isinstance(docker_args, list)
    assert runner.commands == [(RUNSC, *docker_args, "--version")]


def test_container_mode_without_driver_or_runsc_fails_both(sim_host: Make) -> None:
    host = sim_host("hgx-h100")
    _container_mode(host)
    # A runsc elsewhere (the old guess, Debian's package) is not the one docker runs.
    stale = host.path("/opt/vectorlay/bin/runsc")
    stale.parent.mkdir(parents=True)
    stale.write_text("#!/bin/sh\necho runsc version 1\n")
    stale.chmod(0o755)
    report = run_checks(host, env={}, only=["nvidia_driver", "runsc"])
    assert {r.name: r.status for r in report.results} == {"nvidia_driver": Status.FAIL, "runsc": Status.FAIL}
    assert report.get("runsc").message == f"runsc (gVisor) not installed at {RUNSC}"


def test_container_mode_warns_about_gpus_left_on_vfio(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None]
) -> None:
    host = sim_host("hgx-h100", vfio)
    _container_mode(host)
    host.path("/sys/module/nvidia").mkdir(parents=True)
    report = run_checks(host, env={}, only=["nvidia_driver", "gpu_units"])
    result = report.get("nvidia_driver")
    assert result.status is Status.WARN
    assert result.message.startswith("NVIDIA driver loaded, but 8 GPU(s) not on it: 0000:18:00.0 on vfio-pci")
    # Re-running the installer changes nothing for a GPU on vfio-pci: the hint says what does.
    assert result.hint is not None and result.hint.startswith("GPUs on vfio-pci are set up for passthrough")
    units = report.get("gpu_units")
    assert (units.status, units.message) == (
        Status.FAIL,
        "0/8 GPU(s) on the nvidia driver, shared through runsc",
    )
    assert units.hint == result.hint
    assert (report.units_ready, report.units_total) == (0, 8)


def test_container_mode_rents_the_gpus_on_nvidia_and_warns_about_the_rest(sim_host: Make) -> None:
    host = sim_host("hgx-h100")
    _container_mode(host)
    host.path("/sys/module/nvidia").mkdir(parents=True)
    gpu = host.path("/sys/bus/pci/devices/0000:18:00.0/driver", follow=False)
    gpu.unlink()  # the driver let go of one GPU
    report = run_checks(host, env={}, only=["gpu_units"])
    units = report.get("gpu_units")
    assert (units.status, units.message) == (
        Status.WARN,
        "7/8 GPU(s) on the nvidia driver, shared through runsc",
    )
    assert "0000:18:00.0 GH100 [H100 SXM5 80GB]: on no driver, not on nvidia" in units.details
    assert units.hint is not None and "sudo modprobe nvidia" in units.hint
    assert (report.units_ready, report.units_total) == (7, 8)


def test_gpu_mode_none_skips_gpu_checks_on_a_gpu_box(sim_host: Make) -> None:
    host = sim_host("hgx-h100")
    host.path("/etc/vectorlay").mkdir(parents=True)
    host.path("/etc/vectorlay/node.yaml").write_text("gpu_mode: none\n")
    report = run_checks(host, env={})
    assert report.get("gpu_units").message == "GPU mode is none: the node serves no GPUs"
    assert report.get("gpu_units").status is Status.SKIP


def test_only_runs_the_named_checks_in_their_usual_order(sim_host: Make) -> None:
    report = run_checks(sim_host("cpu-only"), env={}, only=["memory", "kvm", "disk"])
    assert [r.name for r in report.results] == ["kvm", "disk", "memory"]


def test_an_unknown_check_name_is_a_usage_error(sim_host: Make) -> None:
    with pytest.raises(UsageError, match="unknown check"):
        run_checks(sim_host("cpu-only"), env={}, only=["kvm", "gpus"])


def test_a_warn_or_fail_without_a_hint_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="needs a hint"):
        CheckResult("disk", Status.WARN, "low")


def test_agents_installed_without_the_update_timer_fail_autoupdate(
    sim_host: Make, agents: Callable[..., None]
) -> None:
    host = sim_host("cpu-only")
    agents(host)
    host.path("/etc/systemd/system/node-agent-update.timer").unlink()
    result = run_checks(host, env={}, only=["autoupdate"]).get("autoupdate")
    assert (result.status, result.message) == (Status.FAIL, "node-agent-update.timer is not installed")
    assert result.hint == "re-run the install one-liner"
