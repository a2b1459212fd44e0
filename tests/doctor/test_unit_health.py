"""Per-unit health from sysfs (issue 20): on HGX H100 trees laid out as the kernel lays out sysfs, each
fault a provider loses money on shows as the right unit status, reason and hint, in the text, the JSON
and the Prometheus output alike.

The files and their format are the kernel's: Documentation/ABI/testing/sysfs-bus-pci
(current_link_speed/width, max_link_speed/width, reset_method) and
Documentation/ABI/testing/sysfs-bus-pci-devices-aer (aer_dev_correctable/nonfatal/fatal: "NAME COUNT"
lines ending with TOTAL_ERR_COR / TOTAL_ERR_NONFATAL / TOTAL_ERR_FATAL).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bootstrap.discovery import discover
from bootstrap.enrolled import EnrolledGpu, read_enrolled, write_enrolled
from bootstrap.host import Host
from bootstrap.paths import ENROLLED_GPUS, UNIT_HEALTH_STATE
from doctor.checks import run_checks
from doctor.model import Report, Status
from doctor.render import render_json, render_prometheus, render_text
from doctor.units import parse_aer
from hostsim import inject

Make = Callable[..., Host]
GPU = "0000:18:00.0"  # the first H100 of the hgx-h100 tree, alone in IOMMU group 24
UNIT = "24"
P = "vectorlay_node_doctor"


def _hgx(sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]) -> Host:
    host = sim_host("hgx-h100", vfio)
    agents(host)
    return host


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _unit(report: Report, uid: str = UNIT) -> dict[str, Any]:
    units = json.loads(render_json(report))["units"]
    return next(u for u in units if u["id"] == uid)


def _shown(report: Report, status: str, code: str, message: str, hint: str) -> None:
    """The unit has `status` and the reason (code, message, hint) in JSON, text and Prometheus."""
    unit = _unit(report)
    assert unit["status"] == status
    reason = next(r for r in unit["reasons"] if r["code"] == code)
    assert reason == {"code": code, "device": GPU, "message": message, "hint": hint}
    text = render_text(report)
    word = status.replace("_", " ")
    assert f"group {UNIT}: {GPU} GH100 [H100 SXM5 80GB]: {word}" in text
    assert f"  {GPU}: {message} ({hint})" in text
    samples = _samples(render_prometheus(report, now=0))
    assert samples[(f"{P}_unit_ready", (("unit", UNIT),))] == (0 if status == "not_ready" else 1)
    for s in ("ready", "degraded", "not_ready"):
        assert samples[(f"{P}_unit_status", (("status", s), ("unit", UNIT)))] == (1 if s == status else 0)


def test_a_healthy_hgx_has_eight_ready_units_with_full_links_no_errors_and_reset_methods(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]
) -> None:
    report = run_checks(_hgx(sim_host, vfio, agents), env={})
    assert report.get("gpu_units").status is Status.PASS
    units = json.loads(render_json(report))["units"]
    assert [u["status"] for u in units] == ["ready"] * 8
    assert all(u["reasons"] == [] for u in units)
    samples = _samples(render_prometheus(report, now=0))
    assert samples[(f"{P}_unit_link_width", (("device", GPU), ("unit", UNIT)))] == 16
    assert samples[(f"{P}_unit_link_max_width", (("device", GPU), ("unit", UNIT)))] == 16
    for severity in ("correctable", "nonfatal", "fatal"):
        key = (f"{P}_unit_aer_errors_total", (("device", GPU), ("severity", severity), ("unit", UNIT)))
        assert samples[key] == 0


def test_a_link_at_x8_of_x16_degrades_the_unit_which_is_still_rented_with_a_warning(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]
) -> None:
    host = _hgx(sim_host, vfio, agents)
    inject.train_link(host.root, GPU, width=8)
    report = run_checks(host, env={})
    _shown(
        report,
        "degraded",
        "link_degraded",
        "PCIe link x8 of x16 (32.0 GT/s of 32.0 GT/s)",
        "reseat the card or its riser, or move it to a full-width slot",
    )
    units = report.get("gpu_units")
    assert (units.status, units.message) == (Status.WARN, "8/8 GPU unit(s) ready to rent (1 degraded)")
    assert units.hint == f"unit {UNIT}, {GPU}: reseat the card or its riser, or move it to a full-width slot"
    data = json.loads(render_json(report))
    assert data["gpu_units"] == {"ready": 8, "total": 8}
    assert _unit(report)["devices"][0]["link"] == {
        "speed": "32.0 GT/s",
        "width": 8,
        "max_speed": "32.0 GT/s",
        "max_width": 16,
    }
    samples = _samples(render_prometheus(report, now=0))
    assert samples[(f"{P}_unit_link_width", (("device", GPU), ("unit", UNIT)))] == 8
    assert samples[(f"{P}_unit_link_max_width", (("device", GPU), ("unit", UNIT)))] == 16
    assert report.verdict is Status.WARN


def test_a_gen1_link_on_a_gen5_device_degrades_the_unit_and_points_at_the_bios(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]
) -> None:
    host = _hgx(sim_host, vfio, agents)
    inject.train_link(host.root, GPU, speed="2.5 GT/s PCIe")
    report = run_checks(host, env={})
    _shown(
        report,
        "degraded",
        "link_degraded",
        "PCIe link x16 of x16 (2.5 GT/s of 32.0 GT/s): Gen1 on a Gen5 device",
        "set the slot's PCIe link speed to Auto (or the card's Gen) in BIOS/UEFI, then reseat the card "
        "or its riser; a GPU in use may slow its link while idle",
    )
    assert _unit(report)["devices"][0]["link"]["speed"] == "2.5 GT/s"


def test_growing_fatal_aer_counters_make_the_unit_not_ready_until_they_stop_growing(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]
) -> None:
    host = _hgx(sim_host, vfio, agents)
    run_checks(host, env={}, record=True)  # the node-agent's run: the baseline, all zero
    assert host.path(UNIT_HEALTH_STATE).is_file()
    inject.add_aer_errors(host.root, GPU, "fatal", "DLP", 2)
    report = run_checks(host, env={}, record=True)
    hint = (
        "power-cycle the host (a soft reboot may not clear it); if they come back, reseat the card "
        "or its riser, then RMA the GPU"
    )
    _shown(
        report, "not_ready", "aer_fatal", "2 fatal PCIe AER error(s) since the last run (2 since boot)", hint
    )
    units = report.get("gpu_units")
    assert (units.status, units.message) == (Status.WARN, "7/8 GPU unit(s) ready to rent")
    assert units.hint == f"unit {UNIT}, {GPU}: {hint}"
    assert json.loads(render_json(report))["gpu_units"] == {"ready": 7, "total": 8}
    samples = _samples(render_prometheus(report, now=0))
    assert (
        samples[(f"{P}_unit_aer_errors_total", (("device", GPU), ("severity", "fatal"), ("unit", UNIT)))] == 2
    )

    # They grow again: still not ready; then they stop: the unit is ready again (the contract's
    # "grew since the last run").
    inject.add_aer_errors(host.root, GPU, "fatal", "SDES")
    again = _unit(run_checks(host, env={}, record=True))
    assert again["status"] == "not_ready"
    assert again["reasons"][0]["message"] == "1 fatal PCIe AER error(s) since the last run (3 since boot)"
    assert _unit(run_checks(host, env={}, record=True))["status"] == "ready"


def test_fatal_errors_on_first_sight_count_and_a_run_that_does_not_record_moves_no_baseline(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]
) -> None:
    def fatal(desc: dict[str, Any]) -> None:
        vfio(desc)
        gpus = next(d for d in desc["devices"] if d["id"] == "10de:2330")
        gpus["aer"] = {"fatal": {"MalfTLP": 1}}

    host = sim_host("hgx-h100", fatal)
    first = run_checks(host, env={})
    assert [u.status for u in first.units] == ["not_ready"] * 8
    assert first.units[0].reasons[0].message == "1 fatal PCIe AER error(s) since boot"
    assert not host.path(UNIT_HEALTH_STATE).exists()  # only record=True writes it
    run_checks(host, env={}, record=True)
    assert [u.status for u in run_checks(host, env={}).units] == ["ready"] * 8


def test_nonfatal_growth_degrades_and_correctable_growth_is_only_told(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]
) -> None:
    host = _hgx(sim_host, vfio, agents)
    run_checks(host, env={}, record=True)
    inject.add_aer_errors(host.root, GPU, "nonfatal", "CmpltTO", 3)
    inject.add_aer_errors(host.root, "0000:28:00.0", "correctable", "RxErr", 5)
    report = run_checks(host, env={}, record=True)
    _shown(
        report,
        "degraded",
        "aer_nonfatal",
        "3 non-fatal PCIe AER error(s) since the last run (3 since boot)",
        "reseat the card or its riser and check its power cables; if the count keeps growing, RMA the GPU",
    )
    told = _unit(report, "25")
    assert told["status"] == "ready"
    assert [r["code"] for r in told["reasons"]] == ["aer_correctable"]


def test_a_reboot_resets_the_counters_and_the_baseline_of_another_boot_is_not_used(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]
) -> None:
    host = _hgx(sim_host, vfio, agents)
    inject.add_aer_errors(host.root, GPU, "nonfatal", "DLP", 4)
    run_checks(host, env={}, record=True)
    host.path("/proc/sys/kernel/random/boot_id").write_text("6f1c2d0e-0000-4000-8000-000000000002\n")
    # No baseline of this boot: nonfatal growth cannot be told, and the counts start again.
    assert _unit(run_checks(host, env={}))["status"] == "ready"


def test_an_empty_reset_method_makes_the_unit_not_ready(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]
) -> None:
    host = _hgx(sim_host, vfio, agents)
    inject.empty_reset_method(host.root, GPU)
    report = run_checks(host, env={})
    _shown(
        report,
        "not_ready",
        "no_reset_method",
        "no reset method (reset_method is empty): it cannot be reset between renters",
        f"sudo sh -c 'echo default > /sys/bus/pci/devices/{GPU}/reset_method'; if it stays empty, "
        "move the card to a slot of its own, or RMA it",
    )
    assert _unit(report)["devices"][0]["reset_method"] == []
    assert report.get("gpu_units").status is Status.WARN


def test_a_device_without_any_reset_method_has_neither_file_and_is_not_ready(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None]
) -> None:
    def no_reset(desc: dict[str, Any]) -> None:
        vfio(desc)
        next(d for d in desc["devices"] if d["id"] == "10de:2330")["reset_method"] = None

    report = run_checks(sim_host("hgx-h100", no_reset), env={})
    unit = _unit(report)
    assert unit["devices"][0]["reset_method"] is None
    assert [r["code"] for r in unit["reasons"]] == ["no_reset_method"]


def _enroll_record(host: Host) -> None:
    inv = discover(host)
    write_enrolled(host, "passthrough", [EnrolledGpu(d.address, d.iommu_group) for d in inv.gpus])


def test_a_gpu_missing_since_enrollment_is_a_not_ready_unit_of_its_enrolled_group(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]
) -> None:
    host = _hgx(sim_host, vfio, agents)
    _enroll_record(host)
    assert read_enrolled(host) is not None and len(read_enrolled(host) or []) == 8
    inject.remove_device(host.root, GPU)
    report = run_checks(host, env={})
    unit = _unit(report)
    assert unit["iommu_group"] == UNIT
    assert unit["devices"] == [
        {
            "address": GPU,
            "role": "gpu",
            "present": False,
            "driver": None,
            "link": None,
            "aer": None,
            "reset_method": None,
        }
    ]
    hint = (
        "power-cycle the host; if it stays missing, reseat the card or its riser, then RMA it "
        "(removed on purpose: re-run the install one-liner with a new token)"
    )
    assert unit["reasons"] == [
        {
            "code": "gpu_missing",
            "device": GPU,
            "message": "enrolled, but no longer on the PCI bus",
            "hint": hint,
        }
    ]
    assert json.loads(render_json(report))["gpu_units"] == {"ready": 7, "total": 8}
    assert [u.id for u in report.units] == [str(n) for n in range(24, 32)]  # in its group's place
    text = render_text(report)
    assert f"group {UNIT}: {GPU}: not ready (enrolled, gone from the bus)" in text
    assert f"  {GPU}: enrolled, but no longer on the PCI bus ({hint})" in text
    assert "7/8 GPU unit(s) ready to rent" in text
    samples = _samples(render_prometheus(report, now=0))
    assert samples[(f"{P}_unit_ready", (("unit", UNIT),))] == 0
    assert samples[(f"{P}_unit_status", (("status", "not_ready"), ("unit", UNIT)))] == 1


def test_a_node_without_an_enrollment_record_reports_no_gpu_missing(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]
) -> None:
    host = _hgx(sim_host, vfio, agents)
    inject.remove_device(host.root, GPU)
    report = run_checks(host, env={})
    assert json.loads(render_json(report))["gpu_units"] == {"ready": 7, "total": 7}
    assert report.get("gpu_units").status is Status.PASS
    # A record that is not ours is no record either.
    host.path(ENROLLED_GPUS).parent.mkdir(parents=True, exist_ok=True)
    host.path(ENROLLED_GPUS).write_text('{"version": 1, "gpus": [{"address": "../../etc"}]}')
    assert read_enrolled(host) is None
    assert run_checks(host, env={}).get("gpu_units").status is Status.PASS


@pytest.mark.parametrize(
    ("text", "total", "count"),
    [
        # The sample output of Documentation/ABI/testing/sysfs-bus-pci-devices-aer: names with spaces.
        (
            "Receiver Error 2\nBad TLP 0\nBad DLLP 0\nRELAY_NUM Rollover 0\nReplay Timer Timeout 0\n"
            "Advisory Non-Fatal 0\nCorrected Internal Error 0\nHeader Log Overflow 0\nTOTAL_ERR_COR 2\n",
            "TOTAL_ERR_COR",
            2,
        ),
        # The total counts messages, which may each carry several errors: it wins over the sum.
        ("DLP 2\nSDES 1\nTOTAL_ERR_FATAL 2\n", "TOTAL_ERR_FATAL", 2),
        # A file without its total line (not what the kernel writes): the sum.
        ("DLP 2\nSDES 1\n", "TOTAL_ERR_FATAL", 3),
        ("", "TOTAL_ERR_NONFATAL", 0),
    ],
)
def test_aer_files_are_read_as_the_kernel_writes_them(text: str, total: str, count: int) -> None:
    assert parse_aer(text, total) == count


def test_the_node_agents_run_keeps_the_baseline_atomically_in_the_nodes_state(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]
) -> None:
    host = _hgx(sim_host, vfio, agents)
    inject.add_aer_errors(host.root, GPU, "correctable", "BadTLP", 7)
    run_checks(host, env={}, record=True)
    state = json.loads(host.path(UNIT_HEALTH_STATE).read_text())
    assert state["version"] == 1 and state["boot_id"] == "6f1c2d0e-0000-4000-8000-000000000001"
    assert state["aer"][GPU] == {"correctable": 7, "nonfatal": 0, "fatal": 0}
    assert len(state["aer"]) == 8
    assert not list(host.path(UNIT_HEALTH_STATE).parent.glob(".unit-health.json.*"))  # no temp left


def test_the_heartbeat_carries_the_units_and_the_agents_run_records_the_baseline(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]
) -> None:
    from bootstrap.settings import Settings
    from nodeagent.agent import Agent

    host = _hgx(sim_host, vfio, agents)
    inject.train_link(host.root, GPU, width=4)
    body = Agent(host).body(Settings())
    units = body["doctor"]["units"]
    assert [u["status"] for u in units] == ["degraded"] + ["ready"] * 7
    assert units[0]["reasons"][0]["message"] == "PCIe link x4 of x16 (32.0 GT/s of 32.0 GT/s)"
    assert body["doctor"]["gpu_units"] == {"ready": 8, "total": 8}
    assert "control_plane" not in {c["name"] for c in body["doctor"]["checks"]}
    assert json.loads(host.path(UNIT_HEALTH_STATE).read_text())["aer"][GPU] == {
        "correctable": 0,
        "nonfatal": 0,
        "fatal": 0,
    }


def test_container_mode_units_are_the_gpus_and_need_no_reset_method(sim_host: Make) -> None:
    host = sim_host("hgx-h100")  # GPUs on the nvidia driver
    host.path("/etc/vectorlay").mkdir(parents=True, exist_ok=True)
    host.path("/etc/vectorlay/node.yaml").write_text("gpu_mode: container\n")
    inject.train_link(host.root, GPU, width=8)
    inject.empty_reset_method(host.root, "0000:28:00.0")  # the nvidia driver resets its own GPUs
    write_enrolled(host, "container", [EnrolledGpu(GPU, None), EnrolledGpu("0000:f8:00.0", None)])
    report = run_checks(host, env={})
    units = json.loads(render_json(report))["units"]
    assert [u["id"] for u in units][:2] == [GPU, "0000:28:00.0"]
    assert all(u["iommu_group"] is None for u in units)
    assert [u["status"] for u in units] == ["degraded"] + ["ready"] * 7 + ["not_ready"]
    assert units[-1]["id"] == "0000:f8:00.0" and units[-1]["reasons"][0]["code"] == "gpu_missing"
    gpu_units = report.get("gpu_units")
    assert gpu_units.message == "8/9 GPU(s) on the nvidia driver, shared through runsc (1 degraded)"
    assert f"{GPU} GH100 [H100 SXM5 80GB]: on nvidia, degraded" in gpu_units.details


def test_a_gpu_missing_after_a_reboot_that_renumbered_the_groups_does_not_blame_another_unit(
    sim_host: Make, vfio: Callable[[dict[str, Any]], None], agents: Callable[..., None]
) -> None:
    host = _hgx(sim_host, vfio, agents)
    # Enrolled with a ninth GPU in group 24, the group the kernel now gives the first H100.
    gpus = [EnrolledGpu("0000:f8:00.0", UNIT)] + [
        EnrolledGpu(d.address, d.iommu_group) for d in discover(host).gpus
    ]
    write_enrolled(host, "passthrough", gpus)
    report = run_checks(host, env={})
    units = json.loads(render_json(report))["units"]
    assert _unit(report)["status"] == "ready"
    missing = _unit(report, "0000:f8:00.0")
    assert (missing["iommu_group"], missing["status"]) == (None, "not_ready")
    assert [r["code"] for r in missing["reasons"]] == ["gpu_missing"]
    assert json.loads(render_json(report))["gpu_units"] == {"ready": 8, "total": 9}
    assert len(units) == 9
