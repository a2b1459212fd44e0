"""How long planning the gpu stage and binding an HGX take (make bench)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bootstrap.commands.vfio_bind import run_bind
from bootstrap.discovery import discover
from bootstrap.host import Host, TreeHost
from bootstrap.plan import compute
from bootstrap.stages import gpu
from hostsim import build_host, load_topology
from hostsim.kernel import simulated_host


def test_planning_the_gpu_stage_on_an_hgx(benchmark: Any, tmp_path: Path) -> None:
    root = build_host(tmp_path / "hgx", load_topology("hgx-h100"))
    host = TreeHost(root)

    def plan() -> int:
        inv = discover(host, with_names=False)
        return len(compute(host, gpu.desired(host, inv, [])).changes)

    assert benchmark(plan) == 12  # 7 files and links, 5 commands


def test_binding_an_hgx_with_the_simulated_kernel(benchmark: Any, tmp_path: Path) -> None:
    desc = load_topology("hgx-h100")
    template = build_host(tmp_path / "template", desc)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        root = tmp_path / "run"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(template, root, symlinks=True)
        host, _sim, _ = simulated_host(root)
        return (host,), {}

    def bind(host: Host) -> int:
        return len(run_bind(host, timeout=1.0).bound)

    assert benchmark.pedantic(bind, setup=setup, rounds=5) == 12
