"""Wall time of the whole `vectorlay-node-doctor` process in each of its three forms: plain, `--json`
and `--prometheus FILE` (the node-agent and the textfile timer run it often, so every form counts),
interpreter start-up included, against an HGX H100 tree; `virt-host-validate qemu` (which reads this
machine) is timed alongside as the yardstick when it is installed. Goal: each form at most 5x it;
benchmarks/bench_doctor_vs_virt_host_validate.py prints the paired ratios on this machine's root.

`make bench` runs it with timing; `make test` runs each form once as a plain test (benchmarks disabled).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hostsim import build_host, load_topology

DOCTOR = Path(sys.executable).parent / "vectorlay-node-doctor"
FORMS = {"plain": [], "json": ["--json"], "prometheus": ["--prometheus", "PROM"]}
# Timed as an installed node runs it: with its bytecode written and read back.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, check=False, timeout=60)


@pytest.mark.parametrize("form", FORMS)
def test_the_doctor_process(benchmark: Any, tmp_path: Path, form: str) -> None:
    if not DOCTOR.exists():
        pytest.skip("vectorlay-node-doctor is not installed beside this interpreter (make venv)")
    benchmark.group = "doctor process vs virt-host-validate qemu"
    root = build_host(tmp_path / "hgx", load_topology("hgx-h100"))
    prom = tmp_path / "textfile" / "vectorlay.prom"
    prom.parent.mkdir()
    argv = [str(DOCTOR), "--root", str(root), *(str(prom) if a == "PROM" else a for a in FORMS[form])]
    _run(argv)  # the first run writes the bytecode

    proc = benchmark.pedantic(_run, args=(argv,), rounds=15, iterations=1, warmup_rounds=1)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    if form == "json":
        assert json.loads(proc.stdout)["verdict"] in ("PASS", "WARN", "FAIL")
    else:
        assert proc.stdout.splitlines()[-1].startswith("Verdict: ")
    if form == "prometheus":
        assert "vectorlay_node_doctor_verdict" in prom.read_text()


@pytest.mark.live
def test_the_yardstick_virt_host_validate_qemu(benchmark: Any) -> None:
    vhv = shutil.which("virt-host-validate")
    if vhv is None:
        pytest.skip("virt-host-validate not found: apt-get install -y libvirt-clients")
    benchmark.group = "doctor process vs virt-host-validate qemu"
    proc = benchmark.pedantic(_run, args=([vhv, "qemu"],), rounds=15, iterations=1, warmup_rounds=1)
    assert "QEMU" in proc.stdout, proc.stdout
