"""The doctor against this machine's real root (marked `live`: the only tests that may read /)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from doctor.probes import probe_kvm, probe_vfio_group

pytestmark = pytest.mark.live

needs_kvm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm (run as root on a KVM host)"
)


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from doctor.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_kvm
def test_the_doctor_checks_this_machine_without_a_traceback_and_kvm_passes() -> None:
    proc = _doctor("--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 1)
    data = json.loads(proc.stdout)
    kvm = next(c for c in data["checks"] if c["name"] == "kvm")
    assert kvm["status"] == "PASS"
    assert kvm["message"] == "KVM works: created a test VM (KVM API 12)"
    # Exit 1 exactly when the verdict is FAIL; WARN and PASS exit 0.
    assert data["verdict"] in ("PASS", "WARN", "FAIL")
    assert proc.returncode == (1 if data["verdict"] == "FAIL" else 0)


def test_the_human_output_of_this_machine_ends_with_a_verdict() -> None:
    proc = _doctor()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("Verdict: ")


@needs_kvm
def test_the_kvm_probe_really_creates_a_vm() -> None:
    probe = probe_kvm("/dev/kvm")
    assert probe.ok, probe.detail


def test_the_kvm_probe_reports_a_device_that_is_not_kvm() -> None:
    probe = probe_kvm("/dev/null")
    assert not probe.ok and probe.detail.startswith("KVM_GET_API_VERSION failed")


def test_a_vfio_group_that_does_not_exist_is_not_usable() -> None:
    probe = probe_vfio_group("/dev/vfio/4242")
    assert not probe.usable and "does not exist" in probe.state
