"""The VM-attach probe (bootstrap.vmprobe): the real qemu-system-x86_64 of this machine, its records,
the doctor's reading of them (doctor.vmprobe) and the verify stage on a host tree.

QEMU's messages are pinned against the installed binary itself: each cause's hint is tested on a
message whose format string `strings qemu-system-x86_64` shows (hw/vfio of QEMU 7.2, Debian 12).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bootstrap import vmprobe
from bootstrap.commands.doctor_port import doctor_port
from bootstrap.discovery import discover
from bootstrap.errors import VectorlayError
from bootstrap.host import LiveHost, RecordingRunner, TreeHost
from bootstrap.paths import IDENTITY_DIR, UNIT_PROBES
from bootstrap.settings import Settings
from bootstrap.stages import verify
from bootstrap.stages.contract import Context, Facts
from bootstrap.state import RunState
from bootstrap.vmprobe import Outcome, ProbeResult
from doctor import cli
from doctor.vmprobe import NOT_PROBED_HINT, probe_reason
from hostsim import build_host, load_topology
from tests.install.helpers import gpus_on_vfio

QEMU = shutil.which("qemu-system-x86_64")
# An address no machine has (bus 0x7f, device 0x1f, function 7 of domain 0x7ffe).
NOWHERE = "7ffe:7f:1f.7"


@pytest.fixture(scope="module")
def qemu_binary() -> bytes:
    assert QEMU is not None, "qemu-system-x86_64: not installed on this machine; `make deps` installs it"
    return Path(QEMU).read_bytes()


@pytest.mark.live
def test_a_device_that_does_not_exist_fails_with_qemus_own_error_and_the_gone_hint() -> None:
    r = vmprobe.probe_unit(LiveHost(), "4242", (NOWHERE,), timeout=20)
    assert r.outcome is Outcome.FAILED
    assert r.error is not None
    assert f"-device vfio-pci,host={NOWHERE},id=probe0: vfio /sys/bus/pci/devices/{NOWHERE}" in r.error
    assert "no such host device" in r.error
    assert r.hint == vmprobe.HINT_GONE
    assert r.message.startswith("QEMU could not attach the unit: qemu-system-x86_64: -device vfio-pci")


@pytest.mark.live
def test_qemu_started_with_no_device_answers_the_qmp_exchange_and_the_probe_passes() -> None:
    # No vfio device on this machine: the same command line, QMP greeting, capabilities, reset,
    # query-pci and quit against the real QEMU, with nothing to attach.
    r = vmprobe.probe_unit(LiveHost(), "4242", (), timeout=20)
    assert r.outcome is Outcome.ATTACHED, r
    assert r.error is None and r.hint is None


@pytest.mark.live
def test_the_qmp_client_reads_qemus_pci_bus_and_finds_a_device_by_its_id(tmp_path: Path) -> None:
    sock = str(tmp_path / "qmp.sock")
    argv = [*vmprobe.qemu_argv(LiveHost(), [], sock), "-device", "e1000,id=probe0"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        s = socket.socket(socket.AF_UNIX)
        for _ in range(200):
            try:
                s.connect(sock)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.05)
        qmp = vmprobe._Qmp(s, time.monotonic() + 20)
        qmp.greeting()
        qmp.execute("qmp_capabilities")
        assert qmp.execute("system_reset") == {}
        # QEMU's e1000 is Intel's 82540EM: 8086:100e.
        assert vmprobe._on_bus(qmp.execute("query-pci"))["probe0"] == (0x8086, 0x100E)
        with pytest.raises(vmprobe._QmpError, match="no-such-command"):
            qmp.execute("no-such-command")
        qmp.execute("quit")
        s.close()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.live
def test_past_the_deadline_qemu_is_killed_and_the_unit_fails_with_the_hang_hint() -> None:
    before = _qemu_pids()
    r = vmprobe.probe_unit(LiveHost(), "4242", (), timeout=0.0001)
    assert r.outcome is Outcome.FAILED
    assert r.error is not None and r.error.startswith("QEMU did not finish within 0.0001 s (killed)")
    assert r.hint == vmprobe.HINT_TIMEOUT
    assert _qemu_pids() <= before


def _qemu_pids() -> set[int]:
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "qemu-system-x86":
                    out.add(int(pid))
            except OSError:
                pass
    return out


@pytest.mark.live
def test_without_qemu_the_probe_says_it_cannot_run_and_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    r = vmprobe.probe_unit(LiveHost(), "4242", (NOWHERE,))
    assert r.outcome is Outcome.CANNOT_RUN
    assert r.message == "cannot run: qemu-system-x86_64 not found (package qemu-system-x86)"
    assert r.hint == "sudo apt-get install qemu-system-x86"


# (QEMU's message, its format string in the binary, the hint)
MESSAGES = [
    (
        "qemu-system-x86_64: -device vfio-pci,host=0000:18:00.0: vfio 0000:18:00.0: group 17 is not viable\n"
        "Please ensure all devices within the iommu_group are bound to their vfio bus driver.",
        "group %d is not viable",
        vmprobe.HINT_NOT_VIABLE,
    ),
    (
        "qemu-system-x86_64: -device vfio-pci,host=0000:18:00.0,id=probe0: vfio 0000:18:00.0: "
        "failed to open /dev/vfio/17: No such file or directory",
        "failed to open %s",
        vmprobe.HINT_NOT_VIABLE,
    ),
    (
        "qemu-system-x86_64: vfio: Cannot reset device 0000:18:00.0, no available reset mechanism.",
        "vfio: Cannot reset device %s, no available reset mechanism.",
        vmprobe.HINT_RESET,
    ),
    (
        "qemu-system-x86_64: vfio: Cannot reset device 0000:18:00.0, depends on group 9 which is not owned.",
        "vfio: Cannot reset device %s, depends on group %d which is not owned.",
        vmprobe.HINT_RESET,
    ),
    (
        "qemu-system-x86_64: -device vfio-pci,host=0000:18:00.0: vfio 0000:18:00.0: failed to setup "
        "container for group 17: memory listener initialization failed: Region pc.ram: "
        "vfio_dma_map(0x55d, 0x0, 0x8000000, 0x7f1) = -12 (Cannot allocate memory)",
        "vfio_dma_map(%p, 0x%lx, 0x%lx, %p) = %d (%m)",
        vmprobe.HINT_DMA,
    ),
    (
        "qemu-system-x86_64: Failed to mmap 0000:18:00.0 BAR 1. Performance may be slow",
        "Failed to mmap %s BAR %d. Performance may be slow",
        vmprobe.HINT_BAR,
    ),
    (
        f"qemu-system-x86_64: -device vfio-pci,host={NOWHERE}: vfio /sys/bus/pci/devices/{NOWHERE}: "
        "no such host device: No such file or directory",
        "no such host device",
        vmprobe.HINT_GONE,
    ),
]


@pytest.mark.parametrize(("message", "fmt", "hint"), MESSAGES, ids=[m[1][:40] for m in MESSAGES])
def test_each_cause_in_qemus_words_gets_its_hint(
    message: str, fmt: str, hint: str, qemu_binary: bytes
) -> None:
    assert fmt.encode() in qemu_binary, f"this QEMU no longer prints {fmt!r}"
    assert vmprobe.hint_for(message) == hint


def test_the_bar_hint_is_the_bios_setting() -> None:
    assert (
        "enable Above 4G decoding and large-BAR / MMIO above 4G settings in the BIOS/UEFI" in vmprobe.HINT_BAR
    )


def test_the_vfio_warnings_qemu_starts_past_are_fatal_to_the_unit(qemu_binary: bytes) -> None:
    for fmt in ("Cannot reset device", "Failed to mmap %s BAR"):
        assert fmt.encode() in qemu_binary
    assert vmprobe._FATAL_WARNINGS.search("Failed to mmap 0000:18:00.0 BAR 1. Performance may be slow")
    assert vmprobe._FATAL_WARNINGS.search(
        "vfio: Cannot reset device 0000:18:00.0, no available reset mechanism."
    )
    # QEMU repeats a reset failure at each machine reset: the error says it once.
    again = "qemu-system-x86_64: vfio: Cannot reset device 0000:00:01.0, no available reset mechanism.\n"
    assert vmprobe._errors_of(again * 4) == [again.strip()]
    # What QEMU says on a healthy start under KVM on some hosts is not a reason.
    assert (
        vmprobe._errors_of("qemu-system-x86_64: warning: host doesn't support requested feature: X\n") == []
    )


# --- the command line -------------------------------------------------------------------------------


def _hgx(tmp_path: Path, edit: Any = gpus_on_vfio) -> TreeHost:
    desc = load_topology("hgx-h100")
    edit(desc)
    return TreeHost(build_host(tmp_path / "tree", desc))


def test_the_command_line_attaches_every_function_and_sizes_the_64_bit_window_for_the_bars(
    tmp_path: Path,
) -> None:
    host = _hgx(tmp_path)
    gpu = host.path("/sys/bus/pci/devices/0000:18:00.0/resource")
    # An H100's BAR1: 128 GiB, 64-bit prefetchable memory (flags IORESOURCE_MEM | MEM_64 | PREFETCH).
    start = 0x2000_0000_0000
    lines = ["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 6
    lines[1] = f"0x{start:016x} 0x{start + (128 << 30) - 1:016x} 0x000000000014220c"
    gpu.write_text("\n".join(lines) + "\n")
    argv = vmprobe.qemu_argv(host, ["0000:18:00.0", "0000:18:00.1"], "/run/q.sock")
    assert argv[:1] == ["qemu-system-x86_64"]
    assert "-S" in argv and "-nodefaults" in argv
    assert argv[argv.index("-display") + 1] == "none"
    assert argv[argv.index("-qmp") + 1] == "unix:/run/q.sock,server=on,wait=off"
    assert argv[argv.index("-global") + 1] == f"q35-pcihost.pci-hole64-size={256 << 30}"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-device"] == [
        "vfio-pci,host=0000:18:00.0,id=probe0",
        "vfio-pci,host=0000:18:00.1,id=probe1",
    ]
    # The tree has /dev/kvm: KVM first, TCG where KVM fails.
    assert " ".join(argv).count("-accel") == 2 and "-accel kvm -accel tcg" in " ".join(argv)
    host.path("/dev/kvm").unlink()
    assert "kvm" not in vmprobe.qemu_argv(host, ["0000:18:00.0"], "/run/q.sock")


# --- records and their reading ----------------------------------------------------------------------


def _result(unit: str, outcome: Outcome, devices: tuple[str, ...] = ("0000:18:00.0",)) -> ProbeResult:
    failed = outcome is Outcome.FAILED
    return ProbeResult(
        unit,
        devices,
        outcome,
        "m",
        "qemu-system-x86_64: vfio: Cannot reset device 0000:18:00.0, no available reset mechanism."
        if failed
        else None,
        vmprobe.HINT_RESET if failed else None,
    )


def test_records_are_written_atomically_as_the_contract_says_and_in_use_keeps_the_last(
    tmp_path: Path,
) -> None:
    host = TreeHost(tmp_path)
    vmprobe.save_records(
        host, [_result("17", Outcome.ATTACHED), _result("3", Outcome.FAILED, ("0000:05:00.0",))]
    )
    path = host.path(UNIT_PROBES)
    assert path.stat().st_mode & 0o777 == 0o644
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert list(data["units"]) == ["3", "17"]
    rec = data["units"]["17"]
    assert (
        rec["devices"] == ["0000:18:00.0"]
        and rec["ok"] is True
        and rec["error"] is None
        and rec["hint"] is None
    )
    assert rec["at"].endswith("+00:00")
    assert data["units"]["3"]["ok"] is False
    assert data["units"]["3"]["error"].startswith("qemu-system-x86_64: vfio: Cannot reset device")
    vmprobe.save_records(
        host, [_result("17", Outcome.IN_USE), _result("3", Outcome.ATTACHED, ("0000:05:00.0",))]
    )
    data = json.loads(path.read_text())
    assert data["units"]["17"] == rec
    assert data["units"]["3"]["ok"] is True
    # A unit with no record that a VM holds is proven by that VM: it started with these devices.
    vmprobe.save_records(host, [_result("40", Outcome.IN_USE, ("0000:40:00.0",))])
    data = json.loads(path.read_text())
    assert data["units"]["40"]["ok"] is True and data["units"]["40"]["devices"] == ["0000:40:00.0"]
    assert data["units"]["17"] == rec


@pytest.mark.parametrize(
    "body",
    [
        "",
        "not json",
        "[]",
        '{"version": 2, "units": {}}',
        '{"version": 1, "units": {"17": {"devices": "0000:18:00.0", "ok": true, "at": "x"}}}',
        '{"version": 1, "units": {"17": {"devices": ["../../etc"], "ok": true, "at": "x"}}}',
        '{"version": 1, "units": {"17": {"devices": ["0000:18:00.0"], "ok": "yes", "at": "x"}}}',
        '{"version": 1, "units": {"../x": {"devices": ["0000:18:00.0"], "ok": true, "at": "x"}}}',
    ],
)
def test_a_garbled_record_proves_nothing(tmp_path: Path, body: str) -> None:
    host = TreeHost(tmp_path)
    path = host.path(UNIT_PROBES)
    path.parent.mkdir(parents=True)
    path.write_text(body)
    assert vmprobe.load_records(host) == {}


def _records(ok: bool, devices: list[str] | None = None) -> dict[str, Any]:
    return {
        "17": {
            "devices": devices or ["0000:18:00.0", "0000:18:00.1"],
            "ok": ok,
            "at": "2026-12-06T13:00:00+00:00",
            "error": None
            if ok
            else "qemu-system-x86_64: Failed to mmap 0000:18:00.0 BAR 1. Performance may be slow",
            "hint": None if ok else vmprobe.HINT_BAR,
        }
    }


DEVICES = ["0000:18:00.1", "0000:18:00.0"]


@pytest.mark.live
def test_on_a_live_host_a_unit_without_a_passing_record_of_its_devices_is_not_ready() -> None:
    live = LiveHost()
    assert probe_reason(live, "17", DEVICES, records={}) == (
        "not_probed",
        "no VM-attach probe has passed for this unit yet",
        NOT_PROBED_HINT,
    )
    assert probe_reason(live, "17", DEVICES, records=_records(True)) is None
    code, message, hint = probe_reason(live, "17", ["0000:18:00.0"], records=_records(True)) or ("", "", "")
    assert (code, hint) == ("not_probed", "sudo vectorlay-node-doctor --probe-units")
    assert message == "the unit's devices changed since its VM-attach probe"
    code, message, hint = probe_reason(live, "17", DEVICES, records=_records(False)) or ("", "", "")
    assert code == "probe_failed"
    assert message == "VM-attach probe failed: " + str(_records(False)["17"]["error"])
    assert message.endswith("Failed to mmap 0000:18:00.0 BAR 1. Performance may be slow")
    assert hint == vmprobe.HINT_BAR and len(hint) <= 200


def test_on_a_host_tree_only_a_record_in_the_tree_counts(tmp_path: Path) -> None:
    host = TreeHost(tmp_path)
    assert probe_reason(host, "17", DEVICES) is None
    path = host.path(UNIT_PROBES)
    path.parent.mkdir(parents=True)
    long_error = "qemu-system-x86_64: " + "x" * 600
    recs = _records(False)
    recs["17"]["error"] = long_error
    path.write_text(json.dumps({"version": 1, "units": recs}))
    code, message, hint = probe_reason(host, "17", DEVICES) or ("", "", "")
    assert code == "probe_failed" and len(message) == 200 and message.endswith("...")
    assert hint == vmprobe.HINT_BAR
    path.write_text(json.dumps({"version": 1, "units": _records(True)}))
    assert probe_reason(host, "17", DEVICES) is None


# --- the verify stage and the doctor on a host tree ---------------------------------------------------


def test_the_verify_stage_probes_every_ready_unit_before_the_verdict_recording_qemu(tmp_path: Path) -> None:
    host = _hgx(tmp_path)
    runner = host.runner
    assert isinstance(runner, RecordingRunner)
    lines: list[str] = []
    ctx = Context(host, Settings(), RunState(), out=lines.append, doctor=doctor_port())
    inventory = discover(host)
    sp = verify.plan(ctx, Facts(inventory=inventory))
    # The tree is not enrolled: the verdict fails, after the probes.
    with contextlib.suppress(VectorlayError):
        verify.apply(ctx, sp)
    qemu = [c for c in runner.commands if c[0] == "qemu-system-x86_64"]
    assert len(qemu) == len(inventory.units) == 8
    attached = sorted(
        a.split(",")[1].removeprefix("host=") for c in qemu for a in c if a.startswith("vfio-pci,")
    )
    assert attached == sorted(a for u in inventory.units for a in vmprobe.unit_devices(inventory, u))
    probe_lines = [line for line in lines if line.startswith("probe: ")]
    assert probe_lines[0] == f"probe: unit {inventory.units[0].iommu_group}: recorded, not run (host tree)"
    assert len(probe_lines) == 8
    # The probes come before the doctor's report.
    assert lines.index(probe_lines[-1]) < next(
        i for i, line in enumerate(lines) if "gpu_units" in line.lower() or "GPU units" in line
    )
    assert not host.path(UNIT_PROBES).exists()


def test_the_verify_stage_reports_to_the_control_plane_after_the_probes(tmp_path: Path) -> None:
    # Reported before them, every unit would reach the control plane as not probed, and none would
    # be advertised until the agent's next heartbeat.
    host = _hgx(tmp_path)
    host.path(IDENTITY_DIR).mkdir(parents=True)  # an enrolled node's directory: the stage reports
    lines: list[str] = []
    ctx = Context(host, Settings(), RunState(), out=lines.append, doctor=doctor_port())
    sp = verify.plan(ctx, Facts(inventory=discover(host)))
    with contextlib.suppress(VectorlayError):
        verify.apply(ctx, sp)
    probes = [i for i, line in enumerate(lines) if line.startswith("probe: ")]
    (report,) = [i for i, line in enumerate(lines) if line.startswith("node-agent: heartbeat")]
    assert probes and max(probes) < report, lines


def test_a_unit_with_a_passing_record_of_its_devices_is_not_probed_again(tmp_path: Path) -> None:
    host = _hgx(tmp_path)
    inventory = discover(host)
    first = inventory.units[0]
    vmprobe.save_records(
        host,
        [ProbeResult(first.iommu_group or "", vmprobe.unit_devices(inventory, first), Outcome.ATTACHED, "m")],
    )
    results = vmprobe.probe_units(host, inventory, unproven_only=True)
    assert [r.unit for r in results] == [u.iommu_group for u in inventory.units[1:]]
    assert all(r.outcome is Outcome.RECORDED for r in results)


def test_units_not_on_vfio_pci_are_not_probed(tmp_path: Path) -> None:
    host = _hgx(tmp_path, lambda desc: None)
    assert vmprobe.probe_units(host, discover(host)) == []
    assert not any(c[0] == "qemu-system-x86_64" for c in host.runner.commands)  # type: ignore[attr-defined]


def test_the_doctor_probe_units_json_lists_each_units_probe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = _hgx(tmp_path)
    cli.run(host.root, True, None, host=host, probe_units=True)
    data = json.loads(capsys.readouterr().out)
    assert len(data["probes"]) == 8
    first = data["probes"][0]
    assert set(first) == {"unit", "devices", "outcome", "message", "error", "hint", "seconds"}
    assert first["outcome"] == "recorded" and first["devices"] == ["0000:18:00.0"]
    assert data["gpu_units"]["total"] == 8
    cli.run(host.root, False, None, host=host, probe_units=True)
    text = capsys.readouterr().out
    assert "VM-attach probe: unit" in text and "recorded, not run (host tree)" in text


def test_a_failed_probe_record_keeps_its_unit_out_of_the_doctors_ready_count(tmp_path: Path) -> None:
    from doctor.checks import run_checks
    from doctor.render import to_json

    host = _hgx(tmp_path)
    inventory = discover(host)
    first = inventory.units[0]
    before = run_checks(host, env={})
    vmprobe.save_records(
        host,
        [_result(first.iommu_group or "", Outcome.FAILED, vmprobe.unit_devices(inventory, first))],
    )
    after = run_checks(host, env={})

    assert (after.units_ready, after.units_total) == (before.units_ready - 1, before.units_total)
    unit = next(u for u in to_json(after)["units"] if u["id"] == first.iommu_group)
    assert unit["status"] == "not_ready"
    assert [r["code"] for r in unit["reasons"]] == ["probe_failed"]
    assert "Cannot reset device 0000:18:00.0" in unit["reasons"][0]["message"]
    assert unit["reasons"][0]["hint"] == vmprobe.HINT_RESET
    # In text, the unit-wide reason is listed under its unit without a device in front (no "None:").
    (gpu_units,) = [r for r in after.results if r.name == "gpu_units"]
    shown = [ln for ln in gpu_units.details if "VM-attach probe failed" in ln]
    assert shown == [f"  {unit['reasons'][0]['message']} ({vmprobe.HINT_RESET})"], gpu_units.details
    # A passing record of the same devices gives the unit back.
    vmprobe.save_records(
        host, [_result(first.iommu_group or "", Outcome.ATTACHED, vmprobe.unit_devices(inventory, first))]
    )
    assert run_checks(host, env={}).units_ready == before.units_ready
