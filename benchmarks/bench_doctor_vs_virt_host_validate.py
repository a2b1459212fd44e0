"""Wall time of the whole `vectorlay-node-doctor` process against libvirt's `virt-host-validate qemu`.

    .venv/bin/python benchmarks/bench_doctor_vs_virt_host_validate.py [--runs 41]

Both run against this machine's real root, alternately (doctor, then virt-host-validate, ...) so that
load from other processes hits both alike; the figure that counts is the median over the per-pair
ratios. Goal: each form (plain, --json, --prometheus: the node-agent and the textfile timer run the
doctor often) at most 5x virt-host-validate's wall time, while checking far more (agents, a real
KVM_CREATE_VM, IOMMU, VFIO units, wedged GPUs, disk, memory, identity).
benchmarks/test_bench_doctor_cli.py times the same three forms under pytest-benchmark (`make bench`).
virt-host-validate is in Debian's libvirt-clients package: `apt-get install -y libvirt-clients`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 5.0
# Timed as an installed node runs it (pip compiles the bytecode at install): the warm-up runs write
# the bytecode a PYTHONDONTWRITEBYTECODE in the caller's environment would otherwise keep unwritten.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _doctor_exe() -> str:
    beside = Path(sys.executable).parent / "vectorlay-node-doctor"
    found = str(beside) if beside.exists() else shutil.which("vectorlay-node-doctor")
    if not found:
        sys.exit("vectorlay-node-doctor not found: run `make venv` and use .venv/bin/python")
    return found


def _wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, check=False)
    return time.perf_counter() - start


def _compare(doctor: list[str], peer: list[str], runs: int) -> tuple[float, float, float]:
    for _ in range(3):  # warm the page cache and write the .pyc files
        _wall(doctor)
        _wall(peer)
    d_times, p_times, ratios = [], [], []
    for _ in range(runs):
        d, p = _wall(doctor), _wall(peer)
        d_times.append(d)
        p_times.append(p)
        ratios.append(d / p)
    return statistics.median(d_times), statistics.median(p_times), statistics.median(ratios)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=41)
    args = parser.parse_args()

    vhv = shutil.which("virt-host-validate")
    if vhv is None:
        sys.exit("virt-host-validate not found: apt-get install -y libvirt-clients")
    doctor = _doctor_exe()
    peer = [vhv, "qemu"]

    print(f"{os.uname().nodename}: {os.cpu_count()} CPU(s), {args.runs} alternating runs each, medians")
    print(f"{'command':<58} {'doctor':>9} {'v-h-v':>9} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        variants = [
            ("vectorlay-node-doctor", [doctor]),
            ("vectorlay-node-doctor --json", [doctor, "--json"]),
            ("vectorlay-node-doctor --prometheus FILE", [doctor, "--prometheus", f"{tmp}/doctor.prom"]),
        ]
        ratios = []
        for label, argv in variants:
            d, p, ratio = _compare(argv, peer, args.runs)
            ratios.append(ratio)
            row = f"{label}  vs  virt-host-validate qemu"
            print(f"{row:<58} {d * 1000:7.1f}ms {p * 1000:7.1f}ms {ratio:6.1f}x")
    worst = max(ratios)
    verdict = "within" if worst <= GOAL else "OVER"
    print(
        f"slowest form's median ratio (doctor / virt-host-validate qemu): {worst:.1f}x "
        f"({verdict} the {GOAL:.0f}x goal)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
