"""QEMU never outlives the harness: a pytest killed by a CI timeout (SIGKILL: no cleanup runs) or
stopped by SIGTERM takes its guests with it. A paused VM with no machine (`-machine none -S`) is all
QEMU needs to run here; no guest boots."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

HERE = Path(__file__).resolve().parent
QEMU = ["qemu-system-x86_64", "-machine", "none", "-S", "-nodefaults", "-display", "none", "-monitor", "none"]
# A harness in a process of its own: it starts QEMU through the launcher the Vm uses, says QEMU's
# pid, and waits to be killed.
CHILD = f"""
import sys, time
sys.path.insert(0, {str(HERE)!r})
from harness import launch_qemu
proc = launch_qemu({QEMU!r})
print(proc.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _start_harness() -> tuple[subprocess.Popen[str], int]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, cwd=HERE.parents[1]
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.strip().isdigit(), f"the harness did not start QEMU: {line!r}"
    qemu = int(line)
    assert _alive(qemu)
    return child, qemu


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_qemu_dies_with_a_killed_harness(sig: signal.Signals) -> None:
    child, qemu = _start_harness()
    try:
        child.send_signal(sig)
        child.wait(timeout=30)
        # Bounded, not timed: a QEMU left behind would live for ever.
        assert _gone_within(qemu, 30), f"QEMU {qemu} outlived its harness"
    finally:
        if _alive(qemu):
            os.kill(qemu, signal.SIGKILL)
        if child.poll() is None:
            child.kill()


def test_an_exiting_harness_kills_its_qemu_process_group() -> None:
    code = CHILD.replace("time.sleep(600)", "")  # a harness that ends normally
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    qemu = int(child.stdout.readline())
    child.wait(timeout=30)
    try:
        assert _gone_within(qemu, 30)
    finally:
        if _alive(qemu):
            os.kill(qemu, signal.SIGKILL)


def test_a_console_that_stands_still_counts_as_a_stalled_boot_and_one_that_moves_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys.path.insert(0, str(HERE))
    from harness import _ConsoleWatch

    monkeypatch.setattr(_ConsoleWatch, "STALL_SECONDS", 0.3)
    log = tmp_path / "console.log"
    log.write_text("[    7.959146] sched_clock: Marking stable\n")
    watch = _ConsoleWatch(log)
    for i in range(6):  # a talking kernel: a line every 0.1 s
        time.sleep(0.1)
        with open(log, "a") as f:
            f.write(f"[    8.{i}] still booting\n")
        assert not watch.stalled()
    time.sleep(0.5)
    assert watch.stalled()
    assert watch.last_line().endswith("[    8.5] still booting")
