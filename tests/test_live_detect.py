"""`vectorlay-bootstrap detect` against the real machine it runs on (reads only; runs no command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hostsim import inject

# The rule written out here rather than imported from bootstrap.discovery, so that a change to the
# product's tables shows up as a disagreement: NVIDIA or AMD, with a display class (VGA, 3D, other
# display) or a processing accelerator (AMD Instinct).
_GPU_VENDOR_IDS = {"0x10de", "0x1002"}
_GPU_CLASS_PREFIXES = ("0x0300", "0x0302", "0x0380", "0x1200")


def _count_gpus_from_sysfs() -> int:
    """An independent count: walk /sys/bus/pci/devices with nothing but os and open()."""
    base = "/sys/bus/pci/devices"
    n = 0
    for name in os.listdir(base) if os.path.isdir(base) else []:
        with open(f"{base}/{name}/vendor") as v, open(f"{base}/{name}/class") as c:
            vendor, klass = v.read().strip().lower(), c.read().strip().lower()
        n += vendor in _GPU_VENDOR_IDS and klass.startswith(_GPU_CLASS_PREFIXES)
    return n


@pytest.mark.live
def test_detect_on_this_machine_succeeds_and_counts_its_gpus() -> None:
    # Extra vendor or NVSwitch IDs from the environment would make the product count devices the
    # independent rule does not.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in inject.ALL_ENV and not k.startswith("VECTORLAY_EXTRA_")
    }
    out = subprocess.run(
        [sys.executable, "-m", "bootstrap.cli", "detect", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["gpus"]) == _count_gpus_from_sysfs()
    assert data["iommu"]["active"] == bool(os.listdir("/sys/kernel/iommu_groups"))
    table = subprocess.run(
        [sys.executable, "-m", "bootstrap.cli", "detect"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert table.returncode == 0 and "IOMMU:" in table.stdout and "Traceback" not in table.stderr
