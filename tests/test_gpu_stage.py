from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from bootstrap.cli import main
from bootstrap.commands.install import run_install
from bootstrap.host import Host, RecordingRunner, TreeHost
from bootstrap.resources import units_dir
from hostsim import load_topology
from hostsim.kernel import simulated_host, simulated_reboot
from hostsim.snapshot import snapshot

MakeTree = Callable[..., Path]

HEADER = "# Managed by vectorlay-bootstrap\n"
DROPIN_COMMENT = (
    HEADER
    + "# IOMMU for GPU passthrough (vfio-pci). grub-mkconfig sources this after /etc/default/grub and the\n"
    "# other /etc/default/grub.d/*.cfg files (Ubuntu cloud images' 50-cloudimg-settings.cfg sets\n"
    "# GRUB_CMDLINE_LINUX_DEFAULT itself), so appending here is what reaches the kernel command line.\n"
    "# Arguments already present in those files are left out. `vectorlay-bootstrap uninstall` removes it.\n"
)
MODULES_LOAD = (
    HEADER + "# VFIO for GPU passthrough, loaded at boot before vectorlay-vfio-bind.service.\n"
    "vfio\nvfio_pci\nvfio_iommu_type1\n"
)
MODPROBE = (
    HEADER
    + "# vfio-pci loads before the GPU drivers, so it can claim the functions whose driver_override the\n"
    "# udev rule 99-vectorlay-vfio.rules set to vfio-pci before a host driver probes them.\n"
    "softdep nvidia pre: vfio-pci\n"
    "softdep nouveau pre: vfio-pci\n"
    "softdep amdgpu pre: vfio-pci\n"
    "softdep snd_hda_intel pre: vfio-pci\n"
    "# Idle GPUs stay out of D3cold: some never come back from it (the D3cold reset bug).\n"
    "options vfio-pci disable_idle_d3=1\n"
)
RULE_HEAD = (
    HEADER + "# Reserve the passthrough functions for vfio-pci the moment the kernel announces them, "
    "before any host\n"
    "# driver (nvidia, nouveau, amdgpu, snd_hda_intel) is probed for them. Matched by address, not by\n"
    "# vendor:device ID, so an identical card the operator keeps on the host is not taken.\n"
    "# vectorlay-vfio-bind.service verifies every bind later in the boot and repairs what did not take.\n"
)
WANTS = "etc/systemd/system/multi-user.target.wants/vectorlay-vfio-bind.service"
CONFIG = {
    "etc/default/grub.d/99-vectorlay-iommu.cfg",
    "etc/modules-load.d/vectorlay-vfio.conf",
    "etc/modprobe.d/vectorlay-vfio.conf",
    "etc/udev/rules.d/99-vectorlay-vfio.rules",
    "etc/initramfs-tools/hooks/vectorlay-vfio",
    "etc/systemd/system/vectorlay-vfio-bind.service",
    WANTS,
}


def rule(*addrs: str) -> str:
    lines = [
        f'ACTION=="add", SUBSYSTEM=="pci", KERNEL=="{a}", ATTR{{driver_override}}="vfio-pci"\n' for a in addrs
    ]
    return RULE_HEAD + "".join(lines)


def install(root: Path, host: Host | None = None, **kw: Any) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_install(root, only="gpu", host=host, **kw)
    return code, out.getvalue()


def files_changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {p for p, v in after.items() if v[0] != "dir" and (p not in before or before[p] != v)} | {
        p for p in before if p not in after
    }


def test_exact_files_on_an_intel_workstation(make_tree: MakeTree) -> None:
    root = make_tree("workstation-consumer")
    before = snapshot(root)
    code, _ = install(root)
    assert code == 3
    changed = files_changed(before, snapshot(root))
    assert changed == CONFIG | {
        "var/lib/vectorlay/state.json",
        "run/vectorlay/bootstrap.lock",
        "var/log/vectorlay/bootstrap.log",
    }
    etc = root / "etc"
    assert (etc / "default/grub.d/99-vectorlay-iommu.cfg").read_text() == (
        DROPIN_COMMENT + 'GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT intel_iommu=on iommu=pt"\n'
    )
    assert (etc / "modules-load.d/vectorlay-vfio.conf").read_text() == MODULES_LOAD
    assert (etc / "modprobe.d/vectorlay-vfio.conf").read_text() == MODPROBE
    assert (etc / "udev/rules.d/99-vectorlay-vfio.rules").read_text() == rule(
        "0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3"
    )
    unit = etc / "systemd/system/vectorlay-vfio-bind.service"
    assert unit.read_bytes() == (units_dir() / "vectorlay-vfio-bind.service").read_bytes()
    assert (root / WANTS).readlink() == Path("/etc/systemd/system/vectorlay-vfio-bind.service")
    hook = etc / "initramfs-tools/hooks/vectorlay-vfio"
    assert hook.stat().st_mode & 0o777 == 0o755
    assert [ln for ln in hook.read_text().splitlines() if ln.startswith("force_load")] == [
        "force_load vfio",
        "force_load vfio_pci",
        "force_load vfio_iommu_type1",
    ]
    subprocess.run(["sh", "-n", str(hook)], check=True)
    for p in CONFIG - {WANTS, "etc/initramfs-tools/hooks/vectorlay-vfio"}:
        assert (root / p).stat().st_mode & 0o777 == 0o644


def test_exact_files_on_an_amd_host(make_tree: MakeTree) -> None:
    root = make_tree("amd-mi300x")
    code, _ = install(root)
    assert code == 3
    etc = root / "etc"
    assert (etc / "default/grub.d/99-vectorlay-iommu.cfg").read_text() == (
        DROPIN_COMMENT + 'GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT iommu=pt"\n'
    )
    assert (etc / "modules-load.d/vectorlay-vfio.conf").read_text() == MODULES_LOAD
    assert (etc / "modprobe.d/vectorlay-vfio.conf").read_text() == MODPROBE
    gpus = [f"0000:{0x05 + 16 * i:02x}:00.0" for i in range(8)]
    assert (etc / "udev/rules.d/99-vectorlay-vfio.rules").read_text() == rule(*gpus)


def test_the_commands_run_in_order_and_are_only_recorded_against_a_tree(make_tree: MakeTree) -> None:
    root = make_tree("iommu-off")
    host = TreeHost(root)
    install(root, host=host)
    assert isinstance(host.runner, RecordingRunner)
    assert host.runner.render() == [
        "/usr/sbin/update-grub",
        "systemctl daemon-reload",
        "udevadm control --reload",
        "update-initramfs -u",
    ]


def test_plan_prints_diffs_and_writes_nothing(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree("workstation-consumer")
    before = snapshot(root)
    with pytest.raises(SystemExit) as e:
        main(["install", "--root", str(root), "--only", "gpu", "--plan"])
    assert e.value.code == 0
    assert snapshot(root) == before
    out = capsys.readouterr().out
    assert "+++ b/etc/default/grub.d/99-vectorlay-iommu.cfg" in out
    assert '+GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT intel_iommu=on iommu=pt"' in out
    assert '+ACTION=="add", SUBSYSTEM=="pci", KERNEL=="0000:01:00.3"' in out
    assert "changed  run      /usr/sbin/update-grub" in out
    assert "vectorlay-node: PLAN ONLY: nothing was changed" in out


def test_install_only_gpu_ends_with_exit_3_and_the_reboot_message(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree("iommu-off")
    with pytest.raises(SystemExit) as e:
        main(["install", "--root", str(root), "--only", "gpu"])
    assert e.value.code == 3
    out = capsys.readouterr().out
    assert "vectorlay-node: REBOOT REQUIRED" in out
    assert "left:\n    reboot, then re-run the same command\n" in out
    state = json.loads((root / "var/lib/vectorlay/state.json").read_text())
    assert state["reboot_requested_boot_id"] == "6f1c2d0e-0000-4000-8000-000000000001"
    assert state["stage"] == "gpu"


def test_the_reboot_message_shows_when_the_token_expires(make_tree: MakeTree) -> None:
    root = make_tree("iommu-off")
    expires = datetime.now(timezone.utc) + timedelta(minutes=42)
    code, out = install(root, token_expires_at=expires)
    assert code == 3
    hhmm = expires.astimezone().strftime("%H:%M")
    assert f"reboot, then re-run the same command within the hour (your token expires at {hhmm})" in out


def test_a_second_run_in_the_same_boot_writes_nothing_and_runs_nothing(make_tree: MakeTree) -> None:
    root = make_tree("iommu-off")
    assert install(root)[0] == 3
    before = snapshot(root, skip=("var/log",))
    host = TreeHost(root)
    code, out = install(root, host=host)
    assert code == 3
    assert snapshot(root, skip=("var/log",)) == before
    assert isinstance(host.runner, RecordingRunner) and host.runner.commands == []
    assert "0 to change" in out
    assert "BIOS" not in out


def test_a_live_iommu_host_binds_now_and_is_done_without_a_reboot(make_tree: MakeTree) -> None:
    root = make_tree("hgx-h100")
    host, _sim, _ = simulated_host(root)
    code, out = install(root, host=host)
    assert code == 0, out
    assert "gpu: 8/8 GPU unit(s) ready for passthrough" in out
    assert "systemctl restart vectorlay-vfio-bind.service" in out
    before = snapshot(root, skip=("var/log",))
    again, sim2, _ = simulated_host(root)
    code, out = install(root, host=again)
    assert code == 0
    assert snapshot(root, skip=("var/log",)) == before
    assert isinstance(again.runner, RecordingRunner) and again.runner.commands == []
    assert sim2.writes == []


def test_after_a_reboot_with_the_new_command_line_the_gpus_are_ready(make_tree: MakeTree) -> None:
    desc = load_topology("iommu-off")
    root = make_tree("iommu-off")
    host, _, _ = simulated_host(root)
    assert install(root, host=host)[0] == 3
    simulated_reboot(root, desc)
    cmdline = (root / "proc/cmdline").read_text()
    assert cmdline.split()[-3:] == ["splash", "intel_iommu=on", "iommu=pt"]
    host, sim, _ = simulated_host(root)
    code, out = install(root, host=host)
    assert code == 0, out
    assert "2/2 GPU unit(s) ready" in out
    assert sim.writes == []  # the udev rule already had them on vfio-pci at boot
    state = json.loads((root / "var/lib/vectorlay/state.json").read_text())
    assert state["reboot_requested_boot_id"] is None


@pytest.mark.parametrize(
    ("vendor", "hint"),
    [
        ("intel", "enable VT-x and VT-d in BIOS/UEFI, then reboot and re-run"),
        ("amd", "enable SVM and IOMMU (set to Enabled, not Auto) in BIOS/UEFI, then reboot and re-run"),
    ],
)
def test_a_rerun_after_a_reboot_with_the_iommu_still_off_names_the_bios_setting(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str], vendor: str, hint: str
) -> None:
    def edit(desc: dict[str, Any]) -> None:
        desc["cpu"]["vendor"] = vendor

    desc = load_topology("iommu-off")
    edit(desc)
    root = make_tree("iommu-off", edit)
    host, _, _ = simulated_host(root)
    assert install(root, host=host)[0] == 3
    simulated_reboot(root, desc, firmware_iommu=False)
    with pytest.raises(SystemExit) as e:
        main(["install", "--root", str(root), "--only", "gpu"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "the host rebooted but the IOMMU is still off" in err
    assert f"fix: {hint}" in err


def test_a_reboot_that_did_not_pick_up_the_grub_change_is_told_apart(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    desc = load_topology("iommu-off")
    root = make_tree("iommu-off")
    assert install(root)[0] == 3  # update-grub only recorded: grub.cfg is not regenerated
    simulated_reboot(root, desc)
    with pytest.raises(SystemExit) as e:
        main(["install", "--root", str(root), "--only", "gpu"])
    assert e.value.code == 1
    assert "kernel was started without intel_iommu=on" in capsys.readouterr().err


def test_a_builtin_vfio_pci_gets_its_option_on_the_kernel_line(make_tree: MakeTree) -> None:
    def edit(desc: dict[str, Any]) -> None:
        desc["builtin_modules"] = ["kernel/drivers/vfio/pci/vfio-pci.ko", "kernel/drivers/vfio/vfio.ko"]

    root = make_tree("iommu-off", edit)
    _, out = install(root)
    dropin = (root / "etc/default/grub.d/99-vectorlay-iommu.cfg").read_text().splitlines()[-1]
    assert dropin.endswith('intel_iommu=on iommu=pt vfio_pci.disable_idle_d3=1"')
    modprobe = (root / "etc/modprobe.d/vectorlay-vfio.conf").read_text()
    assert "options vfio-pci" not in modprobe and "softdep" not in modprobe
    modules = (root / "etc/modules-load.d/vectorlay-vfio.conf").read_text().splitlines()[2:]
    assert modules == ["vfio_iommu_type1"]
    assert "vfio-pci is built into the kernel" in out


def test_the_unit_passes_systemd_analyze_verify(make_tree: MakeTree) -> None:
    root = make_tree("iommu-off")
    install(root)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    exe = root / "opt/vectorlay/venv/bin/vectorlay-bootstrap"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    argv = ["systemd-analyze", "verify", f"--root={root}", "vectorlay-vfio-bind.service"]
    res = subprocess.run(argv, capture_output=True, text=True)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    # The check can fail: without the binary the unit does not verify.
    exe.unlink()
    res = subprocess.run(argv, capture_output=True, text=True)
    assert res.returncode != 0 and "vectorlay-bootstrap" in res.stderr


def test_a_full_run_without_a_control_plane_stops_at_preflight_and_says_what_to_pass(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree("cpu-only")
    with pytest.raises(SystemExit) as e:
        main(["install", "--root", str(root)])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert "error: no control plane URL" in captured.err
    assert "fix: pass api=https://..." in captured.err
    assert "vectorlay-node: BLOCKED" in captured.out
    assert "not run yet: detect, gpu, enroll" in captured.out


def test_container_mode_names_what_the_host_lacks_and_writes_nothing(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree("iommu-off")
    before = snapshot(root, skip=("run", "var/log"))
    with pytest.raises(SystemExit) as e:
        main(["install", "--root", str(root), "--only", "gpu", "--gpu-mode", "container"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert (
        "container-GPU mode (gpu=1) needs the NVIDIA kernel driver (nvidia module loaded) and Docker" in err
    )
    assert "ubuntu-drivers install" in err
    assert snapshot(root, skip=("run", "var/log")) == before


def test_container_mode_with_driver_docker_and_toolkit_changes_no_iommu_or_vfio_setting(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    def ready(desc: dict[str, Any]) -> None:
        desc["files"] = {
            "/sys/module/nvidia/version": "550.90.07\n",
            "/usr/bin/dockerd": "",
            "/usr/bin/nvidia-container-runtime-hook": "",
        }

    root = make_tree("iommu-off", ready)
    with pytest.raises(SystemExit) as e:
        main(["install", "--root", str(root), "--only", "gpu", "--gpu-mode", "container"])
    assert e.value.code == 0
    assert "container mode: 2 GPU(s) stay on the nvidia driver" in capsys.readouterr().out
    assert not (root / "etc/default/grub.d").exists()
    assert not (root / "etc/modprobe.d/vectorlay-vfio.conf").exists()


def test_a_bad_gpu_mode_is_a_usage_error(make_tree: MakeTree) -> None:
    root = make_tree("iommu-off")
    with pytest.raises(SystemExit) as e:
        main(["install", "--root", str(root), "--only", "gpu", "--gpu-mode", "vfio"])
    assert e.value.code == 2


def test_the_nic_sharing_unit_is_reported_and_does_not_hold_the_node_back(make_tree: MakeTree) -> None:
    root = make_tree("gpu-shares-nic")
    host, _, _ = simulated_host(root)
    code, out = install(root, host=host)
    assert code == 0, out
    assert "warning: IOMMU group 20 also holds 0000:42:00.0" in out
    assert "1/2 GPU unit(s) ready" in out
    rules = (root / "etc/udev/rules.d/99-vectorlay-vfio.rules").read_text()
    assert "0000:41:00.0" not in rules and "0000:42:00.0" not in rules
    assert "0000:61:00.0" in rules


def test_a_gpu_held_at_runtime_ends_in_a_reboot_and_the_boot_time_rule_takes_it(make_tree: MakeTree) -> None:
    desc = load_topology("workstation-consumer")
    root = make_tree("workstation-consumer")
    host, sim, services = simulated_host(root)
    services.bind_timeout = 0.2
    held = threading.Event()
    sim.hang["0000:01:00.0"] = held  # a display server keeps the console GPU open
    try:
        code, out = install(root, host=host)
    finally:
        held.set()
        for t in threading.enumerate():  # the unbind that was waiting finishes now
            if t.name.startswith("sysfs"):
                t.join(5)
    assert code == 3, out
    assert "systemctl restart vectorlay-vfio-bind.service failed (exit 1)" in out
    assert "0000:01:00.0: unbinding from nvidia did not return within 0.2s" in out
    assert "vectorlay-node: REBOOT REQUIRED" in out
    assert "left:\n    reboot, then re-run the same command\n" in out

    simulated_reboot(root, desc)
    host, sim, _ = simulated_host(root)
    code, out = install(root, host=host)
    assert code == 0, out
    assert "1/1 GPU unit(s) ready for passthrough" in out
    for fn in range(4):
        assert host.readlink_name(f"/sys/bus/pci/devices/0000:01:00.{fn}/driver") == "vfio-pci"


def test_only_detect_runs_detection_alone(make_tree: MakeTree, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tree("hgx-h100")
    before = snapshot(root, skip=("run", "var/log"))
    with pytest.raises(SystemExit) as e:
        main(["install", "--root", str(root), "--only", "detect"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "detect: 8 GPU(s), 4 NVSwitch(es), IOMMU active (intel), 0/8 GPU unit(s) ready" in out
    assert "gpu:" not in out
    assert snapshot(root, skip=("run", "var/log")) == before


def test_a_cli_run_whose_commands_were_only_recorded_can_be_rebooted_with_update_grub(
    make_tree: MakeTree, capsys: pytest.CaptureFixture[str]
) -> None:
    desc = load_topology("amd-mi300x")
    root = make_tree("amd-mi300x")
    assert install(root)[0] == 3
    simulated_reboot(root, desc, run_update_grub=True)
    assert (root / "proc/cmdline").read_text().split()[-1] == "iommu=pt"
    with pytest.raises(SystemExit) as e:
        main(["install", "--root", str(root), "--only", "gpu"])
    assert e.value.code == 0
    assert "8/8 GPU unit(s) ready for passthrough" in capsys.readouterr().out
