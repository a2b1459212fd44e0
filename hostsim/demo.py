"""`make demo`: build an example host tree and run the real installer's commands against it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hostsim import build_host, load_topology


def _run(argv: list[str]) -> int:
    print(f"\n$ {' '.join(argv)}", flush=True)
    return subprocess.run(argv, check=False).returncode


def main() -> int:
    bindir = Path(sys.executable).parent
    workdir = Path(os.environ.get("VECTORLAY_DEMO_DIR") or tempfile.mkdtemp(prefix="vectorlay-demo-"))
    root = workdir / "hgx-h100"
    if root.exists():
        shutil.rmtree(root)
    build_host(root, load_topology("hgx-h100"))
    print(f"Example host: an HGX H100 box (8 GPUs on the nvidia driver, 4 NVSwitches, IOMMU on) in {root}")
    print(
        "Its /sys, /proc and /etc are laid out the way the kernel does; nothing on this machine is touched."
    )
    rc = _run([str(bindir / "vectorlay-bootstrap"), "detect", "--root", str(root)])
    if rc != 0:
        return rc
    rc = _run([str(bindir / "vectorlay-bootstrap"), "detect", "--root", str(root), "--json"])
    print(f"\nThe tree stays in {workdir} for you to look at (e.g. ls -l {root}/sys/bus/pci/devices/).")
    return rc


if __name__ == "__main__":
    sys.exit(main())
