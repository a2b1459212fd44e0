"""The doctor's textfile (`vectorlay-node-doctor --prometheus FILE`) as Prometheus' own linter sees it:
`promtool check metrics` (Debian's prometheus package) accepts it with no problem, on nodes of every
kind, and the name 0.1.0 wrote for the unit count is still there, deprecated, for one release."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hostsim import inject
from tests.doctor.conftest import to_vfio

PREFIX = "vectorlay_node_doctor"


@pytest.mark.parametrize("topology", ["cpu-only", "wedged-gpu", "hgx-h100", "hgx-h100-faulty-units"])
def test_promtool_finds_no_problem_in_the_doctors_metrics(
    make_tree: Callable[..., Path], tmp_path: Path, promtool: Path, topology: str
) -> None:
    if topology == "hgx-h100-faulty-units":
        # The HGX on vfio-pci with units of each status: a link at x8 (degraded), fatal AER errors
        # and an emptied reset_method (not ready), the rest ready.
        root = make_tree("hgx-h100", to_vfio)
        inject.train_link(root, "0000:18:00.0", width=8)
        inject.add_aer_errors(root, "0000:28:00.0", "fatal", "DLP")
        inject.add_aer_errors(root, "0000:28:00.0", "correctable", "RxErr", 3)
        inject.empty_reset_method(root, "0000:38:00.0")
    else:
        root = make_tree(topology)
    prom = tmp_path / "vectorlay.prom"
    res = subprocess.run(
        [sys.executable, "-m", "doctor.cli", "--root", str(root), "--prometheus", str(prom)],
        capture_output=True,
        text=True,
        timeout=60,
        env=inject.env(),
        check=False,
    )
    assert res.returncode in (0, 1), res.stderr  # the verdict; the file is written either way
    text = prom.read_text()
    lint = subprocess.run(
        [str(promtool), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")
    lines = text.splitlines()
    assert f"# TYPE {PREFIX}_gpu_units gauge" in lines
    # Kept for one release (untyped: promtool keeps `_total` for counters), with the same value.
    assert f"# TYPE {PREFIX}_gpu_units_total untyped" in lines
    value = {ln.split()[0]: ln.split()[1] for ln in lines if not ln.startswith("#")}
    assert value[f"{PREFIX}_gpu_units_total"] == value[f"{PREFIX}_gpu_units"]
    if topology == "hgx-h100-faulty-units":
        assert value[f'{PREFIX}_unit_status{{status="degraded",unit="24"}}'] == "1"
        assert value[f'{PREFIX}_unit_ready{{unit="24"}}'] == "1"
        assert value[f'{PREFIX}_unit_status{{status="not_ready",unit="25"}}'] == "1"
        assert value[f'{PREFIX}_unit_status{{status="not_ready",unit="26"}}'] == "1"
        assert value[f'{PREFIX}_unit_ready{{unit="27"}}'] == "1"
        assert value[f'{PREFIX}_unit_link_width{{device="0000:18:00.0",unit="24"}}'] == "8"
        key = f'{PREFIX}_unit_aer_errors_total{{device="0000:28:00.0",severity="fatal",unit="25"}}'
        assert value[key] == "1"
        assert f"# TYPE {PREFIX}_unit_aer_errors_total counter" in lines


def test_promtool_rejects_a_gauge_named_like_a_counter(tmp_path: Path, promtool: Path) -> None:
    # The check above can fail: the rule it enforces is live in this promtool.
    name = f"{PREFIX}_gpu_units_total"
    bad = f"# HELP {name} x\n# TYPE {name} gauge\n{name} 2\n"
    lint = subprocess.run(
        [str(promtool), "check", "metrics"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert lint.returncode != 0
    assert 'non-counter metrics should not have "_total" suffix' in lint.stdout + lint.stderr
