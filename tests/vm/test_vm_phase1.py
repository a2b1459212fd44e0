"""The product on a real kernel: emulated Intel IOMMU, stand-in GPUs, vfio-pci, the guest's own GRUB.

One guest serves the whole module (a boot costs about 20 s under TCG); tests run in file order and
each one that needs a particular boot brings the guest into it itself.
"""

from __future__ import annotations

import http.server
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    BASE_APPEND,
    BLOCKERS,
    BRIDGES,
    COMPANIONS,
    EXPECTED_STATUS_BEFORE_BINDING,
    IOMMU_ARGS,
    STAND_INS,
    TIMINGS,
    Vm,
)
from product import NODE_YAML, install_product

pytestmark = pytest.mark.vm

CONTROL_PLANE_NAME = "control-plane.vm.test"  # the guest's /etc/hosts maps it to 10.0.2.100


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    token = ""

    def do_GET(self) -> None:
        body = self.token.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def loopback_service() -> Iterator[tuple[int, str]]:
    """A plain HTTP service on this machine's loopback, standing in for the control plane."""
    token = secrets.token_hex(8)
    handler = type("Handler", (_TokenHandler,), {"token": token})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], token
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def node(make_vm: Callable[..., Vm], product_wheels: list[Path], loopback_service: tuple[int, str]) -> Vm:
    port, _ = loopback_service
    vm = make_vm(forwards={"10.0.2.100:80": ("127.0.0.1", port)})
    vm.boot()
    t0 = time.monotonic()
    install_product(vm, product_wheels, node_yaml=NODE_YAML)
    TIMINGS.add("product install in the guest (venv from the wheelhouse, offline)", time.monotonic() - t0)
    return vm


def ensure_boot(vm: Vm, *, append: str) -> None:
    """Reboot the guest by direct kernel boot with `append` unless its current boot already is that."""
    last = vm.boots[-1]
    if last.mode != "direct" or (last.append or f"{BASE_APPEND} {IOMMU_ARGS}") != append:
        vm.reboot(append=append)


def guest_groups(vm: Vm) -> dict[str, set[str]]:
    """IOMMU groups as the guest kernel lays them out, read with shell tools, not with the product."""
    out = vm.run('cd /sys/kernel/iommu_groups && for g in *; do ls $g/devices | sed "s/^/$g /"; done').check()
    groups: dict[str, set[str]] = {}
    for line in out.stdout.split("\n"):
        if line.strip():
            group, addr = line.split()
            groups.setdefault(group, set()).add(addr)
    return groups


def group_of(groups: dict[str, set[str]], address: str) -> str:
    (group,) = [g for g, members in groups.items() if address in members]
    return group


def detect(vm: Vm, env: dict[str, str] | None = None) -> dict[str, Any]:
    res = vm.run(["vectorlay-bootstrap", "detect", "--json"], timeout=120, env=env).check("detect --json")
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def driver_of(vm: Vm, address: str) -> str:
    return vm.run(f"basename $(readlink /sys/bus/pci/devices/{address}/driver) 2>/dev/null").stdout.strip()


def bind_to_vfio(vm: Vm, address: str) -> None:
    """The kernel's documented way to hand one function to vfio-pci, as the bind service will do it."""
    dev = f"/sys/bus/pci/devices/{address}"
    vm.run(
        f"modprobe vfio-pci && echo vfio-pci > {dev}/driver_override"
        f" && if [ -e {dev}/driver ]; then echo {address} > {dev}/driver/unbind; fi"
        f" && echo {address} > /sys/bus/pci/drivers_probe"
    ).check(f"binding {address} to vfio-pci")


def units_by_group(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {u["iommu_group"]: u for u in data["units"]}


def test_the_guest_boots_with_the_emulated_intel_iommu_and_the_planned_group_shapes(node: Vm) -> None:
    assert IOMMU_ARGS in node.cmdline()
    assert node.run("test -e /sys/class/iommu/dmar0 && test -e /sys/firmware/acpi/tables/DMAR").rc == 0
    groups = guest_groups(node)
    for unit in EXPECTED_STATUS_BEFORE_BINDING:
        gpus = {s.address for s in STAND_INS if s.unit == unit}
        expected = gpus | set(COMPANIONS.get(unit, ())) | set(BLOCKERS.get(unit, ()))
        if unit in BRIDGES:
            expected.add(BRIDGES[unit])
        (group,) = {group_of(groups, a) for a in gpus}
        assert groups[group] == expected, f"{unit}: group {group} holds {groups[group]}"


def test_the_guest_reaches_the_forwarded_loopback_service_and_nothing_else(
    node: Vm, loopback_service: tuple[int, str]
) -> None:
    port, token = loopback_service
    got = node.run(f"curl -sS --max-time 20 http://{CONTROL_PLANE_NAME}/token", timeout=60)
    assert got.rc == 0 and got.stdout == token, got
    # restrict=on: the same service straight through the user-network gateway stays out of reach.
    direct = node.run(f"curl -sS --max-time 5 http://10.0.2.2:{port}/token", timeout=60)
    assert direct.rc != 0 and token not in direct.stdout


def test_detect_lists_every_stand_in_gpu_with_its_real_group_and_status(node: Vm) -> None:
    ensure_boot(node, append=f"{BASE_APPEND} {IOMMU_ARGS}")
    groups = guest_groups(node)
    data = detect(node)
    print(json.dumps(data, indent=2))

    assert data["iommu"] == {"active": True, "groups": len(groups), "vendor": "intel"}
    gpus = {g["address"]: g for g in data["gpus"]}
    assert set(gpus) == {s.address for s in STAND_INS}
    for s in STAND_INS:
        g = gpus[s.address]
        assert (g["vendor_id"], g["device_id"]) == ("1234", "1111")
        assert g["class_id"] == ("030000" if s.device == "VGA" else "038000")
        assert g["driver"] == "bochs-drm"
        assert g["iommu_group"] == group_of(groups, s.address)

    units = units_by_group(data)
    assert len(units) == len(EXPECTED_STATUS_BEFORE_BINDING)
    for unit, status in EXPECTED_STATUS_BEFORE_BINDING.items():
        members = [s.address for s in STAND_INS if s.unit == unit]
        group = group_of(groups, members[0])
        u = units[group]
        assert u["status"] == status, (unit, u)
        assert sorted(u["gpus"]) == sorted(members)
        assert set(u["devices"]) == groups[group]
        assert u.get("blockers", []) == list(BLOCKERS.get(unit, ()))


def test_the_stand_ins_are_gpus_only_through_the_extra_vendor_setting(node: Vm) -> None:
    node.run("mv /etc/vectorlay/node.yaml /etc/vectorlay/node.yaml.off").check()
    try:
        assert detect(node)["gpus"] == []
        from_env = detect(node, env={"VECTORLAY_EXTRA_GPU_VENDOR_IDS": "1234"})
        assert {g["address"] for g in from_env["gpus"]} == {s.address for s in STAND_INS}
    finally:
        node.run("mv /etc/vectorlay/node.yaml.off /etc/vectorlay/node.yaml").check()


def test_the_doctor_runs_in_the_guest(node: Vm) -> None:
    res = node.run(["vectorlay-node-doctor", "--json"], timeout=300)
    print(f"rc={res.rc}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    assert res.rc != 127 and "Traceback" not in res.stderr, res
    report = json.loads(res.stdout)
    assert report["verdict"] in ("PASS", "WARN", "FAIL")
    assert res.rc == (1 if report["verdict"] == "FAIL" else 0)
    units = detect(node)["units"]
    assert report["gpu_units"] == {
        "ready": sum(1 for u in units if u["status"] == "ready"),
        "total": len(units),
    }
    assert {c["name"] for c in report["checks"]} >= {"kvm", "iommu", "gpu_units", "wedged", "disk", "memory"}


def test_a_manual_bind_moves_stand_ins_to_vfio_pci_and_makes_their_units_ready(node: Vm) -> None:
    ensure_boot(node, append=f"{BASE_APPEND} {IOMMU_ARGS}")
    groups = guest_groups(node)

    alone = next(s.address for s in STAND_INS if s.unit == "alone-root-port")
    group = group_of(groups, alone)
    assert driver_of(node, alone) == "bochs-drm"
    bind_to_vfio(node, alone)
    assert driver_of(node, alone) == "vfio-pci"
    assert node.run(f"test -c /dev/vfio/{group}").rc == 0
    assert units_by_group(detect(node))[group]["status"] == "ready"

    # A unit is ready only when every endpoint of its group is on vfio-pci, companions included.
    gpu = next(s.address for s in STAND_INS if s.unit == "with-companion-function")
    (companion,) = COMPANIONS["with-companion-function"]
    group = group_of(groups, gpu)
    bind_to_vfio(node, gpu)
    assert units_by_group(detect(node))[group]["status"] == "needs_binding"
    bind_to_vfio(node, companion)
    assert driver_of(node, companion) == "vfio-pci"
    assert node.run(f"test -c /dev/vfio/{group}").rc == 0
    assert units_by_group(detect(node))[group]["status"] == "ready"


PROBES = "/var/lib/vectorlay/unit-probes.json"


def probe_doctor(vm: Vm) -> dict[str, Any]:
    """`vectorlay-node-doctor --probe-units --json` in the guest: the probes, then the checks."""
    t0 = time.monotonic()
    res = vm.run(["vectorlay-node-doctor", "--probe-units", "--json"], timeout=300)
    TIMINGS.add("vectorlay-node-doctor --probe-units --json in the guest", time.monotonic() - t0)
    print(f"rc={res.rc}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    assert res.rc in (0, 1) and "Traceback" not in res.stderr, res
    report: dict[str, Any] = json.loads(res.stdout)
    return report


def probe_of(report: dict[str, Any], group: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [p for p in report["probes"] if p["unit"] == group]
    assert len(found) == 1, report["probes"]
    return found[0]


def guest_records(vm: Vm) -> dict[str, Any]:
    units: dict[str, Any] = json.loads(vm.get_file(PROBES))["units"]
    return units


def guest_probe_reason(vm: Vm, group: str, devices: list[str]) -> Any:
    """doctor.vmprobe.probe_reason on the guest's live root: what the unit model reads of the records."""
    code = (
        "import json, sys; from bootstrap.host import LiveHost; from doctor.vmprobe import probe_reason; "
        f"print(json.dumps(probe_reason(LiveHost(), {group!r}, {devices!r})))"
    )
    return json.loads(node_python(vm, code))


def node_python(vm: Vm, code: str) -> str:
    return vm.run(["/opt/vectorlay/venv/bin/python", "-c", code], timeout=120).check("python").stdout


def test_the_vm_attach_probe_starts_qemu_on_a_vfio_pci_unit_skips_a_rented_one_and_fails_a_broken_one(
    node: Vm,
) -> None:
    ensure_boot(node, append=f"{BASE_APPEND} {IOMMU_ARGS}")
    groups = guest_groups(node)
    alone = next(s.address for s in STAND_INS if s.unit == "alone-root-port")
    group = group_of(groups, alone)
    bind_to_vfio(node, alone)
    node.run(f"rm -f {PROBES}").check()
    # The guest is a TCG machine without /dev/kvm: the probe's QEMU falls back to TCG there.
    assert node.run("test -e /dev/kvm").rc != 0
    assert node.run("command -v qemu-system-x86_64").check().stdout.strip() == "/usr/bin/qemu-system-x86_64"

    # 1. QEMU opens the group, maps the BARs and the VM's memory through the vIOMMU, resets the
    # device and shows it on its PCI bus: attached, and recorded.
    report = probe_doctor(node)
    probe = probe_of(report, group)
    assert probe["outcome"] == "attached", probe
    assert probe["devices"] == [alone]
    assert probe["message"] == f"attached: QEMU opened group {group}, reset and listed 1 function(s)"
    record = guest_records(node)[group]
    assert record["ok"] is True and record["devices"] == [alone] and record["error"] is None
    assert node.run(f"stat -c %a {PROBES}").stdout.strip() == "644"
    assert guest_probe_reason(node, group, [alone]) is None
    ready = report["gpu_units"]["ready"]
    assert ready >= 1

    # 2. A renter's VM holds the group (a VFIO group is single-open): skipped, untouched, its record kept.
    holder = (
        node.run(
            f"setsid sh -c 'exec 3<>/dev/vfio/{group}; exec sleep 600' </dev/null >/dev/null 2>&1 & echo $!"
        )
        .check()
        .stdout.strip()
    )
    try:
        node.run(
            f"for i in $(seq 50); do ls -l /proc/{holder}/fd | grep -q /dev/vfio/{group} && exit 0; "
            "sleep 0.2; done; exit 1"
        ).check("the holder opening the group")
        busy = probe_of(probe_doctor(node), group)
        assert busy["outcome"] == "in_use", busy
        assert busy["message"] == f"in use, skipped (group {group} is held by a VM)"
        assert guest_records(node)[group] == record
        assert node.run(f"kill -0 {holder}").rc == 0
    finally:
        node.run(f"kill {holder}")

    # 3. The group made unusable (its /dev/vfio node gone): QEMU's own error and the hint, the
    # record says failed, the reader makes the unit not ready, and the unit is out of the count.
    dev = node.run(f"stat -c '%t %T' /dev/vfio/{group}").check().stdout.split()
    node.run(f"rm /dev/vfio/{group}").check()
    try:
        report = probe_doctor(node)
        failed = probe_of(report, group)
        assert failed["outcome"] == "failed", failed
        assert f"failed to open /dev/vfio/{group}: No such file or directory" in failed["error"]
        assert failed["error"].startswith(f"qemu-system-x86_64: -device vfio-pci,host={alone},id=probe0")
        assert failed["hint"].startswith("QEMU cannot use the unit's IOMMU group")
        rec = guest_records(node)[group]
        assert rec["ok"] is False and rec["error"] == failed["error"] and rec["hint"] == failed["hint"]
        assert report["gpu_units"]["ready"] == ready - 1
        code, message, hint = guest_probe_reason(node, group, [alone])
        assert code == "probe_failed" and message.startswith("VM-attach probe failed: qemu-system-x86_64:")
        assert hint == failed["hint"]
    finally:
        node.run(
            f"test -e /dev/vfio/{group} || mknod /dev/vfio/{group} c $((0x{dev[0]})) $((0x{dev[1]}))"
        ).check()

    # The group usable again: the next probe proves the unit again.
    again = probe_of(probe_doctor(node), group)
    assert again["outcome"] == "attached", again
    assert guest_records(node)[group]["ok"] is True

    # 4. A real failed reset: QEMU's VGA on the root bus has no FLR, no PM reset and no bus to reset
    # (its reset_method is empty), and QEMU says so. The existing rules still call it ready; the
    # probe's record is what keeps it out (doctor.vmprobe.probe_reason, read by the unit model).
    root_bus = next(s.address for s in STAND_INS if s.unit == "alone-root-bus")
    bind_to_vfio(node, root_bus)
    assert node.run(f"cat /sys/bus/pci/devices/{root_bus}/reset_method").stdout.strip() == ""
    report = probe_doctor(node)
    no_reset = probe_of(report, group_of(groups, root_bus))
    assert no_reset["outcome"] == "failed", no_reset
    assert no_reset["error"] == (
        f"qemu-system-x86_64: vfio: Cannot reset device {root_bus}, no available reset mechanism."
    )
    assert no_reset["hint"].startswith("the device could not be reset")
    assert probe_of(report, group)["outcome"] == "attached"
    code, message, _ = guest_probe_reason(node, group_of(groups, root_bus), [root_bus])
    assert code == "probe_failed" and "Cannot reset device" in message


def _kernel_turns_intel_iommu_on_by_default(vm: Vm) -> bool:
    config = vm.run("cat /boot/config-$(uname -r)").check().stdout
    return any(
        f"{opt}=y" in config.split("\n")
        for opt in ("CONFIG_INTEL_IOMMU_DEFAULT_ON", "CONFIG_INTEL_IOMMU_DEFAULT_ON_INTGPU_OFF")
    )


def test_without_iommu_arguments_the_kernels_own_default_decides(node: Vm) -> None:
    ensure_boot(node, append=BASE_APPEND)
    assert "intel_iommu" not in node.cmdline() and "iommu=" not in node.cmdline()
    default_on = _kernel_turns_intel_iommu_on_by_default(node)
    data = detect(node)
    # Debian 12's kernel enables an IOMMU the firmware describes unless told otherwise (Ubuntu
    # 22.04's does not): the product must read what the kernel did, not guess from the arguments.
    assert data["iommu"]["active"] is default_on
    # Bindings made by hand do not survive a reboot: that is what the boot-time bind service is for.
    assert {u["status"] for u in data["units"]} == (
        {"needs_binding", "not_isolatable"} if default_on else {"no_iommu"}
    )


def test_with_intel_iommu_off_the_iommu_is_inactive_and_every_unit_says_so(node: Vm) -> None:
    ensure_boot(node, append=f"{BASE_APPEND} intel_iommu=off")
    assert node.run("test -e /sys/firmware/acpi/tables/DMAR").rc == 0
    assert node.run("ls /sys/kernel/iommu_groups | wc -l").stdout.strip() == "0"
    data = detect(node)
    assert data["iommu"]["active"] is False and data["iommu"]["groups"] == 0
    assert len(data["gpus"]) == len(STAND_INS)
    assert {u["status"] for u in data["units"]} == {"no_iommu"}
    human = node.run(["vectorlay-bootstrap", "detect"], timeout=120).check().stdout
    assert "DMAR table present; not enabled by the kernel" in human


def test_a_boot_through_ovmf_and_the_guests_own_grub_takes_a_drop_ins_arguments(node: Vm) -> None:
    marker = f"vectorlay.vmtest={secrets.token_hex(4)}"
    node.put_file(
        "/etc/default/grub.d/99-test.cfg",
        f'GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT {IOMMU_ARGS} {marker}"\n',
    )
    t0 = time.monotonic()
    node.run("update-grub", timeout=300).check("update-grub")
    TIMINGS.add("update-grub in the guest", time.monotonic() - t0)
    grub_cfg = node.get_file("/boot/grub/grub.cfg").decode()
    assert any(marker in line for line in grub_cfg.splitlines() if line.strip().startswith("linux"))

    node.reboot(via_grub=True)
    cmdline = node.cmdline()
    assert cmdline.startswith("BOOT_IMAGE=/boot/vmlinuz-")
    # The marker exists only in the grub.cfg the guest's update-grub wrote: the harness passed nothing.
    assert f"{IOMMU_ARGS} {marker}" in cmdline
    assert node.run("test -d /sys/firmware/efi").rc == 0
    assert detect(node)["iommu"]["active"] is True
    node.run("rm /etc/default/grub.d/99-test.cfg && update-grub", timeout=300).check()
