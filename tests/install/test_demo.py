"""`make demo` end to end (what `python -m hostsim.demo` does), and that it leaves nothing running."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _processes_under(path: Path) -> list[int]:
    """Live processes started for the demo's tree (the agents carry VECTORLAY_ROOT=<tree>)."""
    mark = f"VECTORLAY_ROOT={path}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if mark in env.split(b"\0"):
            found.append(int(pid))
    return found


def test_the_demo_reboots_once_then_enrolls_and_ends_with_eight_of_eight(tmp_path: Path) -> None:
    workdir = Path(os.path.realpath("/tmp")) / f"vl-demo-test-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VECTORLAY_")}
    env["VECTORLAY_DEMO_DIR"] = str(workdir)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "hostsim.demo"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        out = res.stdout
        assert res.returncode == 0, out[-3000:] + res.stderr
        first = out.index("==> First run")
        second = out.index("==> Second run")
        assert "vectorlay-node: REBOOT REQUIRED" in out[first:second]
        assert "your token expires at" in out[first:second]
        assert "intel_iommu=on iommu=pt" in out[second - 300 : second]
        run2 = out[second:]
        assert "enroll: enrolled node node_" in run2
        assert "vectorlay-node: DONE" in run2
        assert "doctor: PASS, 8/8 GPU unit(s) ready" in run2
        assert run2.count("8/8 GPU unit(s) ready to rent") == 2  # verify, then the doctor on its own
        assert "Verdict: PASS" in out[out.index("==> The doctor") :]
        view = out[out.index("==> The control plane's view") :]
        assert re.search(r"^control plane: node_[0-9a-f]+ active, 8 GPU unit\(s\) advertised$", view, re.M)
        # VECTORLAY_DEMO_DIR keeps the control plane's database and state dir.
        assert (workdir / "control-plane/cp.sqlite").is_file() and (
            workdir / "control-plane/state/ca.crt"
        ).is_file()
        assert "vtk_" not in out.replace("vtk_...", "")
        assert _processes_under(workdir / "host") == []
        assert (workdir / "host/var/log/vectorlay/bootstrap.log").is_file()
    finally:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


def test_the_container_demo_installs_once_without_a_reboot_and_the_doctor_passes_runsc_and_the_driver(
    runsc_releases: dict[str, Path],
) -> None:
    workdir = Path(os.path.realpath("/tmp")) / f"vl-demo-ctest-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VECTORLAY_")}
    env["VECTORLAY_DEMO_DIR"] = str(workdir)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "hostsim.demo", "--gpu-mode", "container"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        out = res.stdout
        assert res.returncode == 0, out[-3000:] + res.stderr
        assert "the real gVisor runsc 20240729.0 (Debian bookworm-backports" in out
        assert "REBOOT REQUIRED" not in out and "Second run" not in out
        assert "--gpu-mode container" in out
        run = out[out.index("==> The installer, once") : out.index("==> The doctor")]
        assert "vectorlay-node: DONE" in run
        assert "doctor: PASS, 8/8 GPU unit(s) ready" in run
        doctor = out[out.index("==> The doctor") :]
        lines = {
            ln.split(":", 1)[0].strip(): ln for ln in doctor.splitlines() if ln.rstrip().endswith(": PASS")
        }
        assert "runsc 0.0~20240729.0 accepts --nvproxy=true" in lines["runsc"]
        assert "NVIDIA driver 550.90.07 loaded" in lines["NVIDIA driver"]
        assert "8/8 GPU(s) on the nvidia driver, shared through runsc" in doctor
        assert "Verdict: PASS" in doctor
        # A container-mode node enrolls no IOMMU groups; its GPUs are what it is rented for.
        view = out[out.index("==> The control plane's view") :]
        assert re.search(r"^control plane: node_[0-9a-f]+ active, 8 GPU unit\(s\) advertised$", view, re.M)
        assert "vtk_" not in out.replace("vtk_...", "")
        assert _processes_under(workdir / "host") == []
    finally:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
