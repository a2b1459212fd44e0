"""What a doctor process imports: start-up time is part of the product (the doctor is benchmarked
against virt-host-validate, and the node-agent and the textfile timer run it often), so each form
keeps out of the modules it does not need, and the heavy dependencies stay out of all of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hostsim import build_host, load_topology

# Prints the modules the process loaded once the doctor has answered (it ends with SystemExit), after
# a marker line; atexit and sys are built in, so the probe adds no module of its own.
_MARKER = "--- modules ---"
_PROBE = f"""
import atexit, sys
atexit.register(lambda: print("{_MARKER}", *sorted(sys.modules), sep="\\n", file=sys.stderr))
from doctor.cli import main
main(sys.argv[1:])
"""
# Never on the doctor's path: typer only for --help and usage errors, the rest only where used.
HEAVY = {"typer", "rich", "yaml", "jinja2", "cryptography", "requests", "psutil", "pyudev", "pydantic"}
# Not needed by a node that is not enrolled and has no GPUs: the identity reader, the VFIO probe's
# struct, a thread library, the JSON encoder of the other form.
NOT_ENROLLED_CPU_ONLY = {"bootstrap.identity", "bootstrap.overlay", "struct", "threading", "json"}


def _imported(argv: list[str]) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode in (0, 1), proc.stderr
    assert proc.stdout.splitlines()[-1].startswith(("Verdict: ", "}")), proc.stdout
    modules = set(proc.stderr.partition(_MARKER)[2].split())
    return {m.split(".")[0] for m in modules} | modules


@pytest.mark.parametrize("form", ["plain", "json", "prometheus"])
def test_a_cpu_only_node_not_enrolled_loads_only_what_it_checks(tmp_path: Path, form: str) -> None:
    root = build_host(tmp_path / "cpu", load_topology("cpu-only"))
    extra = {"plain": [], "json": ["--json"], "prometheus": ["--prometheus", str(tmp_path / "d.prom")]}
    imported = _imported(["--root", str(root), *extra[form]])
    assert "doctor.checks" in imported  # the probe saw a real run
    assert not imported & HEAVY
    unneeded = NOT_ENROLLED_CPU_ONLY - {"json"} if form == "json" else NOT_ENROLLED_CPU_ONLY
    assert not imported & unneeded
