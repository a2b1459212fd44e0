from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bootstrap.host import Host
from doctor import cli
from doctor.checks import run_checks
from doctor.model import Status
from doctor.render import render_json, render_prometheus, render_text

Make = Callable[..., Host]


def _parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_json_is_exactly_the_design_contract_for_a_healthy_hgx(
    sim_host: Make, agents: Callable[..., None], vfio: Callable[[dict[str, Any]], None]
) -> None:
    host = sim_host("hgx-h100", vfio)
    agents(host)
    assert json.loads(render_json(run_checks(host, env={}))) == {
        "verdict": "PASS",
        "checks": [
            {
                "name": "agents",
                "status": "PASS",
                "message": "nebula, nomad and node-agent active",
                "hint": None,
            },
            {
                "name": "autoupdate",
                "status": "PASS",
                "message": "node-agent-update.timer enabled",
                "hint": None,
            },
            {
                "name": "kvm",
                "status": "PASS",
                "message": "/dev/kvm present (VM creation is probed on a live host)",
                "hint": None,
            },
            {"name": "iommu", "status": "PASS", "message": "IOMMU active (intel, 44 groups)", "hint": None},
            {"name": "gpu_units", "status": "PASS", "message": "8/8 GPU unit(s) ready to rent", "hint": None},
            {
                "name": "wedged",
                "status": "PASS",
                "message": "no wedged GPU (12 GPU/NVSwitch function(s) answer)",
                "hint": None,
            },
            {
                "name": "disk",
                "status": "PASS",
                "message": "500.0 GB free at /var/lib/vectorlay",
                "hint": None,
            },
            {"name": "memory", "status": "PASS", "message": "2199.0 GB RAM", "hint": None},
            {
                "name": "identity",
                "status": "SKIP",
                "message": "not enrolled (no /etc/vectorlay/identity/)",
                "hint": None,
            },
            {
                "name": "overlay",
                "status": "SKIP",
                "message": "not enrolled (no overlay IP yet)",
                "hint": None,
            },
            {
                "name": "control_plane",
                "status": "SKIP",
                "message": "not enrolled: nothing to report to the control plane",
                "hint": None,
            },
        ],
        "gpu_units": {"ready": 8, "total": 8},
        "units": [
            {
                "id": str(group),
                "iommu_group": str(group),
                "status": "ready",
                "devices": [
                    {
                        "address": f"0000:{bus:02x}:00.0",
                        "role": "gpu",
                        "present": True,
                        "driver": "vfio-pci",
                        "link": {
                            "speed": "32.0 GT/s",
                            "width": 16,
                            "max_speed": "32.0 GT/s",
                            "max_width": 16,
                        },
                        "aer": {"correctable": 0, "nonfatal": 0, "fatal": 0},
                        "reset_method": ["flr", "bus"],
                    }
                ],
                "reasons": [],
            }
            for group, bus in zip(range(24, 32), range(0x18, 0x98, 0x10), strict=True)
        ],
    }


def test_json_of_a_failing_node_carries_hints_and_the_fail_verdict(sim_host: Make) -> None:
    data = json.loads(render_json(run_checks(sim_host("wedged-gpu"), env={})))
    assert data["verdict"] == "FAIL"
    assert data["gpu_units"] == {"ready": 1, "total": 2}
    assert {
        "name": "wedged",
        "status": "WARN",  # the healthy unit still rents (this verdict's FAIL is the agents check's)
        "message": "GPU 0000:2a:00.0 fell off the bus (D3cold reset bug)",
        "hint": "power-cycle the host; a soft reboot may not clear it",
    } in data["checks"]
    assert all(set(c) == {"name", "status", "message", "hint"} for c in data["checks"])


def test_terminal_lines_are_aligned_and_end_with_the_verdict(sim_host: Make) -> None:
    text = render_text(run_checks(sim_host("gpu-shares-nic"), env={}))
    status_lines = [ln for ln in text.splitlines() if re.search(r" : (PASS|WARN|FAIL|SKIP)\b", ln)]
    assert len(status_lines) == 11
    assert len({ln.index(" : ") for ln in status_lines}) == 1
    assert "\033[" not in text
    assert text.splitlines()[-1] == "Verdict: FAIL (1 check(s) failed: agents)"
    # The unit lines come first; the N/M line closes the GPU block.
    lines = text.splitlines()
    nm = next(i for i, ln in enumerate(lines) if "1/2 GPU unit(s) ready to rent" in ln)
    assert "group 30: 0000:61:00.0" in lines[nm - 1] and lines[nm - 2].startswith("  GPU units:")


def test_colour_is_used_only_when_asked(sim_host: Make) -> None:
    report = run_checks(sim_host("cpu-only"), env={})
    assert "\033[1;31mFAIL\033[0m" in render_text(report, colour=True)
    assert "\033[" not in render_text(report, colour=False)


def test_prometheus_text_parses_and_carries_status_units_and_wedged(sim_host: Make) -> None:
    report = run_checks(sim_host("wedged-gpu"), env={})
    samples = _parse(render_prometheus(report, now=1_700_000_000.5))

    p = "vectorlay_node_doctor"
    assert samples[(f"{p}_check_status", (("check", "wedged"), ("status", "WARN")))] == 1
    assert samples[(f"{p}_check_status", (("check", "wedged"), ("status", "PASS")))] == 0
    assert samples[(f"{p}_check_status", (("check", "gpu_units"), ("status", "WARN")))] == 1
    assert samples[(f"{p}_verdict", (("verdict", "FAIL"),))] == 1
    assert samples[(f"{p}_gpu_units_ready", ())] == 1
    assert samples[(f"{p}_gpu_units", ())] == 2
    assert samples[(f"{p}_gpu_units_total", ())] == 2  # deprecated, until 0.3.0
    assert samples[(f"{p}_wedged_gpus", ())] == 1
    assert samples[(f"{p}_gpu_wedged", (("address", "0000:2a:00.0"),))] == 1
    assert samples[(f"{p}_last_run_timestamp_seconds", ())] == 1_700_000_000.5
    # Every check has exactly one status set.
    for r in report.results:
        assert (
            sum(samples[(f"{p}_check_status", (("check", r.name), ("status", s.value)))] for s in Status) == 1
        )


def test_cli_writes_the_metrics_file_by_atomic_rename(
    make_tree: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree("wedged-gpu")
    prom_dir = tmp_path / "textfile"
    prom_dir.mkdir()
    prom = prom_dir / "vectorlay.prom"
    prom.write_text("# stale\n")
    before = prom.stat().st_ino
    with pytest.raises(SystemExit) as exc:
        cli.main(["--root", str(root), "--json", "--prometheus", str(prom)])
    assert exc.value.code == 1
    assert json.loads(capsys.readouterr().out)["verdict"] == "FAIL"

    assert prom.stat().st_ino != before  # replaced by rename, never rewritten in place
    assert os.listdir(prom_dir) == ["vectorlay.prom"]  # no temp file left behind
    assert prom.stat().st_mode & 0o777 == 0o644  # node_exporter runs as another user
    assert _parse(prom.read_text())[("vectorlay_node_doctor_gpu_units_ready", ())] == 1


def test_a_crash_while_writing_metrics_leaves_the_old_file(
    make_tree: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_tree("cpu-only")
    prom = tmp_path / "vectorlay.prom"
    prom.write_text("# previous run\n")

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--root", str(root), "--prometheus", str(prom)])
    assert exc.value.code == 1
    assert prom.read_text() == "# previous run\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".vectorlay.prom.")] == []


def test_cli_exit_codes_follow_the_verdict(
    sim_host: Make, agents: Callable[..., None], vfio: Callable[[dict[str, Any]], None]
) -> None:
    healthy = sim_host("hgx-h100", vfio)
    agents(healthy)
    assert cli.run(healthy.root, False, None, host=healthy) == 0
    broken = sim_host("hgx-h100")
    agents(broken)
    assert cli.run(broken.root, False, None, host=broken) == 1


@pytest.mark.parametrize(
    "argv",
    [["--bogus"], ["--root"], ["--root", "/nonexistent/tree"], ["extra-argument"], ["--json", "--jsn"]],
)
def test_usage_errors_exit_2_without_a_traceback(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Error: " in err


def test_a_broken_node_yaml_is_a_message_and_exit_1(
    make_tree: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree("cpu-only")
    (root / "etc/vectorlay").mkdir(parents=True)
    (root / "etc/vectorlay/node.yaml").write_text("gpu_mode: [unclosed\n")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--root", str(root)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: /etc/vectorlay/node.yaml is not valid YAML") and "Traceback" not in err


def test_colour_follows_the_terminal_and_no_color(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from doctor.render import use_colour

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as tty, (tmp_path / "out.txt").open("w") as plain:
        assert use_colour(tty)
        assert not use_colour(plain)
        monkeypatch.setenv("NO_COLOR", "1")
        assert not use_colour(tty)
    os.close(leader)
