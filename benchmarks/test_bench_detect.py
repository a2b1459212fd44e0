"""Detection on an HGX-sized tree: 8 GPUs, 4 NVSwitches, PCIe switches, NICs and the ~250 uncore
functions a dual-socket Sapphire Rapids host exposes: about 300 PCI functions in all.

`make bench` runs it with timing; `make test` runs it once as a plain test (benchmarks disabled).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bootstrap.discovery import UnitStatus, discover
from bootstrap.host import TreeHost
from hostsim import build_host, load_topology


def hgx_sized_description() -> dict[str, Any]:
    desc = load_topology("hgx-h100")
    uncore = []
    # Uncore/system functions: 8 functions per device, 4 devices per bus, on the sockets' high buses.
    for bus in (0x7E, 0x7F, 0xFE, 0xFF, 0x60, 0x61, 0x62, 0x63):
        for dev in range(8):
            for fn in range(8):
                uncore.append(
                    {
                        "address": f"0000:{bus:02x}:{dev:02x}.{fn}",
                        "id": "8086:3250",
                        "class": "088000",
                        "driver": None,
                    }
                )
    desc["devices"] = desc["devices"] + uncore
    return desc


@pytest.mark.slow
def test_detect_on_an_hgx_sized_tree(benchmark: BenchmarkFixture, tmp_path: Path) -> None:
    root = build_host(tmp_path / "hgx", hgx_sized_description())
    host = TreeHost(root)
    inv = benchmark(discover, host)
    assert len(inv.devices) >= 300
    assert len(inv.gpus) == 8 and len(inv.nvswitches) == 4
    assert [u.status for u in inv.units] == [UnitStatus.NEEDS_BINDING] * 8
