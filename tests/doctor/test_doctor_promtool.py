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

PREFIX = "vectorlay_node_doctor"


@pytest.mark.parametrize("topology", ["cpu-only", "wedged-gpu", "hgx-h100"])
def test_promtool_finds_no_problem_in_the_doctors_metrics(
    make_tree: Callable[..., Path], tmp_path: Path, promtool: Path, topology: str
) -> None:
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
